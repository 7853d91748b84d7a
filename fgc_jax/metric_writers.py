"""Scalar metrics to TensorBoard and to `workdir/metrics.jsonl`, from process 0 only.

clu's metric writers import TensorFlow; tensorboardX writes the same event files without it.
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
from tensorboardX import SummaryWriter


class MetricWriter:
    """Writes `{name: scalar}` per step; a no-op on every process but 0."""

    def __init__(self, workdir: str):
        self._active = jax.process_index() == 0
        if not self._active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self._active:
            return
        record = {"step": int(step)}
        for name, value in scalars.items():
            value = float(value)
            record[name] = value if math.isfinite(value) else str(value)
            self._tensorboard.add_scalar(name, value, int(step))
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._active:
            self._tensorboard.close()
            self._jsonl.close()
