"""CIFAR-10/100 binary archives fetched on first use: downloaded, verified, extracted.

`prepare(dataset, data_dir, files)` returns the directory that holds the binary files the
`cifar_bin` source reads. Where `data_dir` (or its `cifar-10-batches-bin` / `cifar-100-binary`
folder) holds them, that is all it does. Otherwise it takes `data_dir/cifar-10-binary.tar.gz`
(or `cifar-100-binary.tar.gz`), downloading it first if it is not there, checks it, and
extracts it. Nothing half-done is ever trusted:

- the download is written to `ARCHIVE.part` and renamed to `ARCHIVE` only after its size, the
  dataset authors' published MD5 and our SHA-256 match; an interrupted download keeps its
  `.part`, which the next run resumes with an HTTP Range request (or restarts, where the server
  ignores ranges); an archive that fails its checks is deleted;
- the archive is extracted into a temporary folder beside the final one and renamed into
  place, so the final folder exists only complete; leftovers of an interrupted extraction are
  removed by the next one.

Every failure is one line: no network (saying where to put the archive by hand and where to
fetch it), a transfer that stopped (resumed by the next run), a wrong checksum (expected and got).

Multi-process runs: every process calls `prepare`; the fetch runs under an exclusive `flock` on
`data_dir/.ARCHIVE.lock`. Where processes share `data_dir` (one host, or a shared filesystem),
one downloads while the others wait and then find the folder; where each host has its own
`data_dir`, one process per host downloads. A lock rather than a collective (JAX's multihost
barrier): it needs no knowledge of which processes share a filesystem, works for the
single-process commands too, and has no barrier timeout for a slow download to outlast; the
kernel drops it when its holder dies, however it dies. Across hosts `flock` needs a filesystem
that implements it (local disks, NFSv4; see `fgc_jax/workdir_lock.py`).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import dataclasses
import fcntl
import hashlib
import http.client
import os
import pathlib
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib

from absl import logging

_TIMEOUT_S = 60  # a connection that sends nothing for this long counts as interrupted
_CHUNK = 1 << 20


class DownloadError(FileNotFoundError):
    """The dataset is not on disk and could not be fetched; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Archive:
    """An official CIFAR binary archive and what it must hash to."""

    url: str
    size: int  # bytes
    md5: str  # published by the dataset's authors, https://www.cs.toronto.edu/~kriz/cifar.html
    # Ours, beside the MD5 (the same as tensorflow_datasets' url_checksums/cifar10(0).txt).
    sha256: str
    folder: str  # the archive's top-level folder, holding the binary files

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


ARCHIVES = {
    "cifar10": Archive(
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", 170_052_171,
        "c32a1d4ab5d03f1284b67883e8d87530",
        "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
        "cifar-10-batches-bin"),
    "cifar100": Archive(
        "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", 168_513_733,
        "03b5dce01913d631647c71ecec9e9cb8",
        "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
        "cifar-100-binary"),
}


@dataclasses.dataclass(frozen=True)
class _Expected:
    """What a downloaded file must match; size and MD5 only for the official archive."""

    sha256: str
    md5: str | None = None
    size: int | None = None


def default_dir() -> pathlib.Path:
    """Where `config.data.dir=''` keeps CIFAR: `$XDG_CACHE_HOME/fgc_jax/datasets`, else
    `~/.cache/fgc_jax/datasets`."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(cache) / "fgc_jax" / "datasets"


def prepare(dataset: str, data_dir: str, files: Sequence[str], *, url: str = "",
            sha256: str = "") -> pathlib.Path:
    """The directory holding `dataset`'s binary `files`, fetched into `data_dir` if absent.

    `data_dir`: '' = `default_dir()`. `url`: '' = the official archive (a mirror of the same
    file keeps the official checks). `sha256`: '' = the official archive's size, MD5 and
    SHA-256; otherwise only this SHA-256 is checked (an archive packed elsewhere).
    Raises `DownloadError` (one line) when the data can be neither found nor fetched.
    """
    archive = ARCHIVES[dataset]
    if "://" in data_dir:
        raise DownloadError(f"config.data.dir={data_dir} is not a local directory, which the cifar_bin "
                            f"source needs (leave it '' to fetch {dataset} into {default_dir()})")
    root = pathlib.Path(data_dir).expanduser() if data_dir else default_dir()
    if (found := _holding(root, archive.folder, files)) is not None:
        return found
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the data directory {root} to fetch {dataset} into "
                            f"({e.strerror}); set config.data.dir to a writable directory") from e
    expected = _Expected(sha256.lower()) if sha256 else _Expected(archive.sha256, archive.md5, archive.size)
    path = root / archive.name
    with _locked(root / f".{archive.name}.lock"):
        if (found := _holding(root, archive.folder, files)) is not None:  # fetched meanwhile
            return found
        if path.is_file():  # put there by hand, or downloaded by a run stopped before extracting
            _check(path, expected)
        else:
            _download(url or archive.url, path, expected)
        _extract(path, root, archive.folder, files)
    return root / archive.folder


def _holding(root: pathlib.Path, folder: str, files: Sequence[str]) -> pathlib.Path | None:
    """`root/folder` if it exists (an extraction is renamed into place only complete), `root`
    if it holds any of `files` (a copy given by the user), else None."""
    if (root / folder).is_dir():
        return root / folder
    if any((root / name).exists() for name in files):
        return root
    return None


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
    """Holds an exclusive `flock` on `path`, waiting for another holder to finish."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.info("Waiting for another process fetching into %s (it holds %s)", path.parent, path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the lock; the file stays (removing it would race)


def _by_hand(url: str, path: pathlib.Path) -> str:
    return (f"To fetch it by hand, download {url} on a machine with access and put it at {path}: "
            "the next run checks and extracts it (or set config.data.download_url to a reachable mirror)")


def _download(url: str, path: pathlib.Path, expected: _Expected) -> None:
    """`url` -> `path` via `path.part` (resumed if present), renamed once its checksums pass."""
    part = path.with_name(path.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if expected.size is not None and have > expected.size:
        part.unlink()
        have = 0
    if expected.size is None or have < expected.size:
        _fetch(url, part, have, path)
    _check(part, expected, url)
    os.replace(part, path)


def _fetch(url: str, part: pathlib.Path, have: int, path: pathlib.Path) -> None:
    """Appends the bytes of `url` from `have` on to `part` (from 0 where the server ignores the range)."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing after `have`: the .part is whole; its checksum decides
            return
        raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}. {_by_hand(url, path)}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"cannot download {url} ({reason}). {_by_hand(url, path)}") from e
    with response:
        match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
        if not (have and response.status == 206 and match and int(match.group(1)) == have):
            have = 0  # a whole file (the server ignored the range), or a first attempt
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        size = f"{total / 1e6:.0f} MB" if total is not None else "size unknown"
        logging.info("Downloading %s to %s (%s%s)", url, part.parent, size,
                     f", resuming at {have / 1e6:.0f} MB" if have else "")
        got, error, tenths = have, None, 10 * have // total if total else 0
        with open(part, "ab" if have else "wb") as f:
            try:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    got += len(chunk)
                    if total and 10 * got // total > tenths:
                        tenths = 10 * got // total
                        logging.info("  %d%% of %s", 10 * tenths, part.name.removesuffix(".part"))
            except (OSError, http.client.HTTPException) as e:  # reset, timeout, incomplete read
                error = e
            f.flush()
            os.fsync(f.fileno())
    if error is not None or (total is not None and got < total):
        of = f" of {total:,}" if total is not None else ""
        raise DownloadError(
            f"the download of {url} stopped after {got:,}{of} bytes ({error or 'connection closed'}); "
            f"{part} is kept: run the same command again to resume it")


def _digests(path: pathlib.Path) -> tuple[int, str, str]:
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            md5.update(chunk)
    return path.stat().st_size, sha256.hexdigest(), md5.hexdigest()


def _check(path: pathlib.Path, expected: _Expected, origin: str = "") -> None:
    """Deletes `path` and raises unless it has the expected size and digests."""
    size, sha256, md5 = _digests(path)
    wrong = []
    if expected.size is not None and size != expected.size:
        wrong.append(f"size expected {expected.size:,} bytes, got {size:,}")
    if sha256 != expected.sha256:
        wrong.append(f"sha256 expected {expected.sha256}, got {sha256}")
    if expected.md5 is not None and md5 != expected.md5:
        wrong.append(f"md5 expected {expected.md5}, got {md5}")
    if wrong:
        path.unlink()
        source = f" (from {origin})" if origin else ""
        raise DownloadError(f"{path}{source} failed its check: {'; '.join(wrong)}. It was deleted: the "
                            "next run downloads it afresh (should that fail the same way, the source "
                            "serves another file: check config.data.download_url)")


def _extract(path: pathlib.Path, root: pathlib.Path, folder: str, files: Sequence[str]) -> None:
    """Extracts `folder/` of the archive `path` into a temporary folder, then renames it to `root/folder`.

    Only regular files under `folder/` are written (no links, no paths outside it).
    """
    for stale in root.glob(f".{folder}.*.tmp"):  # left by an extraction that was killed
        shutil.rmtree(stale, ignore_errors=True)
    logging.info("Extracting %s", path)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder}.", suffix=".tmp", dir=root))
    try:
        try:
            with tarfile.open(path, "r:gz") as tar:
                for member in tar:
                    parts = pathlib.PurePosixPath(member.name).parts
                    if not member.isfile() or len(parts) < 2 or parts[0] != folder or ".." in parts:
                        continue
                    target = tmp.joinpath(*parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out, _CHUNK)
                        out.flush()
                        os.fsync(out.fileno())
        except (tarfile.TarError, EOFError, zlib.error) as e:
            path.unlink()
            raise DownloadError(f"{path} passed its checksum but is not a readable .tar.gz ({e}); it was "
                                "deleted: check config.data.download_url and download_sha256") from e
        missing = [name for name in files if not (tmp / folder / name).is_file()]
        if missing:
            path.unlink()
            raise DownloadError(f"{path} passed its checksum but holds no {folder}/{missing[0]}; it was "
                                "deleted: check config.data.download_url and download_sha256")
        os.rename(tmp / folder, root / folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logging.info("%s is ready in %s", folder, root)
