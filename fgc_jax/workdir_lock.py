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
here). Two runs starting within the same few milliseconds can still both pass that check.

On Cloud Storage (`gs://` workdirs) the lock is the object `WORKDIR/lock`, created with the
precondition ifGenerationMatch=0, which succeeds for exactly one writer. The holder rewrites
it every `GCS_REFRESH_SECONDS` (each rewrite conditional on its own last generation) and
deletes it when the run ends. A lock object is taken over, again conditionally on the
generation that was read, only when it names a dead pid on this host (a rerun after a
kill -9) or has not been rewritten for `GCS_STALE_SECONDS` (its holder died elsewhere);
otherwise the second run fails at once naming the holder.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import threading
import time
from typing import Any

from absl import logging

from fgc_jax import storage

LOCK_NAME = "lock"
GCS_REFRESH_SECONDS = 60.0  # how often the holder rewrites its lock object on Cloud Storage
GCS_STALE_SECONDS = 300.0  # a lock object not rewritten for this long is taken over


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir."""


class WorkdirLock:
    """Holds `WORKDIR/lock` from `acquire` to `release`."""

    def __init__(self, workdir: str):
        self.path = str(storage.path(workdir) / LOCK_NAME)
        self._fd: int | None = None
        self._object: _ObjectLock | None = None

    def acquire(self) -> "WorkdirLock":
        """Takes the lock or raises `WorkdirBusyError` naming the holder; creates the workdir."""
        if storage.is_remote(self.path):
            lock = _ObjectLock(self.path)
            lock.acquire()
            self._object = lock  # only once held: releasing must not delete another run's lock
            return self
        storage.path(self.path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # a local file: flock needs its fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise WorkdirBusyError(
                f"{storage.path(self.path).parent} is in use by another run ({holder}); wait for it to "
                "end, or use another --workdir") from None
        previous = _read(fd)
        if previous and not _flock_is_reliable() and _may_be_alive(previous):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise WorkdirBusyError(
                f"{self.path} names a run that may still be running ({_describe(previous)}) and "
                "FGC_JAX_DISTRUST_FLOCK=1 is set; if that run has ended, delete the file and rerun")
        if previous:
            logging.warning("Taking over the lock of a run that has ended (%s)", _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_record()).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empties the file and drops the lock (the file stays: removing it would race); on
        Cloud Storage deletes the lock object if it is still this run's."""
        if self._object is not None:
            self._object.release()
            self._object = None
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class _ObjectLock:
    """`WORKDIR/lock` on Cloud Storage (see the module docstring), through google-cloud-storage,
    whose uploads take the generation preconditions this needs."""

    def __init__(self, url: str):
        from google.api_core import exceptions  # pylint: disable=import-outside-toplevel

        self.url, self._errors = url, exceptions
        bucket, _, name = url[len("gs://"):].partition("/")
        self._blob = storage.gcs_client(url, "--workdir").bucket(bucket).blob(name)
        self._record: dict[str, Any] = {}
        self._generation: int | None = None
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def acquire(self) -> None:
        self._record = _record()
        try:
            self._write(if_generation_match=0)  # creation: exactly one writer succeeds
        except self._errors.PreconditionFailed:
            self._take_over()
        self._refresher = threading.Thread(target=self._refresh, name="fgc_jax-workdir-lock",
                                           daemon=True)
        self._refresher.start()

    def _write(self, if_generation_match: int) -> None:
        self._record["refreshed"] = _now()
        self._blob.upload_from_string(json.dumps(self._record), content_type="application/json",
                                      if_generation_match=if_generation_match)
        self._generation = self._blob.generation

    def _take_over(self) -> None:
        """Replaces a lock object whose holder has ended, conditionally on the generation read."""
        current = self._blob.bucket.get_blob(self._blob.name)
        if current is None:  # released since: create it afresh
            holder, generation, age = {}, 0, 0.0
        else:
            try:
                holder = json.loads(current.download_as_bytes(if_generation_match=current.generation))
            except (ValueError, self._errors.NotFound, self._errors.PreconditionFailed):
                holder = {}
            generation = current.generation
            age = time.time() - current.updated.timestamp()
        if current is not None and age < GCS_STALE_SECONDS and _may_be_alive(holder):
            raise WorkdirBusyError(
                f"{storage.path(self.url).parent} is in use by another run ({_describe(holder)}, lock "
                f"refreshed {age:.0f} s ago); wait for it to end, or use another --workdir (a lock "
                f"not refreshed for {GCS_STALE_SECONDS:.0f} s is taken over)")
        if current is not None:
            logging.warning("Taking over the lock of a run that has ended (%s, refreshed %.0f s ago)",
                            _describe(holder), age)
        try:
            self._write(if_generation_match=generation)
        except (self._errors.PreconditionFailed, self._errors.NotFound):
            raise WorkdirBusyError(f"{self.url} was taken by another run starting at the same moment; "
                                   "use another --workdir, or rerun once it has ended") from None

    def _refresh(self) -> None:
        while not self._stop.wait(GCS_REFRESH_SECONDS):
            try:
                self._write(if_generation_match=self._generation)
            except (self._errors.PreconditionFailed, self._errors.NotFound):
                logging.error("LOST THE WORKDIR LOCK %s: another run took it over; two runs may now "
                              "write to this workdir", self.url)
                return
            except Exception as e:  # pylint: disable=broad-except
                logging.warning("Could not refresh the workdir lock %s (%s); retrying", self.url, e)

    def release(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
        if self._generation is None:
            return
        try:
            self._blob.delete(if_generation_match=self._generation)
        except (self._errors.PreconditionFailed, self._errors.NotFound):
            pass  # no longer this run's
        except Exception as e:  # pylint: disable=broad-except
            logging.warning("Could not delete the workdir lock %s (%s); the next run takes it over "
                            "after %.0f s", self.url, e, GCS_STALE_SECONDS)


def _record() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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
