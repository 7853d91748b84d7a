"""One-shot device check: versions, tests, step throughput and CPU-vs-accelerator agreement.

On a GPU machine (see benchmarks/README.md for an offline leased one):

    python benchmarks/device_check.py --out "$OUT" --data DIR/cifar-10-batches-bin

and on any machine, the same code path on the CPU with tiny sizes (CI runs it):

    python benchmarks/device_check.py --smoke --out /tmp/device_check

Stages, each timed and each reported even when another one fails:

1. environment: device, driver (nvidia-smi), jax/jaxlib/flax/optax/orbax/torch versions, the
   matmul precision in force;
2. tests: pytest of the model, loss, memory-bank and train-step tests with
   JAX_PLATFORMS=<accelerator> (tests that need 8 devices or the CPU backend skip with a reason);
3. train step: `benchmarks/train_step.py`'s full FGC step for ResNet-20/56, batch 256/1024,
   float32/bfloat16, interleaved with `../shared/bench/torch_fgc_step.py --device cuda`;
4. ResNet-18 224 px: the step with and without the two FGC blocks (phase 'sparsity' = model,
   L0 and SGD only) with 1,281,167 bank rows, float32 and bfloat16 banks: the FGC share;
5. cpu vs accelerator: a short cifar10-mini run (half BAS stage, half FGC with k-NN
   positives, then evaluation on the test split) in separate processes on the CPU and on the
   accelerator, same seed; losses, parameters, test gates and accuracy compared against
   stated tolerances (see TOLERANCES).

Writes device_check.json, device_check.md and pytest.log into --out (default $OUT). Exits 1
if a stage raised (its error is in the report), else 0; failed tests or comparisons outside
tolerance are reported, not raised.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import train_step  # noqa: E402  (imports no JAX at module level)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-mini" / "cifar-10-batches-bin"
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
            "chex", "numpy", "torch", "ml-collections", "tensorflow-datasets", "tensorboardX")
IMAGENET_ROWS = 1_281_167

# CPU-vs-accelerator tolerances, by what differs between the two runs. Same platform: the
# same program twice, so it must repeat exactly. 'highest' precision: true float32 products
# on both sides, so only reduction order differs (cuDNN/cuBLAS vs Eigen sums; BN statistics
# over 128x32x32 values): the first step agrees to ~1e-5 relative; this is the configs'
# default (`config.matmul_precision`). 'default' (opt-in): XLA
# lets float32 convolutions and dots use TF32 on NVIDIA GPUs (10-bit mantissa, ~5e-4
# relative per product), so even the first loss differs by ~1e-4-1e-3. In both cases the
# straight-through gates are thresholds of noisy logits: once a gate flips, the two runs
# take different steps, so after N steps only aggregate quantities (mean loss of the last
# steps, test accuracy, the fraction of test-set gate decisions that agree) are compared.
TOLERANCES = {
    "same": {"first_loss_rel": 1e-6, "last_losses_rel": 1e-6, "gate_agreement": 1.0, "top1_abs": 0.0},
    "highest": {"first_loss_rel": 1e-4, "last_losses_rel": 0.05, "gate_agreement": 0.9, "top1_abs": 0.05},
    "default": {"first_loss_rel": 1e-2, "last_losses_rel": 0.05, "gate_agreement": 0.9, "top1_abs": 0.05},
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each stage runs; FULL on a GPU, SMOKE on the CPU in seconds."""

    tests: tuple[str, ...]
    tests_timeout_s: int
    depths: tuple[int, ...]
    batches: tuple[int, ...]
    dtypes: tuple[str, ...]
    steps: int
    repeats: int
    bank: int
    k: int
    r18_model: tuple[str, int]  # (config.model.arch, depth): ResNet-18, or a small stand-in to smoke-test
    r18_bank_dtypes: tuple[str, ...]
    r18_batch: int
    r18_image: int
    r18_rows: int
    train_depth: int
    train_batch: int
    train_steps: int


FULL = Sizes(tests=("tests/test_models.py", "tests/test_losses.py", "tests/test_memory_bank.py",
                    "tests/test_train_step.py"), tests_timeout_s=180,
             depths=(20, 56), batches=(256, 1024), dtypes=("float32", "bfloat16"), steps=10, repeats=2,
             bank=50000, k=200, r18_model=("imagenet_resnet", 18), r18_bank_dtypes=("float32", "bfloat16"),
             r18_batch=256, r18_image=224, r18_rows=IMAGENET_ROWS,
             train_depth=20, train_batch=128, train_steps=40)
SMOKE = Sizes(tests=("tests/test_losses.py::test_l0_loss_is_the_mean_over_all_gate_entries",),
              tests_timeout_s=120, depths=(8,), batches=(8,), dtypes=("float32",), steps=1, repeats=1,
              bank=256, k=5, r18_model=("cifar_resnet", 8), r18_bank_dtypes=("bfloat16",), r18_batch=2,
              r18_image=32, r18_rows=256, train_depth=8, train_batch=8, train_steps=2)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU only, tiny sizes: the same code path in seconds")
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="output directory (default $OUT)")
    p.add_argument("--platform", default="cuda", help="JAX platform of the accelerator (--smoke: cpu)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the cifar-10-batches-bin directory")
    p.add_argument("--torch_script", default=str(train_step.TORCH_SCRIPT), help="the PyTorch comparator")
    p.add_argument("--r18_dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="compute dtype of the ResNet-18 step")
    p.add_argument("--skip", nargs="*", default=[], choices=["tests", "train_step", "resnet18", "cpu_vs_accel"],
                   help="stages to leave out")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- environment
def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "n/a"


def _nvidia_smi() -> str:
    if shutil.which("nvidia-smi") is None:
        return "n/a: nvidia-smi not found"
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False, timeout=60)
    return out.stdout.strip() or f"n/a: nvidia-smi failed: {out.stderr.strip()[-300:]}"


def environment() -> dict[str, Any]:
    """Device, driver, versions and the precision settings in force."""
    import jax

    devices = jax.devices()
    return {"backend": jax.default_backend(), "device_kind": devices[0].device_kind, "device_count": len(devices),
            "nvidia_smi": _nvidia_smi(), "cpu_cores": os.cpu_count(), "python": platform.python_version(),
            "host": platform.platform(), "versions": {name: _version(name) for name in PACKAGES},
            "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "")}


# ----------------------------------------------------------------------------- tests
def run_tests(tests: tuple[str, ...], accel: str, timeout_s: int, log: pathlib.Path) -> dict[str, Any]:
    """pytest of `tests` with JAX_PLATFORMS=`accel`; counts, failures and skip reasons."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *tests]
    env = dict(os.environ, JAX_PLATFORMS=accel)
    try:
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
        text, returncode = out.stdout + out.stderr, out.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text, returncode = text + f"\n[device_check] timed out after {timeout_s} s", None
    log.write_text(text)
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text)}
    return {"command": f"JAX_PLATFORMS={accel} " + " ".join(cmd[1:]), "returncode": returncode, "counts": counts,
            "failed": re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M),
            "skipped": re.findall(r"^SKIPPED \[\d+\] (.*)$", text, re.M)}


# ----------------------------------------------------------------------------- throughput
def comparator(script: str, device: str, env: dict[str, str]) -> tuple[str, str]:
    """(`script`, '') if the PyTorch comparator can run on `device`, else ('', the reason)."""
    if not pathlib.Path(script).is_file():
        return "", f"{script} not found"
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__, torch.cuda.is_available())"],
                           env=env, capture_output=True, text=True, check=False, timeout=300)
    if probe.returncode:
        return "", f"torch is not importable: {probe.stderr.strip().splitlines()[-1:]}"
    version, cuda = probe.stdout.split()[-2:]
    if device.startswith("cuda") and cuda != "True":
        return "", f"torch {version} sees no CUDA device"
    return script, ""


def step_table(sizes: Sizes, script: str, torch_device: str, torch_env: dict[str, str]) -> list[dict]:
    """benchmarks/train_step.py's interleaved JAX-vs-PyTorch table."""
    args = train_step._parse_args(
        ["--depths", *map(str, sizes.depths), "--batches", *map(str, sizes.batches),
         "--dtypes", *sizes.dtypes, "--steps", str(sizes.steps), "--repeats", str(sizes.repeats),
         "--bank", str(sizes.bank),
         "--k", str(sizes.k), "--torch_device", torch_device])
    return train_step.time_table(args, script, torch_env)


def resnet18_share(sizes: Sizes, dtype: str) -> list[dict]:
    """The ResNet-18 (`sizes.r18_model`) step with and without the two FGC blocks, per bank dtype."""
    from configs import resnet18_imagenet
    from fgc_jax.schedules import Phase

    args = argparse.Namespace(bank=sizes.r18_rows, warmup=1)
    rows = []
    for bank_dtype in sizes.r18_bank_dtypes:
        config = resnet18_imagenet.get_config()
        config.model.arch, config.model.depth = sizes.r18_model
        config.batch_size = sizes.r18_batch
        config.data.image_size = sizes.r18_image
        config.compute_dtype = dtype
        config.fgc.k = sizes.k
        config.fgc.bank_dtype = bank_dtype
        step = train_step.JaxStep(config, args)
        step.run(1 + args.warmup, Phase.SPARSITY)  # compiles the model-only step
        full, model = [], []
        for _ in range(sizes.repeats + 1):
            full.append(1e3 * step.run(sizes.steps))
            model.append(1e3 * step.run(sizes.steps, Phase.SPARSITY))
        step.close()
        full_ms, model_ms = statistics.median(full), statistics.median(model)
        rows.append({"model": "ResNet-{1} ({0})".format(*sizes.r18_model), "batch": sizes.r18_batch,
                     "image": sizes.r18_image, "rows": sizes.r18_rows, "dtype": dtype, "bank_dtype": bank_dtype,
                     "full_ms": full_ms, "model_ms": model_ms,
                     "fgc_ms": full_ms - model_ms, "fgc_share": (full_ms - model_ms) / full_ms,
                     "full_img_s": sizes.r18_batch / full_ms * 1e3})
        print(f"  {rows[-1]['model']} {bank_dtype} banks: {full_ms:.1f} ms/step, model only {model_ms:.1f}",
              flush=True)
    return rows


# ----------------------------------------------------------------------------- cpu vs accelerator
def train_run(data: str, depth: int, batch: int, steps: int, precision: str, out: str) -> None:
    """A short cifar10-mini run on this process's JAX platform; writes losses, params, test gates."""
    import jax
    import numpy as np

    from configs import resnet20_cifar
    from fgc_jax import data_parallel, evaluation, input_pipeline, macs, schedules
    from fgc_jax.train import Trainer

    config = resnet20_cifar.get_config()
    config.data.source, config.data.dir = "cifar_bin", data
    config.matmul_precision = precision  # 'highest' is the shipped default; 'default' is XLA's
    config.model.depth, config.batch_size, config.eval_batch_size = depth, batch, 256
    config.bas.epochs, config.fgc.warmup_epochs = 1, 0
    info = input_pipeline.dataset_info(config)
    mesh = jax.make_mesh((1,), (data_parallel.AXIS,), devices=jax.devices()[:1])
    loader = input_pipeline.TrainLoader(config, global_batch_size=batch)
    trainer = Trainer(config, info, mesh, loader.steps_per_epoch)
    # The first half of the steps ends the BAS stage (epoch 0), the rest uses k-NN positives.
    start = loader.steps_per_epoch - steps // 2
    state = trainer.create_state(config.seed)
    state = state.replace(step=jax.device_put(np.int32(start), trainer.shardings.step))
    batches = loader.batches(start)
    history, phases = [], []
    for step in range(start, start + steps):
        phase = schedules.phase(config, step // loader.steps_per_epoch)
        state, metrics = trainer.train_step(state, input_pipeline.to_global(next(batches), mesh), phase)
        history.append(jax.device_get(metrics))
        phases.append(phase.value)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    report = evaluation.evaluate_model(trainer.eval_model, variables, config, mesh,
                                     macs.cost_model(trainer.eval_model, info.image_shape), collect=True)
    params = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state.params))])
    np.savez(out, loss=np.array([float(h["loss"]) for h in history]), phases=np.array(phases), params=params,
             gates=np.concatenate([np.asarray(g) for g in report["per_example"]["gate"]], axis=1),
             prediction=report["per_example"]["prediction"], top1=report["top1"],
             gate_density=report["gate_density"], backend=jax.default_backend(), precision=precision)


def _start_train_run(platform_: str, precision: str, sizes: Sizes, data: str, out: pathlib.Path
                     ) -> subprocess.Popen:
    """Starts `train_run` in a process of its own on JAX platform `platform_`; its log goes beside `out`."""
    cmd = [sys.executable, __file__, "train-run", data, str(sizes.train_depth), str(sizes.train_batch),
           str(sizes.train_steps), precision, str(out)]
    # A compilation cache shared by the runs: the smoke test's two CPU runs compile once.
    env = dict(os.environ, JAX_PLATFORMS=platform_, JAX_COMPILATION_CACHE_DIR=str(out.parent / "xla_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    with open(out.with_suffix(".log"), "w", encoding="utf-8") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, out: pathlib.Path):
    import numpy as np

    if proc.wait():
        log = out.with_suffix(".log").read_text()
        raise RuntimeError(f"the training run for {out.name} failed ({proc.returncode}):\n{log[-3000:]}")
    return np.load(out)


def compare_runs(ref, other, kind: str) -> dict[str, Any]:
    """Agreement of two train_run outputs, judged against TOLERANCES[kind]."""
    import numpy as np

    tol = TOLERANCES[kind]
    rel = np.abs(other["loss"] - ref["loss"]) / np.abs(ref["loss"])
    last = max(1, len(ref["loss"]) // 4)
    last_rel = abs(other["loss"][-last:].mean() - ref["loss"][-last:].mean()) / abs(ref["loss"][-last:].mean())
    result = {
        "kind": kind, "backend": str(other["backend"]), "precision": str(other["precision"]),
        "steps": len(ref["loss"]), "phases": sorted(set(ref["phases"].tolist())),
        "first_loss": [float(ref["loss"][0]), float(other["loss"][0])], "first_loss_rel": float(rel[0]),
        "max_loss_rel": float(rel.max()), "last_losses_rel": float(last_rel),
        "param_rel_l2": float(np.linalg.norm(other["params"] - ref["params"]) / np.linalg.norm(ref["params"])),
        "gate_agreement": float(np.mean(other["gates"] == ref["gates"])),
        "prediction_agreement": float(np.mean(other["prediction"] == ref["prediction"])),
        "top1": [float(ref["top1"]), float(other["top1"])], "top1_abs": abs(float(other["top1"] - ref["top1"])),
        "gate_density": [float(ref["gate_density"]), float(other["gate_density"])], "tolerance": tol}
    result["within_tolerance"] = bool(
        result["first_loss_rel"] <= tol["first_loss_rel"] and result["last_losses_rel"] <= tol["last_losses_rel"]
        and result["gate_agreement"] >= tol["gate_agreement"] and result["top1_abs"] <= tol["top1_abs"])
    return result


# ----------------------------------------------------------------------------- report
def _cell(x: Any, fmt: str = "{:.1f}") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def _table(title: str, preface: list[str], columns: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown section: title, preface lines, then the table; a column named `...>` is right-aligned."""
    header = "| " + " | ".join(c.removesuffix(">") for c in columns) + " |"
    align = "|" + "|".join("---:" if c.endswith(">") else "---" for c in columns) + "|"
    body = ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return [f"## {title}", "", *[line for p in preface for line in (p, "")], header, align, *body, ""]


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    env = report["sections"].get("environment", {})
    lines = [f"# fgc_jax device check ({report['mode']}, {report['date']})", ""]
    if env:
        v = env["versions"]
        lines += [f"- device: {env['backend']} / {env['device_kind']} x {env['device_count']}; nvidia-smi: "
                  f"{env['nvidia_smi']}; {env['cpu_cores']} CPU cores",
                  "- versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if x != "n/a"),
                  f"- jax_default_matmul_precision: {env['jax_default_matmul_precision']}", ""]
    tests = report["sections"].get("tests")
    if tests:
        lines += ["## Tests", "", f"`{tests['command']}`: " + ", ".join(f"{n} {w}" for w, n in tests["counts"].items()),
                  ""] + [f"- failed: {t}" for t in tests["failed"]] + [f"- skipped: {s}" for s in tests["skipped"]]
        lines.append("")
    sections = report["sections"]
    if sections.get("train_step"):
        lines += _table(
            "Full FGC train step (one device)", [f"PyTorch comparator: {report['comparator']}"],
            ["model", "batch", "fgc_jax compute", "fgc_jax ms/step (min-max)>", "img/s>",
             "PyTorch fp32 ms/step (min-max)>", "ratio (img/s)>", "compile s>"],
            [[f"ResNet-{r['depth']}", r["batch"], r["dtype"], f"{r['jax_ms']:.1f} ({r['jax_spread']})",
              f"{r['jax_img_s']:.0f}", f"{_cell(r['torch_ms'])} ({r['torch_spread']})",
              _cell(r["ratio"], "{:.2f}x"), f"{r['compile_s']:.0f}"] for r in sections["train_step"]])
    if sections.get("resnet18"):
        lines += _table(
            "ResNet-18: share of the two FGC blocks", [],
            ["model", "batch>", "image>", "bank rows>", "compute", "bank dtype", "full step ms>",
             "without FGC ms>", "FGC ms>", "FGC share>", "img/s>"],
            [[r["model"], r["batch"], r["image"], f"{r['rows']:,}", r["dtype"], r["bank_dtype"],
              f"{r['full_ms']:.1f}", f"{r['model_ms']:.1f}", f"{r['fgc_ms']:.1f}",
              f"{100 * r['fgc_share']:.0f}%", f"{r['full_img_s']:.0f}"] for r in sections["resnet18"]])
    if sections.get("cpu_vs_accel"):
        lines += _table(
            "CPU vs accelerator, short cifar10-mini run, same seed", [],
            ["other run", "steps>", "first loss CPU / other", "rel. diff>", "last-quarter loss rel. diff>",
             "param rel. L2 diff>", "test gates agreeing>", "top-1 CPU / other", "within tolerance"],
            [[f"{r['backend']}, precision {r['precision']} ({r['kind']})", r["steps"],
              f"{r['first_loss'][0]:.5f} / {r['first_loss'][1]:.5f}", f"{r['first_loss_rel']:.1e}",
              f"{r['last_losses_rel']:.1e}", f"{r['param_rel_l2']:.1e}", f"{100 * r['gate_agreement']:.2f}%",
              f"{100 * r['top1'][0]:.2f}% / {100 * r['top1'][1]:.2f}%",
              f"{'yes' if r['within_tolerance'] else 'NO'} (tolerance {r['tolerance']})"]
             for r in sections["cpu_vs_accel"]])
    lines += _table(
        "Stages", [], ["stage", "seconds>", "CPU seconds (with subprocesses)>", "status"],
        [[name, f"{s['seconds']:.1f}", f"{s['cpu_s']:.1f}",
          s["error"].strip().splitlines()[-1] if "error" in s else "ok"] for name, s in report["stages"].items()])
    lines += [f"- {note}" for note in report["notes"]]
    lines += ["", f"Total: {report['total_s']:.1f} s"]
    return "\n".join(lines) + "\n"


def _write(report: dict[str, Any], out: pathlib.Path) -> str:
    """Writes device_check.json and device_check.md; returns the Markdown."""
    report["total_s"] = time.perf_counter() - report["started"]
    (out / "device_check.json").write_text(
        json.dumps({k: v for k, v in report.items() if k != "started"}, indent=2, default=str))
    text = markdown(report)
    (out / "device_check.md").write_text(text)
    return text


def _stage(report: dict[str, Any], out: pathlib.Path, name: str, fn: Callable[[], Any]) -> Any:
    """Runs one stage; its result, seconds and any error go into `report`, which is written
    after every stage, so a run cut off by a time limit still leaves what it finished."""
    print(f"[device_check] {name} ...", flush=True)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    try:
        report["sections"][name] = result = fn()
        return result
    except Exception:  # noqa: BLE001  (a failing stage must not cost the others)
        report["stages"][name] = {"error": traceback.format_exc()}
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        return None
    finally:
        report["stages"].setdefault(name, {}).update(seconds=time.perf_counter() - t0, cpu_s=_cpu_seconds() - cpu0)
        _write(report, out)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished subprocesses."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-run"]:
        data, depth, batch, steps, precision, out = argv[1:]
        train_step.setup_process("")
        train_run(data, int(depth), int(batch), int(steps), precision, out)
        return 0
    args = _parse_args(argv)
    if not args.out:
        sys.exit("give --out DIR (or set $OUT)")
    torch_env = train_step.setup_process("")
    sizes, accel = (SMOKE, "cpu") if args.smoke else (FULL, args.platform)
    # Several JAX processes share the accelerator (this one, pytest, the training runs).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ["JAX_PLATFORMS"] = accel
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"started": time.perf_counter(), "mode": "smoke" if args.smoke else "full",
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "sizes": dataclasses.asdict(sizes), "sections": {}, "stages": {}, "notes": []}
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="device_check_"))
    ref = None
    data_ok = pathlib.Path(args.data).is_dir()
    if "cpu_vs_accel" not in args.skip and data_ok:  # the CPU reference runs beside the tests
        ref = _start_train_run("cpu", "default", sizes, args.data, scratch / "cpu.npz")
    _stage(report, out, "environment", environment)
    if "tests" not in args.skip:
        _stage(report, out, "tests", lambda: run_tests(sizes.tests, accel, sizes.tests_timeout_s, out / "pytest.log"))
    if ref is not None and not args.smoke:
        ref.wait()  # before the timings, which it would disturb (--smoke's timings only need to run)
    if "train_step" not in args.skip:
        torch_device = "cpu" if args.smoke else "cuda"
        script, reason = comparator(args.torch_script, torch_device, torch_env)
        report["comparator"] = f"{script} --device {torch_device}" if script else f"n/a: {reason}"
        if not script:
            report["notes"].append(f"PyTorch comparator: n/a: {reason}")
        _stage(report, out, "train_step", lambda: step_table(sizes, script, torch_device, torch_env))
    if "resnet18" not in args.skip:
        _stage(report, out, "resnet18", lambda: resnet18_share(sizes, args.r18_dtype))
    if "cpu_vs_accel" not in args.skip:
        def cpu_vs_accel() -> list[dict]:
            if not data_ok:
                report["notes"].append(f"cpu vs accelerator: n/a: {args.data} not found "
                                       "(give --data DIR/cifar-10-batches-bin)")
                return []
            # On the CPU, 'highest' is what float32 already computes: the smoke run compares the
            # same program twice instead.
            runs = [("default", "same" if accel == "cpu" else "default")]
            if accel != "cpu":
                runs.append(("highest", "highest"))
            reference = _finish(ref, scratch / "cpu.npz")
            results = []
            for precision, kind in runs:
                path = scratch / f"{accel}_{precision}.npz"
                results.append(compare_runs(reference, _finish(
                    _start_train_run(accel, precision, sizes, args.data, path), path), kind))
            return results
        _stage(report, out, "cpu_vs_accel", cpu_vs_accel)
    print(_write(report, out))
    shutil.rmtree(scratch, ignore_errors=True)
    return 1 if any("error" in s for s in report["stages"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
