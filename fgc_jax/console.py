"""What `python -m fgc_jax.main` prints: fgc_jax's own progress on process 0, and warnings.

`install()` puts `ConsoleFilter` on absl's handler (which every Python logger
reaches): WARNING and above from every process and library, except known-harmless library
warnings; INFO only from fgc_jax's own files and only on process 0. `StepClock` times the
training steps alone (no compilation, evaluation or checkpointing) for img/s and the ETA.
`startup_summary` is the few lines a run starts with.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Callable, Iterator

from absl import logging as absl_logging
import jax

from fgc_jax import input_pipeline, macs

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

# (path fragment, message start) of library warnings that say nothing about the run.
HARMLESS_WARNINGS = (
    # orbax, at every save without metrics (all but the evaluated ones): the best checkpoint
    # is chosen among those that have them, which is what we want.
    (f"{os.sep}orbax{os.sep}", "Requested `tracked_metric`; did not provide metrics"),
)


class ConsoleFilter(logging.Filter):
    """Keeps WARNING+ from everyone (bar `HARMLESS_WARNINGS`), INFO from fgc_jax on process 0."""

    def __init__(self, process_index: int):
        super().__init__()
        self.process_index = process_index

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            message = str(record.msg)
            return not any(path in record.pathname and message.startswith(start)
                           for path, start in HARMLESS_WARNINGS)
        return self.process_index == 0 and os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)


def install(process_index: int = 0) -> ConsoleFilter:
    """Adds a `ConsoleFilter` to absl's log handler; returns it (set its `process_index` once known)."""
    console_filter = ConsoleFilter(process_index)
    absl_logging.get_absl_handler().addFilter(console_filter)
    return console_filter


class StepClock:
    """Wall-clock seconds of training steps only, between `lap`s and in total.

    Time spent inside `excluded()` (compiling steps, evaluation, checkpoints) does not count;
    `count()` records a step whose time does. `clock`: the time source (tests pass a fake).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._since = clock()
        self._excluded = 0.0
        self._steps = 0
        self.total_steps = 0
        self.total_seconds = 0.0

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """A span whose time is not training time."""
        start = self._clock()
        try:
            yield
        finally:
            self._excluded += self._clock() - start

    def count(self) -> None:
        """One timed training step."""
        self._steps += 1

    def lap(self) -> tuple[int, float]:
        """(timed steps, their seconds) since the last lap; starts the next one."""
        now = self._clock()
        steps, seconds = self._steps, max(now - self._since - self._excluded, 0.0)
        self.total_steps += steps
        self.total_seconds += seconds
        self._since, self._excluded, self._steps = now, 0.0, 0
        return steps, seconds

    def eta(self, remaining_steps: int) -> str:
        """Remaining training time at the mean timed step so far, as H:MM:SS ('?' before any)."""
        if not self.total_steps:
            return "?"
        seconds = round(remaining_steps * self.total_seconds / self.total_steps)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def startup_summary(model_name: str, info: input_pipeline.DatasetInfo, mesh: jax.sharding.Mesh,
                    batch_size: int, steps_per_epoch: int, total_steps: int, cost: macs.CostModel
                    ) -> str:
    """The lines a run starts with: model, devices and mesh, data, size and MACs."""
    device = mesh.devices.flat[0]
    mesh_shape = ", ".join(f"{name}={size}" for name, size in mesh.shape.items())
    gated = f", gates {cost.gate_macs:,}" if cost.num_blocks else ""
    return "\n".join([
        f"{model_name}",
        f"  devices  {mesh.size} x {device.platform} ({device.device_kind}) in "
        f"{jax.process_count()} process(es), mesh ({mesh_shape})",
        f"  data     {info.num_train:,} train / {info.num_test:,} test examples, batch {batch_size}, "
        f"{steps_per_epoch} steps an epoch, {total_steps} steps",
        f"  model    {cost.params:,} parameters; MACs per example: dense {cost.dense_macs:,}{gated}",
    ])
