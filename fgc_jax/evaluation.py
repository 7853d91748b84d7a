"""Evaluation over the test split: accuracy, dynamic MACs (FGC_SPEC §4), gate statistics.

`evaluate_model(model, variables, config, mesh, cost)` runs the eval-mode network over the
test split (global batches sharded over the mesh's data axis, the padded last batch masked
out exactly) and returns per-test-set numbers, every one of them a mean or percentile over
examples, never over batches. The trainer and `python -m fgc_jax.evaluate` both use it.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from fgc_jax import compilation, input_pipeline, macs


class EvaluationError(RuntimeError):
    """Evaluation cannot run as asked (wrong checkpoint, missing data, ...); the message says why."""


def macs_percentiles(values: np.ndarray, percentiles: Sequence[int] = (5, 50, 95)) -> dict[str, float]:
    """{'p5', 'p50', 'p95'} of per-example MACs (NumPy's linear interpolation)."""
    quantiles = np.percentile(np.asarray(values, np.float64), percentiles)
    return {f"p{p}": float(v) for p, v in zip(percentiles, quantiles)}


@functools.lru_cache(maxsize=8)
def _eval_step(model, mesh: jax.sharding.Mesh, collect: bool):
    """A jitted eval forward pass returning per-example outputs, replicated on every device."""
    replicated = NamedSharding(mesh, P())

    def step(variables, batch):
        logits, gate_outputs = model.apply(variables, batch["image"], train=False)
        logits = logits.astype(jnp.float32)
        labels = batch["label"]
        _, top = jax.lax.top_k(logits, min(5, logits.shape[-1]))
        prediction = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if gate_outputs:
            density = jnp.stack([jnp.mean(o.gate.astype(jnp.float32), axis=-1) for o in gate_outputs], -1)
        else:
            density = jnp.zeros((logits.shape[0], 0), jnp.float32)
        out = {"mask": batch["mask"], "label": labels, "prediction": prediction,
               "correct1": prediction == labels, "correct5": jnp.any(top == labels[:, None], axis=-1),
               "density": density}
        if collect:
            out["feature"] = tuple(o.feature.astype(jnp.float32) for o in gate_outputs)
            out["log_alpha"] = tuple(o.log_alpha.astype(jnp.float32) for o in gate_outputs)
            out["gate"] = tuple(o.gate > 0.5 for o in gate_outputs)
        return out

    return jax.jit(step, out_shardings=replicated)


def evaluate_model(model, variables: Mapping[str, Any], config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh, cost: macs.CostModel, *, collect: bool = False
                   ) -> dict[str, Any]:
    """Evaluates `model` (eval mode) with `variables` on the test split of `config.dataset`.

    Global batches of `config.eval_batch_size` are sharded over `mesh`'s 'data' axis;
    variables are replicated. Returns (Python numbers and lists):
      num_examples, top1, top5 (fractions), mean_macs (dynamic, spec §4), dense_macs,
      gate_macs, head_macs, total_macs (= mean_macs + head_macs), pruning_ratio
      (1 - mean_macs / dense_macs), block_density (per gated block, mean fraction of
      gates on), gate_density (fraction of all gate channels on), macs_percentiles
      {p5, p50, p95} over per-example MACs, seconds.
    With `collect=True` the result also holds 'per_example': NumPy arrays over the test
    examples in order — label, prediction, correct1, correct5, macs, density
    [N, blocks], and per gated block lists feature, log_alpha (float32) and gate (bool).
    """
    start = time.perf_counter()
    step = _eval_step(model, mesh, collect)
    variables = jax.device_put({"params": variables["params"],
                                "batch_stats": variables.get("batch_stats", {})},
                               NamedSharding(mesh, P()))
    parts: list[dict[str, Any]] = []

    def fetch(out) -> None:
        out = jax.device_get(out)
        mask = np.asarray(out.pop("mask"), bool)
        parts.append(jax.tree.map(lambda x: np.asarray(x)[mask], out))

    pending = None
    for local in input_pipeline.eval_batches(config, global_batch_size=config.eval_batch_size):
        with compilation.matmul_precision(config):
            out = step(variables, input_pipeline.to_global(local, mesh))
        if pending is not None:
            fetch(pending)  # overlaps the host transfer with the next batch's computation
        pending = out
    if pending is not None:
        fetch(pending)
    if not parts:
        raise EvaluationError(f"the {config.dataset} test split yielded no batches")
    per = jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts)

    num = len(per["label"])
    if num == 0:
        raise EvaluationError(f"the {config.dataset} test split holds no examples")
    density = per["density"].astype(np.float64)
    if density.shape[1] != cost.num_blocks:
        raise ValueError(f"the model has {density.shape[1]} gated blocks but the cost model "
                         f"{cost.num_blocks}; build both from the same model")
    example_macs = (macs.macs_from_density(cost, density) if cost.num_blocks
                    else np.full(num, float(cost.dense_macs)))
    mean_macs = float(np.mean(example_macs))
    channels = np.array([layer.out_shape[-1] for layer in cost.layers if layer.kind == "conv1"
                         and layer.block is not None], np.float64)
    report: dict[str, Any] = {
        "num_examples": int(num),
        "top1": float(np.mean(per["correct1"])),
        "top5": float(np.mean(per["correct5"])),
        "mean_macs": mean_macs,
        "dense_macs": int(cost.dense_macs),
        "gate_macs": int(cost.gate_macs),
        "head_macs": int(cost.head_macs),
        "total_macs": mean_macs + cost.head_macs,
        "pruning_ratio": macs.pruning_ratio(cost, mean_macs),
        "gate_density": float(density.mean(0) @ channels / channels.sum()) if cost.num_blocks else 1.0,
        "block_density": [float(d) for d in density.mean(axis=0)],
        "macs_percentiles": macs_percentiles(example_macs),
        "seconds": time.perf_counter() - start,
    }
    if collect:
        per["macs"] = example_macs
        per["feature"], per["log_alpha"], per["gate"] = (list(per[k]) for k in ("feature", "log_alpha", "gate"))
        report["per_example"] = per
    return report
