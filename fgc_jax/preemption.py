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
        """Whether any process was sent SIGTERM (all processes must stop at the same step)."""
        import jax  # pylint: disable=import-outside-toplevel
        if jax.process_count() == 1:
            return self._raised
        import numpy as np  # pylint: disable=import-outside-toplevel
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        return bool(np.any(multihost_utils.process_allgather(np.asarray(self._raised))))

    def restore(self) -> None:
        """Puts back the SIGTERM handler that was there before."""
        signal.signal(signal.SIGTERM, self._previous)
