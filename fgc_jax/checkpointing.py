"""Orbax checkpoints of the whole train state: keep the latest K and the best, resume exactly.

A checkpoint holds two items: `state` (the train-state pytree, arrays restored with the
shardings of a template) and `meta` (JSON: the model's identity, the data position and
the epoch's evaluation metrics). Restoring validates the model identity first, so a
checkpoint of another architecture fails with a message rather than a shape error, and a
checkpoint that cannot be read is reported and left exactly where it is.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

BEST_METRIC = "top1"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; it is never overwritten or deleted."""


def model_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config fields that fix the shapes of a checkpoint's arrays."""
    return {"dataset": config.dataset, "arch": config.model.arch, "depth": config.model.depth,
            "gated": config.model.gated, "gate_hidden": config.model.gate_hidden,
            "fgc_blocks": list(config.fgc.blocks)}


def create_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """A manager over `workdir/checkpoints` keeping the last `keep_checkpoints` and the best top-1."""
    policy = preservation_policy.AnyPreservationPolicy([
        preservation_policy.LatestN(n=config.keep_checkpoints),
        preservation_policy.BestN(get_metric_fn=lambda metrics: metrics[BEST_METRIC], n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options,
                                 item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: Mapping[str, Any],
         metrics: Mapping[str, float] | None = None) -> None:
    """Saves asynchronously; `metrics` (with top1) make the checkpoint a candidate for 'best'."""
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(dict(meta))),
                 metrics=dict(metrics) if metrics else None, force=True)


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The JSON item of checkpoint `step`."""
    try:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many types for unreadable files
        raise CheckpointError(
            f"checkpoint {step} in {manager.directory} has no readable metadata ({e}); it was left "
            "untouched: move it away to start over, or point --workdir elsewhere") from e


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            config: ml_collections.ConfigDict) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint `step` into arrays shaped and sharded like `abstract_state`."""
    meta = read_meta(manager, step)
    expected = model_identity(config)
    if meta.get("model") != expected:
        raise CheckpointError(
            f"checkpoint {step} in {manager.directory} is of model {meta.get('model')}, but the config "
            f"describes {expected}; use the config it was trained with, or another --workdir")
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {step} in {manager.directory} cannot be restored ({type(e).__name__}: {e}); "
            "it was left untouched: move it away to resume from an earlier one, or start a new "
            "--workdir") from e
    return restored["state"], meta


def restore_model_variables(workdir: str, step: int | None = None) -> tuple[dict[str, Any], int]:
    """`{'params', 'batch_stats'}` of checkpoint `step` (default: latest) in `workdir`, as NumPy.

    For evaluation and for starting the FGC stage from a BAS-stage run; no template needed.
    """
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{workdir} holds no checkpoints (expected {directory}); "
                                "train with `python -m fgc_jax.main --workdir=...` first")
    with ocp.CheckpointManager(directory, item_names=("state", "meta"),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise FileNotFoundError(f"no checkpoint {'at all' if step is None else step} in {directory}; "
                                    f"available steps: {list(manager.all_steps())}")
        try:
            state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        except Exception as e:
            raise CheckpointError(f"checkpoint {step} in {directory} cannot be read: {e}") from e
    state = state["state"]
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    return jax.tree.map(lambda x: jax.device_get(x), variables), step
