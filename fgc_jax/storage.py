"""Where runs keep their files: a local directory or `gs://BUCKET/...`, through one abstraction.

Every read and write of a workdir, an evaluation output directory or `init_from` goes
through `etils.epath` paths made here (tests/test_gcs.py fails if a module of fgc_jax
bypasses them). epath serves local paths with the `os` module and `gs://` with gcsfs (also
where TensorFlow is installed, see below), the library orbax itself uses for checkpoints;
`pip install 'fgc_jax[gcs]'` installs what `gs://` needs. The workdir lock on Cloud Storage
(`fgc_jax.workdir_lock`) uses the google-cloud-storage client for its preconditions.

Cloud Storage objects cannot be appended to or renamed in place: `write_text` replaces an
object whole (one upload, which Cloud Storage makes visible atomically), and a file that grows
(`metrics.jsonl`) is rewritten whole by its writer.
"""
from __future__ import annotations

import io
import os
from typing import Callable

from etils import epath

# gs:// through gcsfs, the backend the gcs extra installs, for our files and orbax's alike: where
# TensorFlow is installed (the imagenet extra) epath would otherwise switch to tf.io.gfile, whose
# Cloud Storage support is another install and another behaviour. Set EPATH_USE_TF=true to choose it.
os.environ.setdefault("EPATH_USE_TF", "false")
# An emulator (`STORAGE_EMULATOR_HOST`, read by gcsfs and google-cloud-storage) serves every
# client: also tensorstore (orbax's arrays) and google-cloud-cpp (tfds's array_record reader),
# which read variables of their own and would otherwise go to the real Cloud Storage.
if os.environ.get("STORAGE_EMULATOR_HOST"):
    for _variable in ("TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT"):
        os.environ.setdefault(_variable, os.environ["STORAGE_EMULATOR_HOST"])

GCS_EXTRA = "pip install 'fgc_jax[gcs]'"
CHECK_DEADLINE_S = 15.0  # how long `check_usable` retries an unreachable Cloud Storage


class StorageError(OSError):
    """A storage location cannot be used (no such bucket, no credentials, no network, ...)."""


def is_remote(path: str | os.PathLike) -> bool:
    """True for object-store URLs (`gs://...`), False for local paths."""
    return "://" in os.fspath(path)


def path(location: str | os.PathLike) -> epath.Path:
    """`location` as an epath.Path (local paths with `~` expanded)."""
    location = os.fspath(location)
    return epath.Path(location if is_remote(location) else os.path.expanduser(location))


def display(location: str | os.PathLike) -> str:
    """`location` as a user reads it: a URL as given, a local path absolute."""
    return os.fspath(location) if is_remote(location) else os.path.abspath(os.fspath(path(location)))


def write_text(target: epath.Path, text: str) -> None:
    """Replaces `target` whole, never leaving it half-written: on a local disk through a
    temporary file, fsync and rename; on Cloud Storage as one upload."""
    write_bytes(target, text.encode("utf-8"))


def write_bytes(target: epath.Path, data: bytes) -> None:
    """`write_text` for bytes."""
    if is_remote(target):
        target.write_bytes(data)
        return
    tmp = f"{target}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def write_with(target: epath.Path, write: Callable[[io.BytesIO], object]) -> None:
    """`write(buffer)` (e.g. `fig.savefig`, `np.savez_compressed`) into memory, then the bytes to
    `target` with `write_bytes`."""
    buffer = io.BytesIO()
    write(buffer)
    write_bytes(target, buffer.getvalue())


def check_usable(location: str | os.PathLike, role: str) -> None:
    """Raises `StorageError`, one line naming `location` and the cause, if a `gs://` location's
    bucket cannot be listed: gcs extra not installed, no credentials, no such bucket, no
    permission, no network. Local paths are not checked here. `role`: what the location is
    for (e.g. '--workdir'), said in the message. Cheap (one listing of at most one object)."""
    location = os.fspath(location)
    if not is_remote(location):
        return
    if not location.startswith("gs://"):
        raise StorageError(f"{role}={location}: only local paths and gs:// URLs are supported")
    bucket_name, _, prefix = location[len("gs://"):].partition("/")
    if not bucket_name:
        raise StorageError(f"{role}={location} names no bucket; use gs://BUCKET/DIR")
    client = gcs_client(location, role)
    from google.api_core import exceptions, retry  # pylint: disable=import-outside-toplevel

    try:
        blobs = client.list_blobs(bucket_name, prefix=prefix, max_results=1,
                                  timeout=CHECK_DEADLINE_S, retry=retry.Retry(deadline=CHECK_DEADLINE_S))
        list(blobs)
    except exceptions.NotFound:
        raise StorageError(f"{role}={location}: the bucket gs://{bucket_name} does not exist; "
                           f"create it (gcloud storage buckets create gs://{bucket_name}) or fix "
                           "the URL") from None
    except (exceptions.Forbidden, exceptions.Unauthorized) as e:
        raise StorageError(f"{role}={location}: access denied ({_brief(e)}); grant these "
                           "credentials access to the bucket, or log in with `gcloud auth "
                           "application-default login`") from None
    except Exception as e:  # connection errors, timeouts: many types
        raise StorageError(f"{role}={location}: Cloud Storage cannot be reached ({_brief(e)}); "
                           "check the network") from None


def gcs_client(location: str, role: str):
    """A google-cloud-storage client (anonymous against an emulator, `STORAGE_EMULATOR_HOST`);
    a `StorageError` naming `location` if the package or credentials are missing."""
    try:
        from google.auth import exceptions as auth_exceptions  # pylint: disable=import-outside-toplevel
        from google.cloud import storage as gcs  # pylint: disable=import-outside-toplevel
        import gcsfs  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError as e:
        raise StorageError(f"{role}={location}: gs:// needs the gcs extra ({e.name} is not "
                           f"installed): {GCS_EXTRA}") from None
    try:
        return gcs.Client()
    except auth_exceptions.DefaultCredentialsError as e:
        raise StorageError(f"{role}={location}: no Google Cloud credentials ({_brief(e)}); run "
                           "`gcloud auth application-default login`, or run on a VM whose "
                           "service account may use the bucket") from None


def _brief(error: BaseException) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= 300 else text[:297] + "..."
