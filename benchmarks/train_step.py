"""Throughput of the full FGC train step, side by side with the PyTorch comparator.

Times `Trainer.train_step` in the FGC-with-neighbours phase (cross-entropy + L0 + the
FGC loss over two 50,000-row memory banks with k=200 neighbours + both bank updates +
Nesterov SGD) on the current JAX backend with ONE device, for each depth, batch and
compute dtype asked for, and runs `../shared/bench/torch_fgc_step.py` (same depth,
batch, bank size and k, `--threads` = this machine's cores) in a subprocess of the
same invocation, interleaved with the JAX repetitions so both see the same machine
load. Prints one table with a `ratio` column (JAX img/s / PyTorch img/s):

  python benchmarks/train_step.py --depths 20 56 --batches 128 256 \
      --dtypes float32 bfloat16 --steps 5 --repeats 3

On a GPU machine add `--torch_device cuda` (the comparator's `--device`).

Synthetic data: normalised random images, random labels, random distinct dataset
indices (a fresh set each step, cycled over a few pre-built batches). The JAX time of a
repetition is `steps` consecutive steps ended by `block_until_ready`, after compilation
and `--warmup` untimed steps; the table shows the median over the repetitions (and the
per-repetition spread). `--xla_force_host_platform_device_count` is dropped from
XLA_FLAGS before JAX starts, and the process restarts itself as `fgc_jax.main` does (on
a CPU host, once, with `cpu_workarounds.MALLOC_TUNABLES`), so the step runs as a user would
run it on this host. The PyTorch comparator runs in the environment the benchmark was started with.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ml_collections

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCH_SCRIPT = REPO.parent / "shared" / "bench" / "torch_fgc_step.py"


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    p.add_argument("--batches", type=int, nargs="+", default=[128, 256])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                   help="fgc_jax compute dtype (params stay float32); PyTorch always runs float32")
    p.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--bank", type=int, default=50000, help="training-set size = rows of each memory bank")
    p.add_argument("--k", type=int, default=200, help="nearest neighbours per example")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch intra-op threads")
    p.add_argument("--torch_script", default=str(TORCH_SCRIPT),
                   help="the PyTorch comparator; '' skips it")
    p.add_argument("--torch_device", default="cpu", help="the comparator's --device: cpu | cuda")
    p.add_argument("--xla_flags", default="",
                   help="appended to XLA_FLAGS before JAX starts: process-wide XLA options to try")
    p.add_argument("--breakdown", action="store_true",
                   help="also print where the step's time goes: the step of each phase (model only, "
                        "+ FGC instance loss, + k-NN) and a profiler trace grouped by kind of work")
    return p.parse_args(argv)


def _set_xla_flags(extra: str) -> None:
    """Drops the virtual-device flag (tests set it) and appends `extra`, before JAX starts."""
    flags = os.environ.get("XLA_FLAGS", "")
    cleaned = re.sub(r"--xla_force_host_platform_device_count=\S+", "", flags).strip()
    if cleaned != flags:
        print("note: dropped --xla_force_host_platform_device_count from XLA_FLAGS")
    os.environ["XLA_FLAGS"] = f"{cleaned} {extra}".strip()


def _run_torch(script: str, depth: int, batch: int, args: argparse.Namespace,
               env: dict[str, str]) -> float | None:
    """ms/step of one comparator run (its own 3 warm-up steps are excluded), or None."""
    cmd = [sys.executable, script, "--depth", str(depth), "--batch", str(batch), "--steps", str(args.steps),
           "--bank", str(args.bank), "--k", str(args.k), "--threads", str(args.threads),
           "--device", args.torch_device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    match = re.search(r"([\d.]+) ms/step", out.stdout)
    if out.returncode or not match:
        print(f"warning: PyTorch comparator failed ({' '.join(cmd)}):\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(match.group(1))


def cifar_config(depth: int, batch: int, dtype: str, k: int) -> ml_collections.ConfigDict:
    """The ResNet-`depth` CIFAR config of one table row."""
    from configs import resnet20_cifar

    config = resnet20_cifar.get_config()
    config.model.depth = depth
    config.batch_size = batch
    config.compute_dtype = dtype
    config.fgc.k = k
    return config


class JaxStep:
    """One compiled FGC_NEIGHBOURS step of one configuration, with its state and batches.

    `config` gives the model, batch, dtypes and image size; `args.bank` the training-set
    size (= bank rows), and `args.warmup` the untimed steps after compilation.
    """

    def __init__(self, config: ml_collections.ConfigDict, args: argparse.Namespace):
        import jax
        import numpy as np
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from fgc_jax import data_parallel, input_pipeline
        from fgc_jax.schedules import Phase
        from fgc_jax.train import Trainer

        batch, size = config.batch_size, config.data.image_size
        info = input_pipeline.DatasetInfo(name="synthetic", num_train=args.bank, num_test=10000,
                                          num_classes=input_pipeline._SPECS[config.dataset].num_classes,
                                          image_shape=(size, size, 3))
        mesh = jax.make_mesh((1,), (data_parallel.AXIS,), devices=jax.devices()[:1])
        steps_per_epoch = args.bank // batch
        self.trainer = Trainer(config, info, mesh, steps_per_epoch)
        self.phase = Phase.FGC_NEIGHBOURS
        state = self.trainer.create_state(seed=0)
        # Start inside the FGC-with-neighbours stage, so the loss weights are that stage's.
        start = (config.bas.epochs + config.fgc.warmup_epochs) * steps_per_epoch
        self.state = state.replace(step=jax.device_put(np.int32(start), self.trainer.shardings.step))

        rng = np.random.default_rng(0)
        sharding = NamedSharding(mesh, P(data_parallel.AXIS))
        mean = np.asarray(input_pipeline.CIFAR10_MEAN, np.float32)
        std = np.asarray(input_pipeline.CIFAR10_STD, np.float32)
        self.batches = []
        for _ in range(4):
            pixels = rng.integers(0, 256, (batch, size, size, 3)).astype(np.float32) / 255.0
            host = {"image": (pixels - mean) / std,
                    "label": rng.integers(0, info.num_classes, batch).astype(np.int32),
                    "index": rng.permutation(args.bank)[:batch].astype(np.int32)}
            self.batches.append({k: jax.device_put(v, sharding) for k, v in host.items()})
        self._i = 0
        t0 = time.perf_counter()
        self.run(1)
        self.compile_s = time.perf_counter() - t0
        self.run(args.warmup)

    def run(self, steps: int, phase=None) -> float:
        """Seconds per step over `steps` consecutive steps, ended by block_until_ready."""
        import jax

        phase = phase or self.phase
        t0 = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.trainer.train_step(self.state, self.batches[self._i % 4], phase)
            self._i += 1
        jax.block_until_ready(self.state)  # the metrics come out of the same executions
        return (time.perf_counter() - t0) / max(steps, 1)

    def phase_breakdown(self, steps: int, repeats: int) -> dict[str, float]:
        """Median ms/step of the step compiled for each phase, interleaved."""
        from fgc_jax.schedules import Phase

        phases = [Phase.SPARSITY, Phase.FGC_INSTANCE, Phase.FGC_NEIGHBOURS]
        for phase in phases:  # compile + warm up
            self.run(2, phase)
        times = {phase: [] for phase in phases}
        for _ in range(repeats):
            for phase in phases:
                times[phase].append(1e3 * self.run(steps, phase))
        return {phase.value: statistics.median(t) for phase, t in times.items()}

    def profile(self, steps: int) -> list[tuple[str, float]]:
        """Per-step thunk time of the FGC_NEIGHBOURS step from a profiler trace, by kind of work."""
        import tempfile

        import jax

        hlo = self.trainer._steps[self.phase].lower(self.state, self.batches[0]).compile().as_text()
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir):
                self.run(steps)
            (path,) = pathlib.Path(trace_dir).rglob("*.xplane.pb")
            data = jax.profiler.ProfileData.from_file(str(path))
        per_thunk: dict[str, float] = {}
        for plane in data.planes:
            for line in plane.lines:
                if not line.name.startswith("tf_XLAEigen"):  # the executor threads that run thunks
                    continue
                for event in line.events:
                    if not event.name.startswith(("ThunkExecutor", "ThreadpoolListener", "end:", "Slinky")):
                        per_thunk[event.name] = per_thunk.get(event.name, 0.0) + event.duration_ns
        kinds: dict[str, float] = {}
        classify = _HloClassifier(hlo, self.trainer.info.num_train)
        for name, ns in per_thunk.items():
            kind = classify(name)
            kinds[kind] = kinds.get(kind, 0.0) + ns / 1e6 / steps
        return sorted(kinds.items(), key=lambda kv: -kv[1])

    def close(self) -> None:
        del self.state, self.batches, self.trainer


class _HloClassifier:
    """Names the kind of work of a thunk of the compiled step from its HLO instruction."""

    def __init__(self, hlo: str, bank_rows: int):
        self.defs: dict[str, str] = {}
        self.bodies: dict[str, str] = {}
        current = None
        for line in hlo.split("\n"):
            head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
            if head:
                current = head.group(1)
                self.bodies[current] = ""
                continue
            if current is not None:
                self.bodies[current] += line + "\n"
            inst = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*)", line)
            if inst:
                self.defs.setdefault(inst.group(1), inst.group(2))
        self.bank_rows = bank_rows

    def __call__(self, name: str) -> str:
        inst = self.defs.get(name, "")
        if not inst:
            return "other (runtime)"
        called = re.search(r"calls=%?([\w.\-]+)", inst)
        body = self.bodies.get(called.group(1), "") if called else ""
        root = re.search(r"ROOT %[\w.\-]+ = \S+ ([\w\-]+)\((.*)", body)
        opcode = root.group(1) if root else inst.split("(")[0].split(" ")[-1]
        root_text = root.group(0) if root else inst
        op_name = (re.findall(r'op_name="([^"]*)"', root_text) or re.findall(r'op_name="([^"]*)"', inst)
                   or [""])[0]
        shape = inst.split(" ")[0]
        backward = "transpose(jvp" in op_name
        if 'custom_call_target="TopK"' in inst + body:
            return "FGC: top-k over the feature bank"
        if "bd,nd->bn" in op_name:
            return "FGC: bank matmuls (" + ("backward" if backward else "forward") + ")"
        if f"[{self.bank_rows}," in shape or f",{self.bank_rows}]" in shape:
            return "FGC: softmax/masks over bank rows, bank updates"
        if opcode == "convolution":
            if re.match(r"\w+\[\d+,[13],[13],\d+\]", shape):
                return "conv: weight gradient"
            return "conv: input gradient" if backward else "conv: forward"
        if opcode == "transpose" or name.startswith("transpose"):
            return "layout transposes (conv weight gradients)"
        if opcode == "dot" and "...c,cd->...d" in op_name:
            return "conv-input materialisation (materialise_conv_inputs)"
        if "jvp(" not in op_name:
            return "optimizer, metrics, loss weights, RNG"
        return "BN / ReLU / gates / losses (" + ("backward" if backward else "forward") + ")"


def _print_breakdown(label: str, phases: dict[str, float], kinds: list[tuple[str, float]]) -> None:
    print(f"\n{label}: step time by phase (median ms/step; each phase is compiled separately)")
    model = phases["sparsity"]
    print(f"  model only (CE + L0 + SGD; phase 'sparsity'):            {model:8.1f}")
    print(f"  + FGC loss, instance positives ('fgc_instance'):         {phases['fgc_instance']:8.1f}  "
          f"(+{phases['fgc_instance'] - model:.1f})")
    print(f"  + k-NN positives, the full step ('fgc_neighbours'):      {phases['fgc_neighbours']:8.1f}  "
          f"(+{phases['fgc_neighbours'] - phases['fgc_instance']:.1f})")
    total = sum(ms for _, ms in kinds)
    print(f"{label}: profiler trace of the full step, thunk time by kind (sums to {total:.0f} ms/step of "
          "thunk time). Convolution thunks return before Eigen's work ends, so convolutions are mostly "
          "missing here and other thunks' times include waiting for them: a guide to what runs, not a "
          "time budget")
    for kind, ms in kinds:
        print(f"  {kind:58s} {ms:8.1f} ms {100 * ms / total:5.1f}%")
    sys.stdout.flush()


def _fmt_spread(values: list[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}" if values else "-"


def setup_process(xla_flags: str) -> dict[str, str]:
    """The process set-up of `fgc_jax.main`, before JAX starts; returns the comparator's environment.

    Restarts the process as `fgc_jax.main` does (`cpu_workarounds.restart_for_cpu`) and sets
    XLA_FLAGS. The PyTorch comparator runs in the environment the process was started with,
    as a PyTorch user would run it.
    """
    if "jax" in sys.modules:
        print("warning: JAX was imported before the benchmark set XLA_FLAGS", file=sys.stderr)
    sys.path.insert(0, str(REPO))
    # These start no backend, which reads XLA_FLAGS.
    from fgc_jax import cpu_workarounds, host_memory

    cpu_workarounds.restart_for_cpu()
    torch_env = host_memory.environ_before_restart()
    _set_xla_flags(xla_flags)
    return torch_env


def time_table(args: argparse.Namespace, script: str, torch_env: dict[str, str]) -> list[dict]:
    """One row per depth x batch x dtype: JAX and comparator (`script`, '' for none) ms/step, ratio."""
    rows = []
    for depth in args.depths:
        for batch in args.batches:
            steps = {}
            for dtype in args.dtypes:
                steps[dtype] = JaxStep(cifar_config(depth, batch, dtype, args.k), args)
            jax_ms = {dtype: [] for dtype in args.dtypes}
            torch_ms = []
            load = []
            for _ in range(args.repeats):  # interleaved: each repetition times every variant once
                for dtype, step in steps.items():
                    jax_ms[dtype].append(1e3 * step.run(args.steps))
                if script:
                    ms = _run_torch(script, depth, batch, args, torch_env)
                    if ms is not None:
                        torch_ms.append(ms)
                load.append(os.getloadavg()[0])
            torch_med = statistics.median(torch_ms) if torch_ms else None
            for dtype, step in steps.items():
                med = statistics.median(jax_ms[dtype])
                row = {"depth": depth, "batch": batch, "dtype": dtype, "jax_ms": med,
                       "jax_img_s": batch / med * 1e3, "jax_spread": _fmt_spread(jax_ms[dtype]),
                       "compile_s": step.compile_s, "torch_ms": torch_med,
                       "torch_img_s": batch / torch_med * 1e3 if torch_med else None,
                       "torch_spread": _fmt_spread(torch_ms), "load": statistics.median(load)}
                row["ratio"] = row["jax_img_s"] / row["torch_img_s"] if torch_med else None
                rows.append(row)
                if args.breakdown:
                    _print_breakdown(f"ResNet-{depth} batch {batch} {dtype}",
                                     step.phase_breakdown(args.steps, args.repeats), step.profile(args.steps))
                step.close()
                print(f"  ResNet-{depth} batch {batch} {dtype}: jax {med:.1f} ms/step, torch "
                      f"{torch_med or float('nan'):.1f} ms/step (load {row['load']:.1f})", flush=True)
    return rows


def _cpu_vector_isa() -> str:
    """The host CPU's widest vector instructions: XLA:CPU's speed against oneDNN's depends on them."""
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return "vector ISA unknown"
    widest = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return widest + (" with BF16" if "avx512_bf16" in flags else "")


def main(argv=None) -> list[dict]:
    args = _parse_args(argv)
    torch_env = setup_process(args.xla_flags)
    import jax

    script = args.torch_script if args.torch_script and pathlib.Path(args.torch_script).is_file() else ""
    if args.torch_script and not script:
        print(f"note: {args.torch_script} not found; PyTorch column left empty")
    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
          f"{os.cpu_count()} CPU cores ({_cpu_vector_isa()}), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, "
          f"bank={args.bank} k={args.k}, {args.steps} steps x {args.repeats} repeats, median")
    rows = time_table(args, script, torch_env)
    _print_table(rows, args)
    return rows


def _print_table(rows: list[dict], args: argparse.Namespace) -> None:
    header = (f"{'model':>9} {'batch':>5} {'dtype':>8} | {'jax ms/step':>11} {'(min-max)':>11} {'img/s':>7} | "
              f"{'torch ms/step':>13} {'(min-max)':>11} {'img/s':>7} | {'ratio':>5} | {'load':>4} {'compile':>7}")
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        torch_ms = f"{r['torch_ms']:.1f}" if r["torch_ms"] else "-"
        torch_ips = f"{r['torch_img_s']:.1f}" if r["torch_img_s"] else "-"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        print(f"{'ResNet-' + str(r['depth']):>9} {r['batch']:>5} {r['dtype']:>8} | {r['jax_ms']:>11.1f} "
              f"{r['jax_spread']:>11} {r['jax_img_s']:>7.1f} | {torch_ms:>13} {r['torch_spread']:>11} "
              f"{torch_ips:>7} | {ratio:>5} | {r['load']:>4.1f} {r['compile_s']:>6.0f}s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
