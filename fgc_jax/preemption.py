"""SIGTERM and Ctrl-C (SIGINT) of a training run; imports nothing heavy, so `main` installs it first.

SIGTERM (preemption) sets the flag at any time: the loop saves a checkpoint of the next step
boundary and returns. Ctrl-C depends on how far the run is:

- before the first training step (the command's imports, flag parsing, data preparation, the
  first restore, the first compilation) nothing has been trained, so it stops the process at
  once with one line (`_stop_now`; where a library caller made the flag: a `KeyboardInterrupt`);
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

import os
import signal
import sys

_INTERRUPTED = "interrupted (Ctrl-C): "
_STOPPED_STARTING = "stopped while the command started, nothing was saved; rerun the same command"


def _stop_now(signum, frame, reason: str = _STOPPED_STARTING) -> None:
    """SIGINT while a command starts: one line, then SIGINT's default action.

    Raising `KeyboardInterrupt` there instead lands wherever the main thread is: inside an
    extension module's import it surfaces as an `ImportError` with a traceback, and inside a
    callback from C++ (JAX's compilation) it can be printed as "ignored" while the run goes on.
    Nothing of the run is lost: nothing has been trained, the workdir's `flock` dies with the
    process, and every file written before training is renamed into place only when complete.
    """
    del frame
    print(_INTERRUPTED + reason, file=sys.stderr, flush=True)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def print_interrupts_in_one_line() -> None:
    """Makes Ctrl-C print one line instead of a traceback, from here on; Python then exits as
    killed by SIGINT (the shell's status 130).

    Commands call it first thing, before their heavy imports: until `started()`, a Ctrl-C stops
    the process at once with one line; after it, a `KeyboardInterrupt` that reaches the top
    prints its message as one line (absl's `--verbosity=1` keeps the traceback).
    """
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored, not taken
        signal.signal(signal.SIGINT, _stop_now)
    if getattr(sys.excepthook, "prints_interrupts_in_one_line", False):
        return
    hook = sys.excepthook

    def excepthook(kind, value, traceback):
        flags = getattr(sys.modules.get("absl.flags"), "FLAGS", None)
        verbose = flags is not None and flags.is_parsed() and flags.verbosity >= 1
        if not issubclass(kind, KeyboardInterrupt) or verbose:
            return hook(kind, value, traceback)
        reason = " ".join(str(value).split()) or "stopped before it finished; rerun the same command"
        print(_INTERRUPTED + reason, file=sys.stderr, flush=True)
        return None

    excepthook.prints_interrupts_in_one_line = True
    sys.excepthook = excepthook


def started() -> None:
    """A command's imports are done: from here on Ctrl-C raises `KeyboardInterrupt` (Python's
    usual handler), so the command's own clean-up runs."""
    if signal.getsignal(signal.SIGINT) is _stop_now:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _jax_takes_sigterm() -> bool:
    """Whether `jax.distributed.initialize` started JAX's preemption service, which handles SIGTERM."""
    jax = sys.modules.get("jax")  # never imported here: a handler must not start JAX
    try:
        return jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service
    except AttributeError:  # not imported, or still importing
        return False


class PreemptionFlag:
    """Set by SIGTERM, and by Ctrl-C once training is under way (see the module docstring)."""

    def __init__(self):
        self._raised = False
        self._saving_on_interrupt = False
        self.interrupted = False  # a Ctrl-C stops the run, not SIGTERM
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._previous_interrupt = signal.getsignal(signal.SIGINT)  # None: set outside Python
        self._takes_interrupts = self._previous_interrupt not in (signal.SIG_IGN, None)
        # Made by a command before its imports (`print_interrupts_in_one_line`): a Ctrl-C before
        # training stops the process at once (`_stop_now`); in a library caller's process it
        # raises `KeyboardInterrupt` instead.
        self._in_command = self._previous_interrupt is _stop_now
        if self._takes_interrupts:
            signal.signal(signal.SIGINT, self._handle_interrupt)

    def _handle(self, signum, frame):
        del signum, frame
        print("SIGTERM received: the run stops cleanly at the next step boundary", file=sys.stderr,
              flush=True)
        self._raised = True

    def _handle_interrupt(self, signum, frame):
        to_jax = _jax_takes_sigterm()
        # Before the first trained step there is nothing to save: stop at once; but processes of
        # a multi-process run all stop at one step boundary (JAX's sync point, see `raised`).
        if not (self._saving_on_interrupt or to_jax):
            reason = ("stopped before training began, nothing was saved; rerun the same command to "
                      "start (or resume) the run")
            if self._in_command:
                _stop_now(signum, frame, reason)
                return
            raise KeyboardInterrupt(reason)
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
