"""Scalar metrics to TensorBoard and to `workdir/metrics.jsonl`, from process 0 only.

clu's metric writers import TensorFlow; tensorboardX writes the same event files without it.
A run that resumes from step S first drops what an interrupted run wrote after S: rows of
`metrics.jsonl` with a larger step are removed (the file is rewritten atomically), and the
TensorBoard writer starts with `purge_step=S + 1`, which tells TensorBoard to discard that
run's events from step S + 1 on. So the logs of a resumed run equal an uninterrupted run's.

On Cloud Storage (`gs://` workdirs), whose objects cannot be appended to, `metrics.jsonl` is
kept in memory and its object replaced whole at every write, as tensorboardX does with its
`gs://` event files: each write uploads the whole log so far (about 0.5 kB a row).
"""
from __future__ import annotations

import json
import math
import sys
from typing import Mapping

import jax
from etils import epath

from fgc_jax import storage


def _import_summary_writer() -> type:
    """tensorboardX's SummaryWriter, imported without PyTorch.

    tensorboardX imports PyTorch where it is installed (the `torch` extra), only to name
    `torch.Tensor` in type hints: 2.5 s of every training command's start on 2 CPU cores. While
    tensorboardX loads, `import torch` fails (a None entry in `sys.modules`), so it goes without;
    the entry is removed right after, and PyTorch stays importable (fgc_jax.torch_import). The
    writer is given Python floats only.
    """
    masked = "torch" not in sys.modules
    if masked:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    finally:
        if masked:
            del sys.modules["torch"]
    return SummaryWriter


SummaryWriter = _import_summary_writer()

METRICS_FILE = "metrics.jsonl"


def truncate_jsonl(path: epath.Path, last_step: int) -> str:
    """Keeps the rows of `path` with step <= `last_step` (and drops a torn last line), rewriting
    it whole if any was dropped; returns the rows kept."""
    if not path.exists():
        return ""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    if len(kept) != len(lines):
        storage.write_text(path, "".join(kept))
    return "".join(kept)


class MetricWriter:
    """Writes `{name: scalar}` per step; a no-op on every process but 0.

    `start_step`: the step the run starts (or resumes) from; what was logged after it is dropped.
    """

    def __init__(self, workdir: str, start_step: int = 0):
        self._active = jax.process_index() == 0
        if not self._active:
            return
        directory = storage.path(workdir)
        directory.mkdir(parents=True, exist_ok=True)
        self._path = directory / METRICS_FILE
        kept = truncate_jsonl(self._path, start_step)
        self._tensorboard = SummaryWriter(str(directory / "tensorboard"), purge_step=start_step + 1)
        # Appended to on a local disk; rewritten whole from `_rows` on an object store.
        self._rows = [kept] if storage.is_remote(workdir) else None
        self._jsonl = None if storage.is_remote(workdir) else self._path.open("a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Appends one row to metrics.jsonl and one TensorBoard scalar per name."""
        if not self._active:
            return
        record = {"step": int(step)}
        for name, value in scalars.items():
            value = float(value)
            record[name] = value if math.isfinite(value) else str(value)
            self._tensorboard.add_scalar(name, value, int(step))
        self._tensorboard.flush()  # on disk before any checkpoint of a later step (kill -9 safe)
        row = json.dumps(record) + "\n"
        if self._jsonl is None:
            self._rows.append(row)
            storage.write_text(self._path, "".join(self._rows))
        else:
            self._jsonl.write(row)
            self._jsonl.flush()

    def close(self) -> None:
        """Flushes and closes both outputs."""
        if self._active:
            self._tensorboard.close()
            if self._jsonl is not None:
                self._jsonl.close()
