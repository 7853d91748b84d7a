"""Shared command-line behaviour of `fgc_jax.main`, `evaluate`, `cost` and `compare`.

A user error (bad flag, config field or file, unusable or unsafe checkpoint, busy workdir, bad data)
prints one `error: ...` line and exits with status 2; a run that fails for another reason it
can name (a failed save, divergence) prints one `error: ...` line and exits with status 1.
`--verbosity=1` (absl's flag) shows the traceback instead. Anything else is a bug and keeps
Python's traceback.

Ctrl-C (a `KeyboardInterrupt` reaching the top) prints one `interrupted (Ctrl-C): ...` line
instead of the traceback; Python then exits as killed by SIGINT (the shell's status 130), so
a shell script running the command stops too.
"""
from __future__ import annotations

import sys
from typing import Callable, NoReturn, Sequence

from absl import app, flags

from fgc_jax import checkpointing, config_check, preemption, torch_import, workdir_lock

USER_ERROR, RUN_FAILURE = 2, 1
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, OSError, app.UsageError, checkpointing.CheckpointError, workdir_lock.WorkdirBusyError,
    torch_import.UnsafeCheckpointError)
RUN_FAILURES: tuple[type[BaseException], ...] = (checkpointing.SaveError, FloatingPointError)


def fail(message: str, status: int) -> NoReturn:
    """Prints `error: message` as one line on stderr and exits with `status`."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
    sys.exit(status)


def _flag_error(error: BaseException, argv: Sequence[str]) -> str:
    if isinstance(error, (AttributeError, KeyError)):  # ml_collections: an unknown --config.* field
        name = str(error).strip("'\"")
        given = [a for a in argv if a.startswith("--config.") and name in a.split("=")[0]]
        return (f"unknown config field {name!r}{f' in {given[0]}' if given else ''}; every field is "
                "listed, with a comment, in configs/resnet20_cifar.py")
    if isinstance(error, OSError) or "config file" in str(error).lower():
        return f"cannot load the config file: {error}"
    return str(error)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, but every problem (config file included) is one `error:` line."""
    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS["config"].present:
            _ = flags.FLAGS.config  # the config file loads lazily; load it now, among the flags
        return rest
    except (flags.Error, OSError, AttributeError, KeyError, TypeError, ValueError) as e:
        fail(_flag_error(e, argv), USER_ERROR)


def run(main: Callable[[list[str]], None], *, user_errors: tuple[type[BaseException], ...] = (),
        check_config: bool = True) -> None:
    """`absl.app.run(main)` with the error handling above; checks `--config`'s fields first."""
    def guarded(argv: list[str]) -> None:
        try:
            if check_config and "config" in flags.FLAGS and flags.FLAGS.config is not None:
                config_check.check_fields(flags.FLAGS.config)
            main(argv)
        except USER_ERRORS + user_errors as e:
            if flags.FLAGS.verbosity >= 1:
                raise
            fail(e, USER_ERROR)
        except RUN_FAILURES as e:
            if flags.FLAGS.verbosity >= 1:
                raise
            fail(e, RUN_FAILURE)

    preemption.print_interrupts_in_one_line()
    preemption.started()  # the command's imports are done
    app.run(guarded, flags_parser=_parse_flags)
