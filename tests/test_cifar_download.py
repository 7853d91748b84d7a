"""CIFAR fetched on first use (fgc_jax/data/cifar_download.py), against a real HTTP server on
127.0.0.1 serving an archive packed from ../shared/data/cifar10-mini as the official one is
(`cifar-10-batches-bin/` at its top): download, checks, resume, atomic extraction, one-line
failures that leave nothing a later run would trust, one download for concurrent processes,
and the main command training from it on a fresh cache."""
import functools
import hashlib
import http.server
import io
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time

import pytest
import tensorflow_datasets as tfds

from conftest import CIFAR_MINI, cifar_mini_head
from configs import resnet20_cifar
from fgc_jax import config_check, train
from fgc_jax.data import cifar_download

REPO = pathlib.Path(__file__).resolve().parents[1]
FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)
NAME = "cifar-10-binary.tar.gz"
FOLDER = "cifar-10-batches-bin"


def pack(files):
    """A .tar.gz holding `cifar-10-batches-bin/NAME` for each NAME: bytes of `files`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for name, data in files.items():
            member = tarfile.TarInfo(f"{FOLDER}/{name}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


RECORDS = 128  # of each file of cifar10-mini, so that the archive and a run on it are small


@functools.cache
def contents():
    """What the test archive holds (name -> bytes): the first RECORDS records of each file of
    cifar10-mini (real CIFAR-10 records) and its batches.meta.txt."""
    files = {name: cifar_mini_head(name, RECORDS) for name in FILES}
    return {**files, "batches.meta.txt": (CIFAR_MINI / "batches.meta.txt").read_bytes()}


@pytest.fixture(scope="module")
def archive():
    """(bytes, sha256) of `contents()` packed as cifar-10-binary.tar.gz."""
    if not CIFAR_MINI.is_dir():
        pytest.skip(f"{CIFAR_MINI} not found (../shared is absent)")
    data = pack(contents())
    return data, hashlib.sha256(data).hexdigest()


class Server(http.server.ThreadingHTTPServer):
    """Serves `files` by path; honours `Range: bytes=N-` unless `ignore_range`; `cut_after`:
    bytes of a body sent before the connection is dropped; `delay`: seconds before a body."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files, self.requests = {}, []
        self.ignore_range, self.cut_after, self.delay = False, None, 0.0

    def url(self, name=NAME):
        return f"http://127.0.0.1:{self.server_port}/{name}"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        data = server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(match.group(1)) if match and not server.ignore_range else 0
        if start >= len(data) > 0:
            self.send_error(416)
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        time.sleep(server.delay)
        body = data[start:] if server.cut_after is None else data[start:start + server.cut_after]
        self.wfile.write(body)
        self.close_connection = server.cut_after is not None

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = Server()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def unreachable_url():
    """A URL on 127.0.0.1 whose port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{NAME}"


def prepare(data_dir, url, sha256=""):
    return cifar_download.prepare("cifar10", str(data_dir), FILES, url=url, sha256=sha256)


def assert_extracted(folder):
    """The extracted folder holds what was packed, byte for byte, and nothing else."""
    assert folder.name == FOLDER
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == contents()


def trusted_leftovers(data_dir):
    """What a later run would take as data: the archive, the extracted folder or its stand-ins."""
    return sorted(p.name for p in data_dir.iterdir()
                  if p.name in (NAME, FOLDER) or p.name in FILES or p.suffix == ".tmp")


def test_first_use_downloads_checks_and_extracts_once(server, archive, tmp_path):
    data, sha = archive
    server.files[NAME] = data
    folder = prepare(tmp_path / "data", server.url(), sha)
    assert folder == tmp_path / "data" / FOLDER
    assert_extracted(folder)
    assert (tmp_path / "data" / NAME).read_bytes() == data  # kept: it can be re-extracted offline
    assert not list((tmp_path / "data").glob("*.part")) and not list((tmp_path / "data").glob("*.tmp"))
    assert server.requests == [(f"/{NAME}", None)]
    # Found on disk from now on: no request, even with the server gone.
    assert prepare(tmp_path / "data", unreachable_url(), sha) == folder
    assert len(server.requests) == 1


def test_a_given_copy_is_used_as_it_is(tmp_path):
    # A data dir holding the files (or their folder) is read without any network access.
    assert prepare(CIFAR_MINI, unreachable_url()) == CIFAR_MINI
    assert prepare(CIFAR_MINI.parent, unreachable_url()) == CIFAR_MINI


def test_an_object_store_dir_is_refused():
    with pytest.raises(cifar_download.DownloadError, match="gs://bucket/cifar is not a local directory"):
        prepare("gs://bucket/cifar", unreachable_url())
    assert not pathlib.Path("gs:").exists()


@pytest.mark.parametrize("dataset, name, files", [("cifar10", NAME, FILES),
                                                  ("cifar100", "cifar-100-binary.tar.gz", ("train.bin", "test.bin"))])
def test_no_network_says_where_to_put_the_archive(tmp_path, dataset, name, files):
    url = unreachable_url().replace(NAME, name)
    with pytest.raises(cifar_download.DownloadError) as error:
        cifar_download.prepare(dataset, str(tmp_path / "data"), files, url=url)
    message = str(error.value)
    assert "\n" not in message
    assert f"download {url}" in message and f"put it at {tmp_path / 'data' / name}" in message
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [f".{name}.lock"]


def test_http_error_is_one_line(server, tmp_path):
    with pytest.raises(cifar_download.DownloadError, match=r"HTTP 404") as error:
        prepare(tmp_path, server.url())  # the server holds no such file
    assert "\n" not in str(error.value) and trusted_leftovers(tmp_path) == []


def test_corrupted_byte_is_deleted_naming_expected_and_got(server, archive, tmp_path):
    data, sha = archive
    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 0x01
    server.files[NAME] = bytes(corrupt)
    with pytest.raises(cifar_download.DownloadError) as error:
        prepare(tmp_path, server.url(), sha)
    message = str(error.value)
    assert "\n" not in message
    assert f"sha256 expected {sha}, got {hashlib.sha256(corrupt).hexdigest()}" in message
    assert trusted_leftovers(tmp_path) == [] and not list(tmp_path.glob("*.part"))
    server.files[NAME] = data  # the next run downloads afresh
    assert_extracted(prepare(tmp_path, server.url(), sha))
    assert [r for _, r in server.requests] == [None, None]


def test_a_mirror_is_held_to_the_official_checksums(server, archive, tmp_path):
    data, _ = archive
    server.files[NAME] = data  # not the official archive
    with pytest.raises(cifar_download.DownloadError) as error:
        prepare(tmp_path, server.url())
    message = str(error.value)
    assert "size expected 170,052,171 bytes" in message
    assert ("sha256 expected c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd, got "
            + hashlib.sha256(data).hexdigest()) in message
    assert f"md5 expected c32a1d4ab5d03f1284b67883e8d87530, got {hashlib.md5(data).hexdigest()}" in message
    assert trusted_leftovers(tmp_path) == []


def test_truncated_transfer_is_kept_and_resumed(server, archive, tmp_path):
    data, sha = archive
    server.files[NAME], server.cut_after = data, 300_000
    with pytest.raises(cifar_download.DownloadError) as error:
        prepare(tmp_path, server.url(), sha)
    message = str(error.value)
    assert "\n" not in message and "resume" in message
    assert f"stopped after 300,000 of {len(data):,} bytes" in message
    assert (tmp_path / f"{NAME}.part").read_bytes() == data[:300_000]
    assert trusted_leftovers(tmp_path) == []
    server.cut_after = None
    assert_extracted(prepare(tmp_path, server.url(), sha))
    assert server.requests[-1] == (f"/{NAME}", "bytes=300000-")  # only the rest was fetched


def test_server_ignoring_the_range_restarts_from_zero(server, archive, tmp_path):
    data, sha = archive
    server.files[NAME], server.ignore_range = data, True
    (tmp_path / f"{NAME}.part").write_bytes(b"x" * 12345)  # not a prefix of the archive
    assert_extracted(prepare(tmp_path, server.url(), sha))
    assert server.requests == [(f"/{NAME}", "bytes=12345-")]


def test_archive_put_by_hand_is_checked_and_extracted_offline(archive, tmp_path):
    data, sha = archive
    (tmp_path / NAME).write_bytes(data)
    assert_extracted(prepare(tmp_path, unreachable_url(), sha))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / NAME).write_bytes(data[:-1])  # a damaged copy is deleted
    with pytest.raises(cifar_download.DownloadError, match=f"sha256 expected {sha}"):
        prepare(tmp_path / "other", unreachable_url(), sha)
    assert trusted_leftovers(tmp_path / "other") == []


def test_a_local_mirror_is_a_file_url(archive, tmp_path):
    data, sha = archive
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / NAME).write_bytes(data)
    assert_extracted(prepare(tmp_path / "data", (tmp_path / "mirror" / NAME).as_uri(), sha))


def test_extraction_is_all_or_nothing(server, archive, tmp_path):
    # An interrupted earlier extraction left a partial temporary folder: it is never read.
    stale = tmp_path / f".{FOLDER}.abc.tmp"
    (stale / FOLDER).mkdir(parents=True)
    (stale / FOLDER / "data_batch_1.bin").write_bytes(b"partial")
    # An archive that passes its (given) checksum but lacks a file leaves no folder behind.
    incomplete = pack({name: bytes(3073) for name in FILES[:-1]})
    server.files[NAME] = incomplete
    with pytest.raises(cifar_download.DownloadError, match="holds no cifar-10-batches-bin/test_batch.bin"):
        prepare(tmp_path, server.url(), hashlib.sha256(incomplete).hexdigest())
    assert trusted_leftovers(tmp_path) == []
    data, sha = archive
    server.files[NAME] = data
    assert_extracted(prepare(tmp_path, server.url(), sha))
    assert trusted_leftovers(tmp_path) == sorted([NAME, FOLDER])


def test_concurrent_callers_download_once(server, archive, tmp_path):
    """Processes sharing the data dir: one downloads, the others wait on the lock and find the
    folder. (Threads stand in for processes: each opens the lock file itself, and flock locks
    belong to the open file.)"""
    data, sha = archive
    server.files[NAME], server.delay = data, 0.5
    results = [None] * 3

    def call(i):
        results[i] = prepare(tmp_path, server.url(), sha)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [tmp_path / FOLDER] * 3
    assert len(server.requests) == 1
    assert_extracted(tmp_path / FOLDER)


def test_default_dir_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cifar_download.default_dir() == tmp_path / "fgc_jax" / "datasets"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cifar_download.default_dir() == tmp_path / "home" / ".cache" / "fgc_jax" / "datasets"


def test_official_archives_are_the_published_ones():
    # The dataset page's MD5s (https://www.cs.toronto.edu/~kriz/cifar.html); SHA-256 and size as
    # tensorflow_datasets records them for the same URLs.
    tfds_checksums = pathlib.Path(tfds.__file__).parent / "url_checksums"
    for dataset, md5 in [("cifar10", "c32a1d4ab5d03f1284b67883e8d87530"),
                         ("cifar100", "03b5dce01913d631647c71ecec9e9cb8")]:
        archive = cifar_download.ARCHIVES[dataset]
        assert archive.md5 == md5
        url, size, sha256, _ = (tfds_checksums / f"{dataset}.txt").read_text().split("\t")
        assert (archive.url, archive.size, archive.sha256) == (url, int(size), sha256)


@pytest.mark.parametrize("value", ["c4a38c50", "g" * 64, " " + "0" * 64])
def test_download_sha256_must_be_64_hex_digits(value):
    config = resnet20_cifar.get_config()
    config.data.download_sha256 = value
    with pytest.raises(config_check.ConfigError, match="download_sha256"):
        config_check.check_fields(config)
    config.data.download_sha256 = "0123456789abcdefABCDEF" + "0" * 42
    config_check.check_fields(config)


def test_no_network_fails_training_before_anything_is_written(tmp_path):
    config = resnet20_cifar.get_config()
    config.data.dir, config.data.download_url = str(tmp_path / "data"), unreachable_url()
    with pytest.raises(cifar_download.DownloadError, match="put it at"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_main_command_trains_on_a_fresh_machine(server, archive, tmp_path):
    """The README's first command, on a fresh cache: it downloads, checks, extracts and trains."""
    data, sha = archive
    server.files[NAME] = data
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", XDG_CACHE_HOME=str(tmp_path / "cache"))
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "fgc_jax.main", "--config=configs/resnet56_cifar.py",
               f"--workdir={workdir}",
               # A short run of a small model; the data options are the test's archive and server.
               "--config.model.depth=8", "--config.num_epochs=1", "--config.bas.epochs=1",
               "--config.batch_size=128", "--config.eval_batch_size=128", "--config.log_every_steps=5",
               f"--config.data.download_url={server.url()}", f"--config.data.download_sha256={sha}"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_extracted(tmp_path / "cache" / "fgc_jax" / "datasets" / FOLDER)
    assert "Downloading" in result.stderr
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in records if "eval/top1" in m][-1]
    assert final["step"] == 5 and final["eval/num_examples"] == RECORDS  # 5 x 128 images at batch 128
