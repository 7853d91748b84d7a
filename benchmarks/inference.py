"""Real speedup of skipping gated-off channels: dense, masked, skipping and slimmed programs.

    python benchmarks/inference.py                       # the table
    python benchmarks/inference.py --json                # one JSON list, one record per row
    python benchmarks/inference.py --models resnet18 --batches 1 --densities 0.5

Times, interleaved in one process (median over `--rounds`), four programs of each model:
`dense` (the ungated network), `masked` (the gated network's evaluation, which computes
every channel and zeroes the gated-off ones), `skipping` (`fgc_jax.skipping`: only the
active channels) and `slimmed` (channels off for every calibration example removed).
Columns: ms; speedup over the fastest dense program (the smaller of `dense` and `skipping`
at density 1.0); MAC bound (dense MACs / dynamic MACs as `fgc_jax.macs` counts them);
speedup / bound.

Models: `resnet20_bas`, the released BAS ResNet-20 on the cifar10-mini test images in
../shared (its own gates; density = its measured mean), and gated ImageNet `resnet18` /
`resnet34` at 224 px on random images with gate densities FORCED (benchmark only: no
trained ImageNet gates exist here). `force_density` sets, in every gated block, the gate's
last layer to a constant: bias +10 for round(density x C) channels drawn at random, -10
for the others, weights 0, so every example keeps the same channels. The slimmed network
of a forced model is calibrated on the timed images themselves.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BAS_CHECKPOINT = SHARED / "weights" / "resnet20_bas_epoch100.pth"
CIFAR_MINI_TEST = SHARED / "data" / "cifar10-mini" / "cifar-10-batches-bin" / "test_batch.bin"
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet20_bas", "resnet18", "resnet34"],
                   choices=["resnet20_bas", "resnet18", "resnet34"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25],
                   help="forced gate densities of the ImageNet models")
    p.add_argument("--buckets", type=int, default=None, help="static widths per block (default: the library's)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median reported)")
    p.add_argument("--min_seconds", type=float, default=0.2, help="time per program per round")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    return p.parse_args(argv)


def force_density(variables, density: float, seed: int = 0):
    """BENCHMARK ONLY: every gated block keeps the same round(density x C) random channels.

    The gate's last layer becomes weights 0, bias +10 (kept) / -10 (dropped), so the gate
    network's output no longer depends on the image.
    """
    import numpy as np  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(seed)
    params = {k: dict(v) if isinstance(v, dict) else v for k, v in variables["params"].items()}
    for name, block in params.items():
        if not isinstance(block, dict) or "gate" not in block:
            continue
        fc2 = block["gate"]["mlp"]["fc2"]
        channels = fc2["bias"].shape[0]
        bias = np.full(channels, -10.0, np.float32)
        bias[rng.permutation(channels)[: int(round(density * channels))]] = 10.0
        mlp = dict(block["gate"]["mlp"], fc2={"kernel": np.zeros(fc2["kernel"].shape, np.float32),
                                               "bias": bias})
        params[name] = dict(block, gate={"mlp": mlp})
    return {**variables, "params": params}


def _cifar_mini_test():
    import numpy as np  # pylint: disable=import-outside-toplevel

    raw = np.fromfile(CIFAR_MINI_TEST, np.uint8).reshape(-1, 3073)
    images = raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) / 255.0
    return ((images - CIFAR10_MEAN) / CIFAR10_STD).astype(np.float32)


def _bench_model(name: str, args: argparse.Namespace):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    from fgc_jax import inference_benchmark as ib  # pylint: disable=import-outside-toplevel
    from fgc_jax import macs, skipping, torch_import  # pylint: disable=import-outside-toplevel
    from fgc_jax.models import cifar_resnet, imagenet_resnet  # pylint: disable=import-outside-toplevel

    buckets = args.buckets or skipping.DEFAULT_BUCKETS
    if name == "resnet20_bas":
        model, shape = cifar_resnet(20), (32, 32, 3)
        template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False))
        base = torch_import.load_torch_checkpoint(BAS_CHECKPOINT, template)
        images = _cifar_mini_test()
        cases = [(None, base)]
    else:
        model, shape = imagenet_resnet(int(name[len("resnet"):])), (224, 224, 3)
        base = jax.tree.map(np.asarray, model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False))
        images = np.random.default_rng(0).standard_normal((max(args.batches), *shape)).astype(np.float32)
        cases = [(d, force_density(base, d)) for d in args.densities]
    cost = macs.cost_model(model, shape)
    rows = []
    for batch in args.batches:
        x = jnp.asarray(images[:batch])
        thunks, meta = {}, {}
        for density, variables in cases:
            arch = skipping.Architecture.of(model)
            params = skipping.fold_variables(arch, variables)
            keep = skipping.ever_active(skipping.skipping_program(arch, buckets), params,
                                        [(images[i:i + 32], np.ones(len(images[i:i + 32]), bool))
                                         for i in range(0, len(images), 32)])
            programs = ib.model_programs(model, variables, keep, buckets)
            _, gates = programs["masked"](x)
            d = macs.block_density([np.asarray(g.gate) for g in gates])
            bound = ib.mac_bound(cost, d)
            slim_d = np.array([[k.mean() for k in keep]])
            bounds = {"dense": 1.0, "masked": bound, "skipping": bound,
                      "slimmed": ib.mac_bound(cost, slim_d, with_gates=False)}
            shown = density if density is not None else round(float(d.mean()), 2)
            for prog, run in programs.items():
                if prog == "dense" and density not in (None, cases[0][0]):
                    continue  # the ungated network does not depend on the gates
                key = f"{prog}@{density}"
                thunks[key] = (lambda run=run: run(x))
                meta[key] = (prog, None if prog == "dense" and density is not None else shown, bounds[prog])
        times = ib.time_interleaved(thunks, args.rounds, args.min_seconds)
        for key, (prog, density, bound) in meta.items():
            rows.append(ib.Row(name, batch, density, prog, times[key], bound))
    return rows


def main(argv=None) -> None:
    args = _parse_args(argv)
    sys.path.insert(0, str(REPO))
    from fgc_jax import inference_benchmark as ib  # pylint: disable=import-outside-toplevel

    rows = []
    for name in args.models:
        rows += _bench_model(name, args)
        if not args.json:
            print(f"[{name} done]", file=sys.stderr, flush=True)
    ib.add_speedups(rows)
    if args.json:
        print(json.dumps([r.record() for r in rows]))
    else:
        print(f"{os.cpu_count()} CPU cores; batch sizes {args.batches}; median of {args.rounds} interleaved rounds")
        print(ib.format_table(rows))


if __name__ == "__main__":
    main()
