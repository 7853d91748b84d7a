"""One run per workdir: an exclusive lock file `WORKDIR/lock` naming its holder.

The lock is an advisory `flock` on `WORKDIR/lock`, held for the life of the run, plus the
holder's host, pid and start time written into the file for the message a second run prints.
The kernel drops a `flock` when its process dies, however it dies (kill -9 included), so a
lock file left by a dead run is taken over without any guessing about pids.

Limits: `flock` is exclusive across hosts only on filesystems that implement it across
clients (local disks; NFSv4, where Linux maps it to a byte-range lock that the server releases
after its lease when a client dies). On filesystems that ignore it (some FUSE mounts, e.g.
gcsfuse), set FGC_JAX_DISTRUST_FLOCK=1: the file's contents then decide. A lock naming a
live pid on this host is refused and one naming a dead pid is taken over; a lock naming
another host is refused until removed by hand (its holder's liveness cannot be checked from
here). Two runs starting within the same few milliseconds can still both pass that check. Object-store
workdirs (`gs://`) are not locked at all; a warning says so.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Any

from absl import logging

LOCK_NAME = "lock"


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir."""


class WorkdirLock:
    """Holds `WORKDIR/lock` from `acquire` to `release`."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        """Takes the lock or raises `WorkdirBusyError` naming the holder; creates the workdir."""
        if "://" in self.path:
            logging.warning("%s is not on a local or POSIX filesystem: it is not locked against a "
                            "second run", self.path)
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise WorkdirBusyError(
                f"{os.path.dirname(self.path)} is in use by another run ({holder}); wait for it to end, "
                "or use another --workdir") from None
        previous = _read(fd)
        if previous and not _flock_is_reliable() and _may_be_alive(previous):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise WorkdirBusyError(
                f"{self.path} names a run that may still be running ({_describe(previous)}) and "
                "FGC_JAX_DISTRUST_FLOCK=1 is set; if that run has ended, delete the file and rerun")
        if previous:
            logging.warning("Taking over the lock of a run that has ended (%s)", _describe(previous))
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empties the file and drops the lock (the file stays: removing it would race)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _flock_is_reliable() -> bool:
    """Whether a lock taken here would have excluded the other host's run: assumed so (see the
    module docstring); set FGC_JAX_DISTRUST_FLOCK=1 on filesystems that ignore flock."""
    return os.environ.get("FGC_JAX_DISTRUST_FLOCK", "") != "1"


def _may_be_alive(holder: dict[str, Any]) -> bool:
    """False only for a pid on this host that no longer exists."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError):
        pass
    return True


def _read(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
