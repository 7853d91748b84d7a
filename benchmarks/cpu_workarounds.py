"""A/B timing of the conv-input materialisation that the trainer turns on for CPU devices.

    python benchmarks/cpu_workarounds.py --depths 20 56 --batch 128
    GLIBC_TUNABLES= python benchmarks/cpu_workarounds.py ...          # malloc tunables: run
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/cpu_workarounds.py ...  # twice
    python benchmarks/cpu_workarounds.py --batch_shaping --depths 20 56 --batch 128
    python benchmarks/cpu_workarounds.py --threefry --depths 8 20 56 --batch 128

`--batch_shaping`: the batch-shaping loss summed unrolled or in loops (`series_loop`), as a BAS
train step computes it (loss and gradient of every gated block), compiled and run each way:
compile seconds, median ms per run, and whether both give the same bits.

`--threefry`: JAX's CPU lowering of Threefry-2x32 (a 5-iteration loop before jax-ml/jax#37872)
against its unrolled one (`cpu_workarounds.unrolled_threefry`): compile seconds of the model's
initialisation (one draw per parameter), median ms of one step's gate noise (a uniform draw
per gated block), and whether both give the same bits.

Times a float32 model-only train step (gated CIFAR ResNet forward + backward in train mode,
cross-entropy, SGD) on one device of the current backend, with
`materialise_conv_inputs` off and on, alternating repetitions in one process so that a
noisy host loads both alike. This script does not restart itself: the malloc setting is
whatever GLIBC_TUNABLES it is started with. See `fgc_jax/cpu_workarounds.py`.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fgc_jax import cifar_resnet, losses  # noqa: E402


def make_step(depth: int, batch: int, materialise: bool):
    """A jitted model-only train step and its first state."""
    model = cifar_resnet(depth, materialise_conv_inputs=materialise)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    variables = model.init({"params": jax.random.key(0), "gate": jax.random.key(1)}, images[:1], train=False)
    tx = optax.sgd(0.1, momentum=0.9, nesterov=True)

    def loss_fn(params, batch_stats, key):
        (logits, _), updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                           rngs={"gate": key}, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates["batch_stats"]

    @jax.jit
    def step(state, key):
        params, batch_stats, opt_state = state
        (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state

    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    return step, state


def batch_shaping_table(depths: list[int], batch: int, repeats: int) -> None:
    """Compile and run time of the batch-shaping loss and gradient, unrolled against in loops."""
    print(f"backend {jax.default_backend()}, batch {batch}: batch-shaping loss and gradient of every gated "
          f"block, one program; compile s, median (min-max) ms over {repeats} alternating runs")
    print("| model | compile unrolled | compile loops | run unrolled | run loops | same bits |")
    print("|---|---|---|---|---|---|")
    for depth in depths:
        rng = np.random.default_rng(0)
        widths = [w for w in (16, 32, 64) for _ in range((depth - 2) // 6)]  # one gate per block
        probs = [jnp.asarray(1 / (1 + np.exp(-rng.normal(0, 2, (batch, w)))), jnp.float32) for w in widths]
        compiled, compile_s, times, results = {}, {}, {False: [], True: []}, {}
        for loop in (False, True):
            fn = jax.jit(jax.value_and_grad(
                lambda ps, loop=loop: sum(losses.batch_shaping_loss(p, series_loop=loop) for p in ps)))
            start = time.perf_counter()
            compiled[loop] = fn.lower(probs).compile()
            compile_s[loop] = time.perf_counter() - start
            results[loop] = jax.tree.leaves(jax.block_until_ready(compiled[loop](probs)))
        for r in range(repeats):
            for loop in (False, True) if r % 2 == 0 else (True, False):
                start = time.perf_counter()
                jax.block_until_ready(compiled[loop](probs))
                times[loop].append(1000 * (time.perf_counter() - start))
        same = all(np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
                   for a, b in zip(results[False], results[True]))
        cell = {f: f"{statistics.median(times[f]):.1f} ({min(times[f]):.1f}-{max(times[f]):.1f})" for f in times}
        print(f"| ResNet-{depth} | {compile_s[False]:.1f} | {compile_s[True]:.1f} | {cell[False]} | {cell[True]} "
              f"| {'yes' if same else 'NO'} |", flush=True)


def threefry_table(depths: list[int], batch: int, repeats: int) -> None:
    """Compile time of a model's initialisation and run time of its gate noise, Threefry rolled against unrolled."""
    from jax._src.random import threefry2x32  # pylint: disable=import-outside-toplevel
    from jax.interpreters import mlir  # pylint: disable=import-outside-toplevel

    rules = {"rolled": threefry2x32._threefry2x32_cpu_lowering_rule,  # pylint: disable=protected-access
             "unrolled": threefry2x32._threefry2x32_lowering_rule}  # pylint: disable=protected-access

    def use(name: str) -> None:
        mlir.register_lowering(threefry2x32.threefry2x32_p, rules[name], platform="cpu", inline=name == "rolled")
        jax.clear_caches()

    print(f"backend {jax.default_backend()}: Threefry-2x32 lowered as JAX's CPU rule (rolled) or unrolled; "
          f"init compile s; gate noise of one step (batch {batch}), median (min-max) ms over {repeats} runs")
    print("| model | init compile rolled | init compile unrolled | noise rolled | noise unrolled | same bits |")
    print("|---|---|---|---|---|---|")
    for depth in depths:
        model = cifar_resnet(depth)
        images = jnp.zeros((1, 32, 32, 3), jnp.float32)
        widths = [w for w in (16, 32, 64) for _ in range((depth - 2) // 6)]
        compile_s, times, results = {}, {}, {}
        for name in rules:
            use(name)
            init = jax.jit(lambda k: model.init({"params": k, "gate": k}, images, train=False))
            start = time.perf_counter()
            compiled = init.lower(jax.random.key(0)).compile()
            compile_s[name] = time.perf_counter() - start
            noise = jax.jit(lambda k: [jax.random.uniform(jax.random.fold_in(k, i), (batch, w))
                                       for i, w in enumerate(widths)])
            drawn = jax.block_until_ready(noise(jax.random.key(1)))
            times[name] = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(noise(jax.random.key(1)))
                times[name].append(1000 * (time.perf_counter() - start))
            results[name] = jax.tree.leaves(compiled(jax.random.key(0))) + drawn
        same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(*results.values()))
        cell = {n: f"{statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f})" for n, t in times.items()}
        print(f"| ResNet-{depth} | {compile_s['rolled']:.1f} | {compile_s['unrolled']:.1f} | {cell['rolled']} "
              f"| {cell['unrolled']} | {'yes' if same else 'NO'} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per repetition")
    p.add_argument("--repeats", type=int, default=5, help="alternating repetitions of each variant")
    p.add_argument("--batch_shaping", action="store_true",
                   help="time the batch-shaping loss unrolled against in loops instead")
    p.add_argument("--threefry", action="store_true",
                   help="time Threefry lowered rolled (JAX's CPU rule) against unrolled instead")
    args = p.parse_args(argv)
    if args.threefry:
        threefry_table(args.depths, args.batch, args.repeats)
        return
    if args.batch_shaping:
        batch_shaping_table(args.depths, args.batch, args.repeats)
        return
    print(f"backend {jax.default_backend()}, batch {args.batch}, float32, model-only train step; "
          f"median (min-max) ms/step over {args.repeats} alternating repetitions of {args.steps} steps")
    print("| model | materialise off | materialise on | on/off |")
    print("|---|---|---|---|")
    for depth in args.depths:
        variants = {flag: list(make_step(depth, args.batch, flag)) for flag in (False, True)}
        times: dict[bool, list[float]] = {False: [], True: []}
        for flag, (step, state) in variants.items():  # compile and warm up
            variants[flag][1] = jax.block_until_ready(step(state, jax.random.key(0)))
        for r in range(args.repeats):
            for flag in (False, True) if r % 2 == 0 else (True, False):
                step, state = variants[flag]
                start = time.perf_counter()
                for i in range(args.steps):
                    state = step(state, jax.random.key(i))
                variants[flag][1] = jax.block_until_ready(state)
                times[flag].append(1000 * (time.perf_counter() - start) / args.steps)
        off, on = (statistics.median(times[f]) for f in (False, True))
        cell = {f: f"{statistics.median(times[f]):.0f} ({min(times[f]):.0f}-{max(times[f]):.0f})"
                for f in (False, True)}
        print(f"| ResNet-{depth} | {cell[False]} | {cell[True]} | {on / off:.2f} |", flush=True)


if __name__ == "__main__":
    main()
