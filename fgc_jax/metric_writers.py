"""Scalar metrics to TensorBoard and to `workdir/metrics.jsonl`, from process 0 only.

clu's metric writers import TensorFlow; tensorboardX writes the same event files without it.
A run that resumes from step S first drops what an interrupted run wrote after S: rows of
`metrics.jsonl` with a larger step are removed (the file is rewritten atomically), and the
TensorBoard writer starts with `purge_step=S + 1`, which tells TensorBoard to discard that
run's events from step S + 1 on. So the logs of a resumed run equal an uninterrupted run's.
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"


def truncate_jsonl(path: str, last_step: int) -> int:
    """Keeps the rows of `path` with step <= `last_step` (and drops a torn last line);
    returns how many rows were removed."""
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return len(lines) - len(kept)


class MetricWriter:
    """Writes `{name: scalar}` per step; a no-op on every process but 0.

    `start_step`: the step the run starts (or resumes) from; what was logged after it is dropped.
    """

    def __init__(self, workdir: str, start_step: int = 0):
        self._active = jax.process_index() == 0
        if not self._active:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, METRICS_FILE)
        truncate_jsonl(path, start_step)
        self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)
        self._jsonl = open(path, "a", encoding="utf-8")

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
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        """Flushes and closes both outputs."""
        if self._active:
            self._tensorboard.close()
            self._jsonl.close()
