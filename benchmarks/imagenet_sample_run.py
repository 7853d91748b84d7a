"""ResNet-18 (configs/resnet18_imagenet.py) at 224 px on the real-format ImageNet sample, as a user
runs it: both stages, a SIGTERM in the FGC stage and the same command again, evaluation, cost
and compare on the workdir. Prints a table: wall times, compilation, images/s, and whether the
stopped-and-resumed run equals the uninterrupted one bit for bit.

    python benchmarks/imagenet_sample_run.py --out /tmp/r18_224 [--source imagenet_folder|tfds]
        [--image_size 224] [--devices 8]

The sample (`python -m fgc_jax.data.imagenet_sample`) is written to OUT/sample if absent. Every
command is `python -m fgc_jax.<command>` in a subprocess on `--devices` virtual CPU devices,
with one compilation cache (OUT/xla_cache), so the second and third runs load the first's
programs as a resumed run on a pod would load them from a shared cache.
"""

import argparse
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_MINI = REPO.parent / "shared" / "data" / "cifar10-mini" / "cifar-10-batches-bin"


def flags(sample: pathlib.Path, source: str, image_size: int, batch: int) -> list[str]:
    """The ImageNet config at sample size: BAS epoch 0, FGC (k-NN positives) epoch 1; the sample
    read as folders, or as its two tars prepared by tfds into sample/tfds on the first run."""
    data = ([f"--config.data.dir={sample / 'folder'}"] if source == "imagenet_folder" else
            [f"--config.data.dir={sample / 'tfds'}", f"--config.data.manual_dir={sample / 'tars'}"])
    return ["--config=configs/resnet18_imagenet.py", f"--config.data.source={source}", *data,
            f"--config.data.image_size={image_size}",
            f"--config.batch_size={batch}", f"--config.eval_batch_size={batch}",
            "--config.num_epochs=2", "--config.bas.epochs=1", "--config.fgc.warmup_epochs=0",
            "--config.fgc.k=5", "--config.sparsity.ramp_epochs=1", "--config.optimizer.lr_milestones=(2,)",
            "--config.checkpoint_every_steps=4", "--config.log_every_steps=1", "--config.eval_every_epochs=1"]


def rows(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


TIMING = ("images_per_second", "ms_per_step", "eval/seconds")  # wall-clock fields no rerun repeats


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def run(command: list[str], env: dict[str, str], log: pathlib.Path, stop_after_rows: int = 0,
        workdir: pathlib.Path | None = None) -> tuple[float, int]:
    """Runs `command` to its end (SIGTERM once `workdir` has `stop_after_rows` metric rows);
    (wall seconds, exit status)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        while stop_after_rows and process.poll() is None:
            if len(rows(workdir)) >= stop_after_rows:
                process.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        status = process.wait()
    return time.perf_counter() - start, status


def state(workdir: pathlib.Path):
    """(latest step, its train state), restored onto this process's devices (as many virtual CPU
    devices as the runs had: main() sets them before JAX starts)."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    with ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "meta")) as manager:
        step = manager.latest_step()
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, restored["state"]


def leaves(tree) -> list[np.ndarray]:
    import jax  # pylint: disable=import-outside-toplevel
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def compiled_seconds(log: pathlib.Path) -> list[float]:
    """The trainer's 'compiled and ran its first train step in N s', one per phase."""
    return [float(m) for m in re.findall(r"compiled and ran its first train step in ([\d.]+) s", log.read_text())]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--source", choices=("imagenet_folder", "tfds"), default="imagenet_folder",
                        help="the sample's folders, or its tars through tfds (needs the imagenet extra)")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="global batch (a multiple of --devices)")
    parser.add_argument("--stop_after_rows", type=int, default=10,
                        help="SIGTERM once metrics.jsonl has this many rows (the FGC stage starts at step 8)")
    args = parser.parse_args()
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sample = out / "sample"
    if not (sample / "folder").is_dir():
        subprocess.run([sys.executable, "-m", "fgc_jax.data.imagenet_sample", f"--cifar_dir={CIFAR_MINI}",
                        f"--out={sample}"], cwd=REPO, check=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}",
               JAX_COMPILATION_CACHE_DIR=str(out / "xla_cache"))
    os.environ.update(JAX_PLATFORMS="cpu", XLA_FLAGS=env["XLA_FLAGS"])  # for state(): JAX starts later
    config = flags(sample, args.source, args.image_size, args.batch)
    train = [sys.executable, "-m", "fgc_jax.main", *config]
    straight, stopped = out / "straight", out / "stopped"
    table = []

    seconds, status = run([*train, f"--workdir={straight}"], env, out / "straight.log")
    assert status == 0, (out / "straight.log").read_text()[-3000:]
    train_rows = [r for r in rows(straight) if "loss" in r]
    images = args.batch * len(train_rows)
    table.append(("uninterrupted run (compiles)", f"{seconds:.0f} s", f"{len(train_rows)} steps, {images} images"))
    compiles = ", ".join(f"{s:.0f} s" for s in compiled_seconds(out / "straight.log"))
    table.append(("  first step of each phase (compiles)", compiles, ""))
    rates = [r["images_per_second"] for r in train_rows if "images_per_second" in r]
    if rates:
        table.append(("  img/s (logged intervals)", f"{min(rates):.1f}-{max(rates):.1f}", "training steps only"))

    seconds, status = run([*train, f"--workdir={stopped}"], env, out / "stopped.log", args.stop_after_rows, stopped)
    stopped_at = state(stopped)[0]
    table.append(("SIGTERM'd run (cached programs)", f"{seconds:.0f} s", f"exit {status}, checkpoint of step {stopped_at}"))
    seconds, status = run([*train, f"--workdir={stopped}"], env, out / "resumed.log")
    assert status == 0, (out / "resumed.log").read_text()[-3000:]
    table.append(("same command again (resumes)", f"{seconds:.0f} s", f"to step {state(stopped)[0]}"))

    (step_a, a), (step_b, b) = state(straight), state(stopped)
    same = step_a == step_b and all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
    same_rows = without_timings(rows(straight)) == without_timings(rows(stopped))
    table.append(("resumed == uninterrupted", f"{'bitwise' if same else 'DIFFERENT'}",
                  f"state at step {step_b}; metric rows {'equal' if same_rows else 'differ'}"))

    evaluate = [sys.executable, "-m", "fgc_jax.evaluate", *config]
    for name, command in (
            ("evaluate", [*evaluate, f"--workdir={stopped}"]),
            ("evaluate (uninterrupted run)", [*evaluate, f"--workdir={straight}"]),
            ("cost", [sys.executable, "-m", "fgc_jax.cost", *config, "--json"]),
            ("compare", [sys.executable, "-m", "fgc_jax.compare", f"--output={out / 'plane.png'}",
                         str(straight / "eval"), str(stopped / "eval")])):
        log = out / (re.sub(r"\W+", "_", name).strip("_") + ".log")
        seconds, status = run(command, env, log)
        assert status == 0, log.read_text()[-3000:]
        table.append((name, f"{seconds:.0f} s", ""))
    report = json.loads((stopped / "eval" / "eval_report.json").read_text())
    cost = json.loads((out / "cost.log").read_text().strip().splitlines()[-1])
    table.append(("  evaluation", f"top-1 {report['top1']:.3f}", f"{report['num_examples']} images at "
                  f"{args.image_size} px, mean MACs {report['mean_macs'] / 1e9:.3f} G of "
                  f"{report['dense_macs'] / 1e9:.3f} G (cost: {cost['dense_macs'] / 1e9:.3f} G), "
                  f"pictures {', '.join(report['pictures'])}"))

    print(f"ResNet-18, {args.source}, {args.image_size} px, global batch {args.batch} on {args.devices} virtual CPU devices, "
          f"{os.cpu_count()} CPU cores\n")
    print("| stage | figure | notes |\n|---|---|---|")
    for stage, figure, notes in table:
        print(f"| {stage} | {figure} | {notes} |")
    return 0 if same and same_rows else 1


if __name__ == "__main__":
    sys.exit(main())
