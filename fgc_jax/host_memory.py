"""glibc malloc tunables for a training process, applied by re-executing it once at start.

XLA:CPU allocates a step's temporary buffers afresh on every execution (689 MB for a
ResNet-56 train step at batch 128), and glibc serves each allocation over 32 MiB with a new
`mmap`. So every step faults that memory in again, 4 KiB at a time, the kernel zeroing each
page: 168k page faults and ~0.5 s of kernel CPU time per ResNet-56 step on a 2-core host.
`glibc.malloc.hugetlb=1` makes glibc ask for transparent huge pages (2 MiB) on such
mappings: ~900 faults per step, and ResNet-56 steps ~19% shorter. glibc reads
GLIBC_TUNABLES only when a process starts, hence the re-execution.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Callable, Mapping, Sequence

ENV_VAR = "GLIBC_TUNABLES"
# Set in the restarted process to the GLIBC_TUNABLES it was started with ('' = unset).
_BEFORE_VAR = "FGC_JAX_GLIBC_TUNABLES_BEFORE_RESTART"


def _items(tunables: str) -> list[str]:
    return [item for item in tunables.split(":") if item]


def merge(wanted: str, current: str) -> str:
    """`current` plus each `name=value` of `wanted` whose name `current` does not set.

    Settings already in the environment win: a user's own GLIBC_TUNABLES are kept as they are.
    """
    present = {item.split("=", 1)[0] for item in _items(current)}
    missing = [item for item in _items(wanted) if item.split("=", 1)[0] not in present]
    return ":".join(_items(current) + missing)


def reexec_with(wanted: str, *, environ: Mapping[str, str] | None = None,
                argv: Sequence[str] | None = None,
                execve: Callable[[str, Sequence[str], Mapping[str, str]], None] = os.execve) -> None:
    """Re-executes this process with `wanted` added to GLIBC_TUNABLES, unless nothing is missing.

    Call it first thing in an entry point, before any work whose effects would be lost: the
    process image is replaced (same pid, same command line from `sys.orig_argv`). It returns
    without doing anything when `wanted` is empty, the C library is not glibc, or the
    environment already sets every name in `wanted`, so the re-executed process goes on.
    """
    environ = os.environ if environ is None else environ
    current = environ.get(ENV_VAR, "")
    tunables = merge(wanted, current)
    if tunables == current or platform.libc_ver()[0] != "glibc":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    execve(sys.executable, list(sys.orig_argv if argv is None else argv),
           {**environ, ENV_VAR: tunables, _BEFORE_VAR: current})


def restart_note(environ: Mapping[str, str] | None = None) -> str | None:
    """What `reexec_with` did to this process, as a line for its log (None if it did nothing).

    The restarted process says it, once its logging is set up: `reexec_with` runs before that.
    """
    environ = os.environ if environ is None else environ
    if _BEFORE_VAR not in environ:
        return None
    return (f"Restarted the process with {ENV_VAR}={environ.get(ENV_VAR, '')} "
            "(a CPU workaround: fgc_jax/cpu_workarounds.py).")


def environ_before_restart(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment this process had before `reexec_with` restarted it (for subprocesses
    that should run as they would have without it, e.g. a comparator in a benchmark)."""
    environ = dict(os.environ if environ is None else environ)
    if _BEFORE_VAR not in environ:
        return environ
    before = environ.pop(_BEFORE_VAR)
    if before:
        environ[ENV_VAR] = before
    else:
        environ.pop(ENV_VAR, None)
    return environ
