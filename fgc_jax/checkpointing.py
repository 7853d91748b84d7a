"""Orbax checkpoints of the whole train state: keep the latest K and the best, resume exactly.

A checkpoint holds three items: `state` (the train-state pytree, arrays restored with the
shardings of a template), `meta` (JSON: the model's identity, the data position, and a
fingerprint of every array) and orbax's `metrics` (the evaluation top-1 that ranks it for
"best"; persisted, so the best checkpoint survives restarts).

Integrity: `save` refuses a state with a non-finite array and records each array's
fingerprint (`fingerprints`); `restore` recomputes them and raises `CorruptCheckpointError`
naming the checkpoint and the array on any difference, or on a non-finite array. A checkpoint
that cannot be used is never overwritten or deleted: `restore_newest_good` either stops, or
(`config.checkpoint_fallback`) moves it to `WORKDIR/quarantine/` and resumes from the newest
checkpoint that verifies, saying so in an ERROR line.
"""
from __future__ import annotations

import errno
import functools
import logging as std_logging
import os
import re
import time
import weakref
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax import lax
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy

from fgc_jax import storage

BEST_METRIC = "top1"
QUARANTINE = "quarantine"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; it is never overwritten or deleted."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are unreadable or differ from what was saved (not a config mismatch)."""


class SaveError(RuntimeError):
    """Writing a checkpoint failed (e.g. the disk is full); the run stops."""


def model_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config fields that fix the shapes of a checkpoint's arrays."""
    return {"dataset": config.dataset, "arch": config.model.arch, "depth": config.model.depth,
            "gated": config.model.gated, "gate_hidden": config.model.gate_hidden,
            "fgc_blocks": list(config.fgc.blocks)}


# ----------------------------------------------------------------------------------------
# Fingerprints.


def _path_name(path: tuple[Any, ...]) -> str:
    """'params/layer1_0/conv1/kernel' for a pytree key path of dicts, lists and dataclasses."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def _words(x: jax.Array) -> jax.Array:
    """The array's bytes as uint32 words (8/16-bit elements widened), flattened."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).ravel()
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()


@jax.jit
def _fingerprint_leaves(leaves: list[jax.Array]) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    out = []
    for x in leaves:
        w = _words(x)
        odd = lax.iota(jnp.uint32, w.size) * jnp.uint32(2) + jnp.uint32(1)
        finite = jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
        out.append((jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * odd, dtype=jnp.uint32), finite))
    return out


def _local(x: jax.Array) -> np.ndarray:
    """A replicated result as NumPy, also when it spans several processes."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def fingerprints(tree: Any) -> tuple[dict[str, str], list[str]]:
    """({array path: 16-hex-digit fingerprint}, [paths of arrays with NaN/inf]) of a pytree.

    The fingerprint is two 32-bit sums of the array's words, one of them weighted by odd
    position factors: any change of a single word changes it, and it is computed where the
    array lives (on its devices, shards included) in one pass over memory. A checksum against
    storage faults, not a cryptographic hash.
    """
    named = [(_path_name(p), x) for p, x in jax.tree.leaves_with_path(tree)]
    results = _fingerprint_leaves([jnp.asarray(x) if isinstance(x, np.ndarray) else x
                                   for _, x in named])
    prints, non_finite = {}, []
    for (name, _), (plain, weighted, finite) in zip(named, results):
        prints[name] = f"{int(_local(plain)):08x}{int(_local(weighted)):08x}"
        if not bool(_local(finite)):
            non_finite.append(name)
    return prints, non_finite


def _summary(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def verify(tree: Any, expected: Mapping[str, str] | None, where: str) -> None:
    """Raises `CorruptCheckpointError` if an array of `tree` differs from its saved fingerprint
    or holds NaN/inf. Only arrays named in `expected` are compared (a subtree may be given)."""
    prints, non_finite = fingerprints(tree)
    if expected is None:
        logging.warning("%s carries no fingerprints (saved by an older version); not verified", where)
    else:
        differ = [name for name, value in prints.items() if name in expected and expected[name] != value]
        missing = [name for name in prints if name not in expected]
        if differ or missing:
            raise CorruptCheckpointError(
                f"{where} failed its integrity check: array {_summary(differ or missing)} "
                f"{'differs from the fingerprint taken when it was saved' if differ else 'has no fingerprint'}"
                " (the files were altered or damaged on storage)")
    if non_finite:
        raise CorruptCheckpointError(f"{where} holds non-finite values in {_summary(non_finite)}")


# ----------------------------------------------------------------------------------------
# Saving.


class _OrbaxSaveErrors(std_logging.Filter):
    """Takes orbax's tracebacks of a failed background save off the log and keeps their message."""

    MARKS = ("background save thread", "Checkpointer failed", "_SignalingThread", "Save Finalize thread")

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: std_logging.LogRecord) -> bool:
        if (record.exc_info and "/orbax/" in record.pathname
                and any(mark in record.getMessage() for mark in self.MARKS)):
            error = record.exc_info[1]
            self.messages.append(f"{type(error).__name__}: {error}")
            return False
        return True


@functools.cache
def _save_errors() -> _OrbaxSaveErrors:
    catcher = _OrbaxSaveErrors()
    logging.get_absl_logger().addFilter(catcher)
    return catcher


# The step of each manager's save in flight, until `check_saves` has seen it committed.
_IN_FLIGHT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def create_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """A manager over `workdir/checkpoints` keeping the last `keep_checkpoints` and the best top-1.

    `best_fn` makes orbax write each checkpoint's metrics next to it and read them back when a
    later run opens the directory, so "best" is known across restarts.
    """
    _save_errors().messages.clear()
    policy = preservation_policy.AnyPreservationPolicy([
        preservation_policy.LatestN(n=config.keep_checkpoints),
        preservation_policy.BestN(get_metric_fn=lambda metrics: metrics[BEST_METRIC], n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                           best_fn=lambda metrics: metrics[BEST_METRIC], best_mode="max",
                                           enable_async_checkpointing=True,
                                           # a save cut short (kill, second Ctrl-C) left a temporary
                                           # directory; orbax never lists it as a step
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(storage.path(workdir) / "checkpoints", options=options,
                                 item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: Mapping[str, Any],
         metrics: Mapping[str, float] | None = None) -> None:
    """Saves asynchronously, with a fingerprint of every array in `meta['fingerprints']`.

    Raises FloatingPointError, writing nothing, if an array holds NaN/inf; `SaveError` if the
    write cannot start or an earlier background write failed. `metrics` (with top1) make the
    checkpoint a candidate for 'best'.
    """
    prints, non_finite = fingerprints(state)
    if non_finite:
        raise FloatingPointError(
            f"the state at step {step} holds non-finite values in {_summary(non_finite)}; it was not "
            "saved")
    check_saves(manager, wait=True)
    try:
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta, fingerprints=prints))),
            metrics=dict(metrics) if metrics else None, force=True)
    except Exception as e:  # orbax raises many types (OSError, ValueError, ...)
        raise SaveError(_save_failed(manager, step, f"{type(e).__name__}: {e}", getattr(e, "errno", None))) from e
    _IN_FLIGHT[manager] = step


# What to do about a failed save, by its errno; anything else: "Fix the directory".
_REMEDIES = {
    errno.ENOSPC: "Free space on its disk",
    errno.EDQUOT: "Free space within your disk quota",
    errno.EACCES: "Make the directory writable for this user",
    errno.EPERM: "Make the directory writable for this user",
    errno.EROFS: "Use a --workdir on a writable file system",
}


def _errno_of(reason: str) -> int | None:
    """The errno a library's error text names: tensorstore's `os_error_code='28'`, Python's
    `[Errno 28]`, or the C strerror text itself ("No space left on device")."""
    found = re.search(r"os_error_code\W*(\d+)|\[Errno (\d+)\]", reason)
    if found:
        return int(found.group(1) or found.group(2))
    return next((code for code in _REMEDIES if os.strerror(code).lower() in reason.lower()), None)


def _save_failed(manager: ocp.CheckpointManager, step: int, reason: str, code: int | None = None) -> str:
    """The one-line SaveError message: the cause in words (from `code` or the errno `reason`
    names), the path and what to do; the library's own text is logged at --verbosity=1."""
    logging.debug("saving checkpoint %d failed; the library said: %s", step, reason)
    code = code or _errno_of(reason)
    cause = os.strerror(code).lower() if code else f"the write did not complete ({reason.split(':')[0]})"
    return (f"saving checkpoint {step} to {manager.directory} failed: {cause}; the run stopped. "
            f"{_REMEDIES.get(code, 'Fix the directory')}, then rerun the same command: "
            "it resumes from the newest complete checkpoint (--verbosity=1 shows the library's error)")


def check_saves(manager: ocp.CheckpointManager, wait: bool = False) -> None:
    """Raises `SaveError` if the last background save did not commit its checkpoint.

    `wait`: first wait for a save in flight (the loop does so after the step that follows a
    save, so a save overlaps one train step and a failed one stops the run within one step);
    otherwise a save still running is looked at next time.
    """
    step = _IN_FLIGHT.get(manager)
    if step is None or (not wait and manager.is_saving_in_progress()):
        return
    del _IN_FLIGHT[manager]
    catcher = _save_errors()
    try:
        manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
        catcher.messages.append(f"{type(e).__name__}: {e}")
    committed = (manager.directory / str(step)).exists()
    if catcher.messages or not committed:
        reason = catcher.messages[0] if catcher.messages else "the checkpoint was not committed"
        catcher.messages.clear()
        raise SaveError(_save_failed(manager, step, reason))


def wait(manager: ocp.CheckpointManager) -> None:
    """Waits for background saves, raising `SaveError` if one failed."""
    check_saves(manager, wait=True)
    manager.wait_until_finished()


# ----------------------------------------------------------------------------------------
# Restoring.


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The JSON item of checkpoint `step`."""
    try:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many types for unreadable files
        raise CorruptCheckpointError(
            f"checkpoint {step} in {manager.directory} has no readable metadata "
            f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from e


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            config: ml_collections.ConfigDict) -> tuple[Any, dict[str, Any]]:
    """Restores and verifies checkpoint `step` into arrays shaped and sharded like `abstract_state`.

    Raises `CheckpointError` for a checkpoint of another model, `CorruptCheckpointError` for one
    that cannot be read, differs from its fingerprints or holds NaN/inf.
    """
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
        raise CorruptCheckpointError(
            f"checkpoint {step} in {manager.directory} cannot be restored ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]})") from e
    verify(restored["state"], meta.get("fingerprints"), f"checkpoint {step} in {manager.directory}")
    return restored["state"], meta


def restore_newest_good(manager: ocp.CheckpointManager, abstract_state: Any,
                        config: ml_collections.ConfigDict, workdir: str
                        ) -> tuple[Any, dict[str, Any], int] | None:
    """(state, meta, step) of the newest checkpoint that verifies; None if there is none at all.

    A corrupt checkpoint stops the run (`CorruptCheckpointError`, files untouched) unless
    `config.checkpoint_fallback`: then the next older one is tried, and once one verifies, the
    newer bad ones are moved (not deleted) to `workdir/quarantine/STEP-TIME` and an ERROR line
    says so. If none verifies, all are left where they are and the run stops.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    bad: list[tuple[int, str]] = []
    for step in steps:
        try:
            state, meta = restore(manager, step, abstract_state, config)
        except CorruptCheckpointError as e:
            if not config.checkpoint_fallback:
                raise CorruptCheckpointError(
                    f"{e}. It was left untouched: move it away to resume from an earlier one (or set "
                    "--config.checkpoint_fallback=True to do so automatically), or use another "
                    "--workdir") from e
            logging.error("SKIPPING CHECKPOINT %d: %s", step, e)
            bad.append((step, str(e)))
            continue
        if bad:
            _quarantine(manager, [s for s, _ in bad], workdir)
            logging.error("RESUMING FROM OLDER CHECKPOINT %d: newer checkpoint(s) %s failed their check "
                          "and were moved to %s", step, [s for s, _ in bad],
                          storage.path(workdir) / QUARANTINE)
        return state, meta, step
    if bad:
        raise CorruptCheckpointError(
            f"no checkpoint in {manager.directory} passes its check ({bad[0][1]}; and "
            f"{len(bad) - 1} more); all were left untouched: move them away to start over, or use "
            "another --workdir")
    return None


def _quarantine(manager: ocp.CheckpointManager, steps: list[int], workdir: str) -> None:
    """Moves checkpoints out of orbax's directory (so no later save reuses or deletes them)."""
    if jax.process_index() == 0:
        target = storage.path(workdir) / QUARANTINE
        target.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        for step in steps:  # on Cloud Storage a copy of every object, then their deletion
            (storage.path(manager.directory) / str(step)).rename(target / f"{step}-{stamp}")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("fgc_jax_quarantine")
    manager.reload()


def restore_model_variables(workdir: str, step: int | None = None) -> tuple[dict[str, Any], int]:
    """`{'params', 'batch_stats'}` of checkpoint `step` (default: latest) in `workdir`, as NumPy.

    For evaluation and for starting the FGC stage from a BAS-stage run; no template needed.
    The arrays are verified against the checkpoint's fingerprints.
    """
    directory = storage.path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{workdir} holds no checkpoints (expected {directory}); "
                                "train with `python -m fgc_jax.main --workdir=...` first")
    with ocp.CheckpointManager(directory, item_names=("state", "meta"),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise FileNotFoundError(f"no checkpoint {'at all' if step is None else step} in {directory}; "
                                    f"available steps: {list(manager.all_steps())}")
        meta = read_meta(manager, step)
        try:
            state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        except Exception as e:
            raise CorruptCheckpointError(f"checkpoint {step} in {directory} cannot be read: {e}") from e
    state = state["state"]
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    variables = jax.tree.map(lambda x: jax.device_get(x), variables)
    verify(variables, meta.get("fingerprints"), f"checkpoint {step} in {directory}")
    return variables, step
