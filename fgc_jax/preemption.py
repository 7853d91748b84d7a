"""SIGTERM and Ctrl-C (SIGINT) of a training run; imports nothing heavy, so `main` installs it first.

SIGTERM (preemption) sets the flag at any time: the loop saves a checkpoint of the next step
boundary and returns. Ctrl-C depends on how far the run is:

- before the first training step (flag parsing, data preparation, the first restore, the
  first compilation) nothing has been trained, so it stops the process at once: the usual
  `KeyboardInterrupt`, which `fgc_jax.cli.run` turns into one line;
- from the first step on (`save_on_interrupt`), it takes SIGTERM's path: a checkpoint of the
  next step boundary, then a `KeyboardInterrupt` naming that step. A second Ctrl-C stops the
  process at once (SIGINT's default action), without that checkpoint; the earlier ones are
  untouched, and orbax never lists a step whose save did not commit.

In a multi-process run, once the processes have joined, a Ctrl-C always takes SIGTERM's path,
passed on to JAX's preemption service: every process stops at the same step.

A process started with SIGINT ignored (a background job of a non-interactive shell) keeps
ignoring it, as Python itself does.
"""
from __future__ import annotations

import signal
import sys


def print_interrupts_in_one_line() -> None:
    """Makes a `KeyboardInterrupt` that reaches the top print one line (its message) instead of a
    traceback (absl's `--verbosity=1` keeps the traceback); Python then exits as killed by SIGINT.

    Commands call it first thing, before their heavy imports, so a Ctrl-C at any moment of
    start-up is one line.
    """
    if getattr(sys.excepthook, "prints_interrupts_in_one_line", False):
        return
    hook = sys.excepthook

    def excepthook(kind, value, traceback):
        flags = getattr(sys.modules.get("absl.flags"), "FLAGS", None)
        verbose = flags is not None and flags.is_parsed() and flags.verbosity >= 1
        if not issubclass(kind, KeyboardInterrupt) or verbose:
            return hook(kind, value, traceback)
        reason = " ".join(str(value).split()) or "stopped before it finished; rerun the same command"
        print(f"interrupted (Ctrl-C): {reason}", file=sys.stderr, flush=True)
        return None

    excepthook.prints_interrupts_in_one_line = True
    sys.excepthook = excepthook


def _jax_takes_sigterm() -> bool:
    """Whether `jax.distributed.initialize` started JAX's preemption service, which handles SIGTERM."""
    jax = sys.modules.get("jax")  # never imported here: a handler must not start JAX
    return (jax is not None and jax.distributed.is_initialized()
            and jax.config.jax_enable_preemption_service)


class PreemptionFlag:
    """Set by SIGTERM, and by Ctrl-C once training is under way (see the module docstring)."""

    def __init__(self):
        self._raised = False
        self._saving_on_interrupt = False
        self.interrupted = False  # a Ctrl-C stops the run, not SIGTERM
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._previous_interrupt = signal.getsignal(signal.SIGINT)  # None: set outside Python
        self._takes_interrupts = self._previous_interrupt not in (signal.SIG_IGN, None)
        if self._takes_interrupts:
            signal.signal(signal.SIGINT, self._handle_interrupt)

    def _handle(self, signum, frame):
        del signum, frame
        print("SIGTERM received: the run stops cleanly at the next step boundary", file=sys.stderr,
              flush=True)
        self._raised = True

    def _handle_interrupt(self, signum, frame):
        del frame
        to_jax = _jax_takes_sigterm()
        # Before the first trained step there is nothing to save: stop at once; but processes of
        # a multi-process run all stop at one step boundary (JAX's sync point, see `raised`).
        if not (self._saving_on_interrupt or to_jax):
            raise KeyboardInterrupt("stopped before training began, nothing was saved; rerun the same "
                                    "command to start (or resume) the run")
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C stops the process at once
        print("Ctrl-C received: the run stops at the next step boundary and saves a checkpoint "
              "(Ctrl-C again stops it at once, without that checkpoint)", file=sys.stderr, flush=True)
        self.interrupted = True
        if to_jax:
            signal.raise_signal(signal.SIGTERM)  # to JAX's handler: every process stops at one step
        else:
            self._raised = True

    def save_on_interrupt(self) -> None:
        """From now on a Ctrl-C stops the run at the next step boundary with a checkpoint."""
        self._saving_on_interrupt = True

    def raised_here(self) -> bool:
        """Whether this process was sent SIGTERM (no communication; usable before JAX starts)."""
        return self._raised

    def raised(self) -> bool:
        """Whether a single-process run was sent SIGTERM or Ctrl-C (no per-step collective).

        A multi-process run never reads this flag: there `jax.distributed.initialize` starts
        JAX's preemption service, which takes over SIGTERM (a Ctrl-C is passed on to it), and
        every process stops at its sync point (`CheckpointManager.reached_preemption`), the
        same step on all of them.
        """
        import jax  # pylint: disable=import-outside-toplevel
        return jax.process_count() == 1 and self._raised

    def raise_if_interrupted(self, step: int) -> None:
        """Ends a run that stopped at `step` for this flag: raises `KeyboardInterrupt` after a
        Ctrl-C (its checkpoint is saved by then), returns after SIGTERM."""
        if self.interrupted:
            raise KeyboardInterrupt(f"stopped at step {step} and saved a checkpoint of it; rerun the "
                                    "same command to resume")

    def restore(self) -> None:
        """Puts back the SIGTERM and SIGINT handlers that were there before."""
        signal.signal(signal.SIGTERM, self._previous)
        if self._takes_interrupts:
            signal.signal(signal.SIGINT, self._previous_interrupt)
