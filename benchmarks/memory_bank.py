"""Cost of the FGC memory-bank terms at ImageNet scale, sharded over 1/2/4/8 devices.

    python benchmarks/memory_bank.py                      # the full grid (tens of minutes on 2 cores)
    python benchmarks/memory_bank.py --rows 50000 --dims 64,256 --devices 1,2 --repeats 3

One "FGC block step" is what the train step does per FGC block: k-NN of the global batch's
features in the feature bank (per-shard top-k, merged on the example's device), the
contrastive loss over the gate bank (softmax normaliser combined over shards), its gradient
w.r.t. the gate logits, and the momentum update of both banks: `jax.jit` of `jax.shard_map`
over the 'data' axis of `fgc_jax.memory_bank` / `fgc_jax.losses`, banks sharded by rows, as
in `fgc_jax.train`.

Each device count runs in its own subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=D` (the count is fixed when JAX starts).
Virtual CPU devices share the machine's cores, so wall time does not fall with more of
them; the scaling evidence is the per-device work and memory, which fall as 1/devices:

  bank bytes per device = 2 banks x ceil(N / devices) x D x bytes(dtype)
  FLOPs per device      = 6 x B x ceil(N / devices) x D
                          (2BND similarities f.F^T, 2BND gate logits a.G^T, 2BND their
                          backward into a; top-k, exp and the row updates are O(BN) or O(BD))

Share of a ResNet-18 224-px train step, from FLOPs: forward 1.82 GMACs per image (the
torchvision figure) = 3.64 GFLOPs, a train step ~3x the forward = 10.9 GFLOPs per image; the
two FGC blocks of ResNet-18 are its last two BasicBlocks (D = 512). Both the backbone (by
batch) and the banks (by rows) divide over the devices, so the share does not depend on the
device count: share = 2 x 6 N D / (3 x 2 x 1.82e9) per image.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

RESNET18_FORWARD_MACS = 1.82e9  # per 224x224 image
TRAIN_STEP_OVER_FORWARD = 3.0
RESNET18_FGC_BLOCKS = 2  # the last two BasicBlocks, 512 channels each
IMAGENET_TRAIN = 1_281_167
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def padded_rows(rows: int, devices: int) -> int:
    return -(-rows // devices) * devices


def bank_bytes_per_device(rows: int, dim: int, devices: int, dtype: str) -> int:
    """Both banks of one FGC block: 2 x ceil(rows / devices) x dim x bytes."""
    return 2 * (padded_rows(rows, devices) // devices) * dim * DTYPE_BYTES[dtype]


def fgc_flops(batch: int, rows: int, dim: int) -> float:
    """FLOPs of one FGC block step over the whole bank (all devices together)."""
    return 6.0 * batch * rows * dim


def resnet18_step_flops(batch: int) -> float:
    return TRAIN_STEP_OVER_FORWARD * 2.0 * RESNET18_FORWARD_MACS * batch


def resnet18_share(rows: int, dim: int, blocks: int = RESNET18_FGC_BLOCKS) -> float:
    """FGC FLOPs / ResNet-18 train-step FLOPs (the batch cancels; so does the device count)."""
    return blocks * fgc_flops(1, rows, dim) / resnet18_step_flops(1)


# ----------------------------------------------------------------------------------------------
# Worker: one device count, all cases, in this process.


def build_step(mesh, rows: int, k: int, method: str):
    """The jitted FGC block step on `mesh`: (log_alpha, feature, index, F, G) -> (loss, grad, F', G')."""
    import jax  # pylint: disable=import-outside-toplevel
    from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

    from fgc_jax import losses, memory_bank  # pylint: disable=import-outside-toplevel

    data = P("data")
    loss_fn = jax.shard_map(
        lambda a, f, i, fb, gb: losses.fgc_contrastive_loss(
            a, f, i, fb, gb, k=k, temperature=0.07, use_neighbours=True, num_valid_rows=rows,
            axis_name="data", knn_method=method),
        mesh=mesh, in_specs=(data,) * 5, out_specs=P())
    update = jax.shard_map(
        lambda bank, i, v: memory_bank.update_bank(bank, i, v, momentum=0.5, axis_name="data"),
        mesh=mesh, in_specs=(data,) * 3, out_specs=data)

    def step(log_alpha, feature, index, feature_bank, gate_bank):
        loss, grad = jax.value_and_grad(loss_fn)(log_alpha, feature, index, feature_bank, gate_bank)
        return loss, grad, update(feature_bank, index, feature), update(gate_bank, index, log_alpha)

    return jax.jit(step, donate_argnums=(3, 4))


def run_case(mesh, rows: int, dim: int, dtype: str, batch: int, k: int, repeats: int,
             method: str = "exact", seed: int = 0, warmup: bool = True) -> dict:
    """Times one (rows, dim, dtype) case on `mesh` (after an untimed run if `warmup`)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
    from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

    from fgc_jax import memory_bank  # pylint: disable=import-outside-toplevel

    devices = mesh.size
    sharding = NamedSharding(mesh, P("data"))
    if batch % devices:
        raise ValueError(f"batch {batch} is not divisible by {devices} devices")
    storage = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    make_bank = jax.jit(lambda key: memory_bank.init_bank(key, rows, dim, num_shards=devices, dtype=storage),
                        out_shardings=sharding)
    key = jax.random.key(seed)
    feature_bank, gate_bank = make_bank(jax.random.fold_in(key, 1)), make_bank(jax.random.fold_in(key, 2))
    rng = np.random.default_rng(seed)
    inputs = [jax.device_put(x, sharding) for x in (
        rng.normal(0, 1, (batch, dim)).astype(np.float32),
        np.abs(rng.normal(0, 1, (batch, dim))).astype(np.float32),
        rng.choice(rows, batch, replace=False).astype(np.int32))]
    step = build_step(mesh, rows, k, method)

    started = time.perf_counter()
    step = step.lower(*inputs, feature_bank, gate_bank).compile()
    compile_seconds = time.perf_counter() - started
    times = []
    for i in range(max(repeats, 1) + int(warmup)):
        started = time.perf_counter()
        loss, grad, feature_bank, gate_bank = step(*inputs, feature_bank, gate_bank)
        jax.block_until_ready((loss, grad, feature_bank, gate_bank))
        if i or not warmup:
            times.append(time.perf_counter() - started)
    if not np.isfinite(float(loss)):
        raise FloatingPointError(f"non-finite FGC loss for rows={rows} dim={dim} dtype={dtype}")
    shard_rows = padded_rows(rows, devices) // devices
    assert feature_bank.addressable_shards[0].data.shape == (shard_rows, dim)
    del feature_bank, gate_bank, grad
    return {
        "devices": devices, "rows": rows, "dim": dim, "dtype": dtype, "batch": batch, "k": k,
        "method": method, "times_ms": [1e3 * t for t in times],
        "ms_per_step": 1e3 * float(np.median(times)),
        "ms_min": 1e3 * min(times),
        "compile_s": compile_seconds,
        "bank_bytes_per_device": bank_bytes_per_device(rows, dim, devices, dtype),
        "flops_per_device": fgc_flops(batch, padded_rows(rows, devices) // devices, dim),
    }


def worker(args) -> None:
    """Runs every case for the device count this process was started with; JSON lines on stdout."""
    import jax  # pylint: disable=import-outside-toplevel

    devices = jax.device_count()
    mesh = jax.make_mesh((devices,), ("data",))
    budget_end = time.monotonic() + args.time_budget
    for rows in args.rows:
        for dim in args.dims:
            for dtype in args.dtypes:
                # Affordable: big cases (where a first run's one-off costs are small in
                # comparison) and cases past the budget are timed once, without a warm-up run.
                big = rows * dim >= 2e8
                repeats = 1 if (big or time.monotonic() > budget_end) else args.repeats
                result = run_case(mesh, rows, dim, dtype, args.batch, args.k, repeats, args.method,
                                  warmup=not big)
                print(json.dumps(result), flush=True)
                print(f"[{devices} devices] N={rows} D={dim} {dtype}: {result['ms_per_step']:.0f} ms "
                      f"(x{len(result['times_ms'])}, compile {result['compile_s']:.1f} s)", file=sys.stderr,
                      flush=True)


# ----------------------------------------------------------------------------------------------
# Driver: a subprocess per device count, then the tables.


# XLA:CPU aborts a program whose devices reach a collective more than 40 s apart. Virtual
# devices share the cores, so with big banks one device can finish its shard's top-k long
# after another: allow them to wait.
PATIENT_COLLECTIVES = ("--xla_cpu_collective_call_terminate_timeout_seconds=7200 "
                       "--xla_cpu_collective_call_warn_stuck_timeout_seconds=600 "
                       "--xla_cpu_collective_timeout_seconds=7200")


def run_device_count(devices: int, args) -> list[dict]:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {PATIENT_COLLECTIVES}")
    command = [sys.executable, os.path.abspath(__file__), "--worker",
               "--rows", ",".join(map(str, args.rows)), "--dims", ",".join(map(str, args.dims)),
               "--dtypes", ",".join(args.dtypes), "--batch", str(args.batch), "--k", str(args.k),
               "--repeats", str(args.repeats), "--method", args.method,
               "--time-budget", str(args.time_budget)]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    process = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    results = [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0:
        raise RuntimeError(f"the {devices}-device worker failed with status {process.returncode} "
                           f"after {len(results)} cases")
    return results


def format_tables(results: list[dict], batch: int) -> str:
    """Markdown tables: one row per (N, D, dtype), the device counts side by side."""
    devices = sorted({r["devices"] for r in results})
    cases: dict[tuple, dict[int, dict]] = {}
    for r in results:
        cases.setdefault((r["rows"], r["dim"], r["dtype"] != "float32", r["dtype"]), {})[r["devices"]] = r

    def across(case: dict[int, dict], key: str, scale: float, digits: int) -> str:
        return " / ".join(f"{case[d][key] / scale:,.{digits}f}" if d in case else "-" for d in devices)

    counts = "/".join(str(d) for d in devices)
    lines = [f"FGC block step (k-NN + loss + grad + bank update), global batch {batch}, "
             f"k={results[0]['k'] if results else '?'}, on {counts} virtual CPU devices sharing 2 cores",
             "",
             f"| N | D | bank dtype | bank MB per device (2 banks), {counts} devices "
             "| GFLOP per device | ms per step (measured) |",
             "|---:|---:|---|---:|---:|---:|"]
    for (rows, dim, _, dtype), case in sorted(cases.items()):
        lines.append(f"| {rows:,} | {dim} | {dtype} | {across(case, 'bank_bytes_per_device', 2**20, 1)} "
                     f"| {across(case, 'flops_per_device', 1e9, 1)} | {across(case, 'ms_per_step', 1, 0)} |")
    lines += ["", "Share of a ResNet-18 224-px train step (FLOPs; independent of batch and device count;",
              f"step = 3 x 2 x {RESNET18_FORWARD_MACS:.3g} FLOPs/image, FGC = blocks x 6 N D FLOPs/image):", "",
              "| N | D | 1 FGC block | 2 FGC blocks (ResNet-18) |", "|---:|---:|---:|---:|"]
    for rows, dim in sorted({(r["rows"], r["dim"]) for r in results}):
        lines.append(f"| {rows:,} | {dim} | {resnet18_share(rows, dim, 1):.1%} | {resnet18_share(rows, dim):.1%} |")
    return "\n".join(lines)


def parse_args(argv=None):
    def ints(text):
        return [int(float(x)) for x in text.split(",") if x.strip()]

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=ints, default=[50_000, 200_000, 1_280_000], help="bank rows N")
    parser.add_argument("--dims", type=ints, default=[64, 256, 512], help="bank widths D")
    parser.add_argument("--devices", type=ints, default=[1, 2, 4, 8],
                        help="virtual CPU device counts ('' with --merge: tables only)")
    parser.add_argument("--dtypes", type=lambda t: t.split(","), default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--k", type=int, default=200, help="neighbours")
    parser.add_argument("--method", default="exact", choices=["exact", "approx"])
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per case after an ahead-of-time compile (1 for big cases)")
    parser.add_argument("--time-budget", type=float, default=600.0,
                        help="seconds per device count after which every case is timed once")
    parser.add_argument("--json", default="", help="also write the results here (after each device count)")
    parser.add_argument("--merge", nargs="*", default=[],
                        help="result files of earlier runs to include in the tables")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bad = [d for d in args.dtypes if d not in DTYPE_BYTES]
    if bad:
        parser.error(f"unknown dtypes {bad}; choose from {sorted(DTYPE_BYTES)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    results = []
    for path in args.merge:
        with open(path, encoding="utf-8") as f:
            results += json.load(f)
    for devices in args.devices:
        started = time.perf_counter()
        results += run_device_count(devices, args)
        print(f"[{devices} device(s): {time.perf_counter() - started:.0f} s]", file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1)
    print(format_tables(results, args.batch))
    share = resnet18_share(IMAGENET_TRAIN, 512)
    print(f"\nImageNet (N = {IMAGENET_TRAIN:,}), ResNet-18's two FGC blocks (D = 512): FGC = {share:.0%} of the "
          f"backbone's train-step FLOPs ({share / (1 + share):.0%} of backbone + FGC) on any number of devices.")


if __name__ == "__main__":
    main()
