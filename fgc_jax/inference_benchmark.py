"""Wall-clock time of the dense, masked, skipping and slimmed programs of one gated ResNet.

Shared by `python -m fgc_jax.infer --benchmark` (a trained model) and
`benchmarks/inference.py` (ImageNet ResNets with gate densities forced by their biases).
XLA:CPU's time for the same convolutions moves with the program around them, so speedups
are taken against the fastest dense program at hand: the smaller of the dense network's
time and the skipping program's at full density (when that is measured). Programs are
timed interleaved, round after round, in one process, and each figure is a median.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fgc_jax import macs, skipping

PROGRAMS = ("dense", "masked", "skipping", "slimmed")


@dataclasses.dataclass
class Row:
    """One timed program: what it is, its median time and its MAC bound."""

    model: str
    batch: int
    density: float | None  # forced gate density, or the measured mean density of a real model
    program: str  # one of PROGRAMS
    ms: float
    mac_bound: float  # dense MACs / the MACs this program's gating leaves (fgc_jax.macs)
    speedup: float = float("nan")  # over the fastest dense program of its model and batch

    def record(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["speedup_over_bound"] = self.speedup / self.mac_bound
        return out


def ungated_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """A gated model's variables without its gate networks: the dense (ungated) model's."""
    return {col: {blk: {k: v for k, v in sub.items() if k != "gate"} if isinstance(sub, Mapping) else sub
                  for blk, sub in tree.items()} for col, tree in variables.items()}


def mac_bound(cost: macs.CostModel, density: np.ndarray, with_gates: bool = True) -> float:
    """dense MACs / mean per-example MACs at block densities [batch, blocks] (spec §4)."""
    per_example = macs.macs_from_density(cost, np.asarray(density, np.float64))
    if not with_gates:
        per_example = per_example - cost.gate_macs
    return cost.dense_macs / float(np.mean(per_example))


def time_interleaved(programs: Mapping[str, Callable[[], Any]], rounds: int, min_seconds: float
                     ) -> dict[str, float]:
    """Median ms per call of each thunk; each round runs every program for >= `min_seconds`."""
    calls = {}
    for name, run in programs.items():  # compile and warm up; calls per round from one timing
        jax.block_until_ready(run())
        start = time.perf_counter()
        jax.block_until_ready(run())
        calls[name] = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in programs}
    for _ in range(rounds):
        for name, run in programs.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                out = run()
            jax.block_until_ready(out)
            times[name].append(1e3 * (time.perf_counter() - start) / calls[name])
    return {name: statistics.median(t) for name, t in times.items()}


def add_speedups(rows: list[Row]) -> list[Row]:
    """Fills `speedup` against the fastest dense program of the same model and batch."""
    for row in rows:
        peers = [r for r in rows if (r.model, r.batch) == (row.model, row.batch)]
        base = [r.ms for r in peers if r.program == "dense"]
        base += [r.ms for r in peers if r.program == "skipping" and r.density == 1.0]
        row.speedup = min(base) / row.ms if base else float("nan")
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """The benchmark table: ms, speedup over the fastest dense, MAC bound, speedup / bound."""
    head = ("model", "batch", "density", "program", "ms", "speedup", "MAC bound", "speedup/bound")
    body = [(r.model, str(r.batch), "-" if r.density is None else f"{r.density:.2f}", r.program,
             f"{r.ms:.2f}", f"{r.speedup:.2f}x", f"{r.mac_bound:.2f}x", f"{r.speedup / r.mac_bound:.2f}")
            for r in rows]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in (head, *body)]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def model_programs(model: Any, variables: Mapping[str, Any], keep: Sequence[np.ndarray] | None,
                   buckets: int = skipping.DEFAULT_BUCKETS) -> dict[str, Callable[[Any], Any]]:
    """The four programs of a gated model as functions of images (all jitted).

    dense: the ungated model (gate networks dropped, every channel computed; Flax, BN unfolded);
    masked: the gated model's evaluation (`train=False`); skipping / slimmed: `fgc_jax.skipping`
    (slimmed only when `keep`, the calibration's ever-active channels, is given).
    """
    dense_model = model.clone(gated=False)
    dense_vars = jax.tree.map(jnp.asarray, ungated_variables(variables))
    gated_vars = jax.tree.map(jnp.asarray, variables)
    dense = jax.jit(lambda v, x: dense_model.apply(v, x, train=False))
    masked = jax.jit(lambda v, x: model.apply(v, x, train=False))
    arch = skipping.Architecture.of(model)
    params = skipping.fold_variables(arch, variables)
    out = {"dense": lambda x: dense(dense_vars, x), "masked": lambda x: masked(gated_vars, x),
           "skipping": skipping.bind(skipping.skipping_program(arch, buckets), params)}
    if keep is not None:
        out["slimmed"] = skipping.bind(skipping.dense_program(arch), skipping.slim_params(arch, params, keep))
    return out
