"""The SIGTERM flag of a training run; imports nothing heavy, so `main` installs it first."""
from __future__ import annotations

import signal
import sys


class PreemptionFlag:
    """Set by SIGTERM; the loop saves a checkpoint and returns at the next step boundary."""

    def __init__(self):
        self._raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        print("SIGTERM received: the run stops cleanly at the next step boundary", file=sys.stderr,
              flush=True)
        self._raised = True

    def raised_here(self) -> bool:
        """Whether this process was sent SIGTERM (no communication; usable before JAX starts)."""
        return self._raised

    def raised(self) -> bool:
        """Whether a single-process run was sent SIGTERM (no communication: no per-step collective).

        A multi-process run never reads this flag: there `jax.distributed.initialize` starts
        JAX's preemption service, which takes over SIGTERM, and every process stops at its
        sync point (`CheckpointManager.reached_preemption`), the same step on all of them.
        """
        import jax  # pylint: disable=import-outside-toplevel
        return jax.process_count() == 1 and self._raised

    def restore(self) -> None:
        """Puts back the SIGTERM handler that was there before."""
        signal.signal(signal.SIGTERM, self._previous)
