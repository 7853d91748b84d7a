"""Fault injection: kills, SIGTERM, corrupt bytes, divergence, concurrent runs, disk full,
restarts around the best checkpoint, and every bad config field.

Oracles are independent of the code under test: an uninterrupted run's final arrays and logs
(`straight`, in conftest.py), the bytes on disk, the exit status and stderr of the commands.
"""
import json
import os
import pathlib
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import quickstart, resnet20_cifar
from fgc_jax import checkpointing, config_check, train, workdir_lock

REPO = pathlib.Path(__file__).resolve().parents[1]

# A depth-8 gated ResNet on the digits: 12 steps an epoch, 24 steps through BAS and FGC.
TINY = {"model.depth": 8, "num_epochs": 2, "bas.epochs": 1, "fgc.warmup_epochs": 1,
        "sparsity.ramp_epochs": 1, "optimizer.lr_milestones": (2,), "checkpoint_every_steps": 1000,
        "log_every_steps": 1, "eval_every_epochs": 1}


def tiny_config(**overrides):
    config = quickstart.get_config()
    config.update_from_flattened_dict(dict(TINY, **overrides))
    return config


def flags_for(**overrides):
    """The command-line form of tiny_config(**overrides)."""
    values = dict(TINY, **overrides)
    return [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
            for k, v in values.items()]


def subprocess_env():
    """The test's 8 virtual devices and its compilation cache (conftest.py), for `python -m fgc_jax.main`."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("GLIBC_TUNABLES", None)
    return env


def main_command(workdir, *flags):
    return [sys.executable, "-m", "fgc_jax.main", "--config=configs/quickstart.py",
            f"--workdir={workdir}", *flags]


def read_state(workdir, step=None):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "meta")) as m:
        step = m.latest_step() if step is None else step
        return m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"], step


def steps_on_disk(workdir):
    return sorted(int(p.name) for p in pathlib.Path(workdir, "checkpoints").iterdir() if p.name.isdigit())


def assert_same_arrays(a, b):
    leaves_a, leaves_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


TIMING = ("images_per_second", "ms_per_step", "eval/seconds")


def metric_rows(workdir):
    """metrics.jsonl without the wall-clock fields."""
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def tensorboard_scalars(workdir):
    """[(step, tag, value)] as TensorBoard shows them: a run's START event with a purge step
    drops what earlier event files logged at or after that step (TensorBoard's documented rule)."""
    from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel

    scalars = []
    files = sorted(pathlib.Path(workdir, "tensorboard").glob("events.out.tfevents.*"),
                   key=lambda p: (int(p.name.split(".")[3]), p.name))
    for path in files:
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                scalars = [s for s in scalars if s[0] < event.step]
            for value in event.summary.value:
                if value.tag not in TIMING:
                    scalars.append((event.step, value.tag, value.simple_value))
    return sorted(scalars)


# ----------------------------------------------------------------------------------------
# Kills and preemption.


def wait_for(predicate, process, timeout=300, interval=0.005):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(interval)
    raise TimeoutError


@pytest.mark.slow
def test_kill_9_at_several_moments_then_resume_equals_an_uninterrupted_run(tmp_path, straight):
    """kill -9 after the first log row, in the middle of a checkpoint save, and at start-up
    once the lock is taken; each rerun of the same command resumes. Final arrays, metrics.jsonl and
    TensorBoard equal the uninterrupted run's."""
    workdir = tmp_path / "run"
    checkpoints = workdir / "checkpoints"
    command = main_command(workdir, *flags_for(checkpoint_every_steps=1, keep_checkpoints=2))

    def rows():
        path = workdir / "metrics.jsonl"
        return path.read_text().splitlines() if path.exists() else []

    def saving():
        return checkpoints.exists() and any("tmp" in p.name for p in checkpoints.iterdir())

    def holds_lock(pid):
        lock = workdir / "lock"
        return lock.exists() and f'"pid": {pid},' in lock.read_text()

    moments = {"after the first row": lambda pid: len(rows()) >= 1,
               "mid-save": lambda pid: len(rows()) >= 4 and saving(),
               "at start-up, holding the lock": holds_lock}
    killed = []
    for name, moment in moments.items():
        process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        if wait_for(lambda: moment(process.pid), process):
            process.send_signal(signal.SIGKILL)
            killed.append(name)
        _, stderr = process.communicate(timeout=300)
        assert process.returncode in (0, -signal.SIGKILL), stderr[-3000:]
    assert "mid-save" in killed and len(killed) >= 2, killed
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    a, step_a = read_state(straight)
    b, step_b = read_state(str(workdir))
    assert step_a == step_b == 24
    assert_same_arrays(a, b)
    assert metric_rows(workdir) == metric_rows(straight)  # no duplicate, missing or reordered rows
    assert tensorboard_scalars(workdir) == tensorboard_scalars(straight)


def test_concurrent_run_is_refused_and_sigterm_stops_cleanly(tmp_path):
    """A second run in a busy workdir fails at once naming the holder; SIGTERM to the first
    saves a checkpoint and exits 0; a third run after it resumes (the lock is free again)."""
    workdir = tmp_path / "run"
    first = subprocess.Popen(main_command(workdir, *flags_for(num_epochs=50)), cwd=REPO,
                             env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    metrics = workdir / "metrics.jsonl"
    assert wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, first,
                    interval=0.2), first.stderr.read()
    started = time.time()
    second = subprocess.run(main_command(workdir, *flags_for(num_epochs=50)), cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and f"pid {first.pid}" in lines[-1]
    assert socket.gethostname() in lines[-1]
    assert "Traceback" not in second.stderr
    assert time.time() - started < 60  # at once: before any data access or compilation

    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert "Stopped for preemption" in stderr
    _, step = read_state(str(workdir))
    logged = [(r["step"], "eval/top1" in r) for r in metric_rows(workdir)]
    assert logged == sorted(set(logged))  # the second run wrote nothing: no repeated rows
    assert 0 < step == max(s for s, _ in logged)


def test_lock_of_a_dead_run_is_taken_over_and_a_held_one_is_not(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    record = {"host": socket.gethostname(), "pid": int(dead.stdout), "started": "2026-01-01T00:00:00Z"}
    (tmp_path / "lock").write_text(json.dumps(record))
    with workdir_lock.WorkdirLock(str(tmp_path)):
        held = json.loads((tmp_path / "lock").read_text())
        assert held["pid"] == os.getpid()
        with pytest.raises(workdir_lock.WorkdirBusyError, match=f"pid {os.getpid()} on host"):
            workdir_lock.WorkdirLock(str(tmp_path)).acquire()  # another open file: flock excludes it
    with workdir_lock.WorkdirLock(str(tmp_path)):  # released at exit
        pass


# ----------------------------------------------------------------------------------------
# Corrupt checkpoints, divergence, disk full.


def largest_data_file(checkpoint_dir):
    files = [p for p in pathlib.Path(checkpoint_dir, "state").rglob("*")
             if p.is_file() and "metadata" not in p.name]
    return max(files, key=lambda p: p.stat().st_size)


def tree_bytes(directory):
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(pathlib.Path(directory).rglob("*")) if p.is_file()}


def test_flipped_byte_is_detected_and_the_newest_good_checkpoint_resumes(tmp_path, straight):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(checkpoint_every_steps=5), workdir)
    assert steps_on_disk(workdir)[-2:] == [20, 24]
    target = largest_data_file(pathlib.Path(workdir, "checkpoints", "24"))
    data = bytearray(target.read_bytes())
    data[1000] ^= 0xFF
    target.write_bytes(bytes(data))
    before = tree_bytes(pathlib.Path(workdir, "checkpoints", "24"))

    # Told to stop: a CheckpointError naming the checkpoint and an array; nothing touched.
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"checkpoint 24 .*(array \S+|cannot be restored).*left untouched"):
        train.train_and_evaluate(tiny_config(checkpoint_fallback=False), workdir)
    assert tree_bytes(pathlib.Path(workdir, "checkpoints", "24")) == before

    # Unattended (the default): checkpoint 24 is moved aside intact, the run resumes from 20
    # and ends where the uninterrupted run ended.
    train.train_and_evaluate(tiny_config(), workdir)
    quarantined = list(pathlib.Path(workdir, "quarantine").iterdir())
    assert [p.name.split("-")[0] for p in quarantined] == ["24"]
    assert tree_bytes(quarantined[0]) == before
    assert_same_arrays(read_state(straight)[0], read_state(workdir)[0])
    assert metric_rows(workdir) == metric_rows(straight)


def test_fingerprint_names_the_altered_array(tmp_path):
    state = {"params": {"w": np.arange(6, dtype=np.float32)}, "opt_state": [np.ones(3, np.float32)]}
    prints, non_finite = checkpointing.fingerprints(state)
    assert set(prints) == {"params/w", "opt_state/0"} and not non_finite
    state["opt_state"][0] = np.array([1, 1, 6.4e33], np.float32)
    with pytest.raises(checkpointing.CorruptCheckpointError, match="array opt_state/0 differs"):
        checkpointing.verify(state, prints, "checkpoint 7")
    state["params"]["w"] = np.array([0, np.inf, 2, 3, 4, 5], np.float32)
    assert checkpointing.fingerprints(state)[1] == ["params/w"]


def test_divergence_keeps_a_finite_checkpoint_and_a_lower_lr_continues_from_it(tmp_path, straight):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(num_epochs=1), workdir)
    with pytest.raises(FloatingPointError, match="lower --config.optimizer.learning_rate"):
        train.train_and_evaluate(tiny_config(**{"optimizer.learning_rate": 1e6}), workdir)
    for step in steps_on_disk(workdir):  # every checkpoint on disk is finite
        state, _ = read_state(workdir, step)
        for path, x in jax.tree.leaves_with_path(state):
            x = np.asarray(x)
            assert not np.issubdtype(x.dtype, np.floating) or np.isfinite(x).all(), (step, path)
    assert steps_on_disk(workdir) == [12]
    train.train_and_evaluate(tiny_config(), workdir)  # the original lr: continues from step 12
    assert_same_arrays(read_state(straight)[0], read_state(workdir)[0])


def small_tmpfs(path, options="size=256k"):
    """A tmpfs mounted at `path` (root only: skipped elsewhere); unmount it with `umount -l`."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    return path


def assert_one_clear_line(message, cause, remedy):
    """The cause in words, the path, what to do; not the library's text (--verbosity=1 has it)."""
    assert re.search(rf"saving checkpoint \d+ to /\S+/checkpoints failed: {cause}; the run stopped\. "
                     rf"{remedy}, then rerun the same command", message), message
    assert "os_error_code" not in message and "tensorstore" not in message.lower(), message
    assert "\n" not in message and len(message) < 400, message


def test_disk_full_stops_within_one_step_with_one_clear_message(tmp_path):
    mount = small_tmpfs(tmp_path / "small")
    try:
        with pytest.raises(checkpointing.SaveError) as failure:
            train.train_and_evaluate(tiny_config(checkpoint_every_steps=3), str(mount))
        assert str(failure.value).startswith("saving checkpoint 3 ")
        assert_one_clear_line(str(failure.value), "no space left on device", "Free space on its disk")
        logged = [r["step"] for r in metric_rows(mount)]
        assert max(logged) <= 4  # the first save (step 3) failed; the step after it did not end
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_read_only_file_system_is_named_as_the_cause(tmp_path):
    """The file system turns read-only under a running manager (as a failing disk does)."""
    mount = small_tmpfs(tmp_path / "disk", "size=1m")
    try:
        manager = checkpointing.create_manager(str(mount), tiny_config())
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        with pytest.raises(checkpointing.SaveError) as failure:
            checkpointing.save(manager, 1, {"w": np.zeros(4, np.float32)}, {})
            checkpointing.wait(manager)
        assert_one_clear_line(str(failure.value), "read-only file system", "Use a --workdir on a writable file system")
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# ----------------------------------------------------------------------------------------
# The best checkpoint across restarts.


def test_best_checkpoint_survives_restarts(tmp_path):
    """Saved by one manager, ranked by later ones: each restart reopens the directory."""
    config = tiny_config(keep_checkpoints=1)
    top1 = {10: 0.9, 20: 0.5, 30: None, 40: 0.6, 50: None}
    meta = {"model": checkpointing.model_identity(config)}
    for step, accuracy in top1.items():  # a restart (new manager) before every save
        manager = checkpointing.create_manager(str(tmp_path), config)
        checkpointing.save(manager, step, {"w": np.full((2,), step, np.float32)}, meta,
                           None if accuracy is None else {"top1": accuracy})
        checkpointing.wait(manager)
        manager.close()
    assert steps_on_disk(tmp_path) == [10, 50]  # the best (0.9) and the latest


@pytest.mark.slow
def test_best_checkpoint_survives_restarts_of_a_run(tmp_path):
    """One epoch per restart: the checkpoint with the best logged test top-1 is always on disk."""
    workdir = str(tmp_path / "run")
    for epochs in (1, 2, 3):
        train.train_and_evaluate(tiny_config(num_epochs=epochs, keep_checkpoints=1,
                                             **{"optimizer.lr_milestones": (9,)}), workdir)
        evals = [(r["eval/top1"], r["step"]) for r in metric_rows(workdir) if "eval/top1" in r]
        best = max(evals)[0]
        on_disk = steps_on_disk(workdir)
        assert any(top == best and step in on_disk for top, step in evals), (evals, on_disk)
        assert on_disk[-1] == 12 * epochs


# ----------------------------------------------------------------------------------------
# Bad input: every config field, data, files, flags.


def flat_fields(config, prefix=""):
    out = []
    for key, value in config.items():
        if hasattr(value, "items"):
            out += flat_fields(value, prefix + key + ".")
        else:
            out.append(prefix + key)
    return out


def test_every_config_field_is_validated():
    assert sorted(flat_fields(resnet20_cifar.get_config())) == sorted(config_check.FIELDS)


def wrong_type(value):
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, str):
        return 3
    return "three"


BAD_VALUES = [(name, None) for name in config_check.FIELDS] + [
    ("eval_every_epochs", 0), ("keep_checkpoints", 0), ("keep_checkpoints", -1), ("seed", -1),
    ("num_epochs", 0), ("batch_size", 0), ("optimizer.learning_rate", float("nan")),
    ("optimizer.learning_rate", 0.0), ("optimizer.momentum", 1.0), ("fgc.temperature", 0.0),
    ("fgc.momentum", 1.0), ("fgc.kappa", -1.0), ("bas.epochs", 3), ("log_every_steps", 0),
    ("checkpoint_every_steps", 0), ("data.prefetch", -1), ("model.depth", 21), ("fgc.blocks", (5,)),
    ("optimizer.lr_milestones", (5, 2)), ("dataset", "mnist"), ("fgc.k", 0),
]


@pytest.mark.parametrize("name, value", BAD_VALUES, ids=[f"{n}={v}" for n, v in BAD_VALUES])
def test_bad_field_fails_before_anything_is_written(tmp_path, name, value):
    config = tiny_config()
    if value is None:
        value = wrong_type(config[name] if "." not in name else config[name.split(".")[0]][name.split(".")[1]])
    with config.ignore_type():
        config.update_from_flattened_dict({name: value})
    with pytest.raises(config_check.ConfigError, match=name.split(".")[-1]):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_unknown_field_and_missing_init_from_fail_before_anything_is_written(tmp_path):
    config = tiny_config()
    config.fgc.neighbours = 5
    with pytest.raises(config_check.ConfigError, match="fgc.neighbours"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="config.init_from=.*does not exist"):
        train.train_and_evaluate(tiny_config(init_from=str(tmp_path / "bas.pth")), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def write_cifar_bin(directory, train_labels, test_labels):
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)]
    for name, labels in [(n, train_labels) for n in names] + [("test_batch.bin", test_labels)]:
        records = np.concatenate([np.asarray(labels, np.uint8)[:, None],
                                  rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)], axis=1)
        (directory / name).write_bytes(records.tobytes())


@pytest.mark.parametrize("split", ["train", "test"])
def test_labels_out_of_range_fail_before_anything_is_written(tmp_path, split):
    good, bad = list(range(10)) * 2, list(range(10)) * 2
    bad[3] = 10
    data = tmp_path / "cifar"
    write_cifar_bin(data, bad if split == "train" else good, bad if split == "test" else good)
    config = resnet20_cifar.get_config()
    config.update_from_flattened_dict({
        "data.source": "cifar_bin", "data.dir": str(data), "model.depth": 8, "batch_size": 16,
        "eval_batch_size": 16, "fgc.k": 5, "num_epochs": 1, "bas.epochs": 1})
    with pytest.raises(ValueError, match=r"Labels in .*span \[0, 10\]"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_incompatible_checkpoint_leaves_config_json(tmp_path):
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config(num_epochs=1), str(workdir))
    before = (workdir / "config.json").read_text()
    with pytest.raises(checkpointing.CheckpointError, match="is of model"):
        train.train_and_evaluate(tiny_config(**{"model.depth": 14}), str(workdir))
    assert (workdir / "config.json").read_text() == before


CLI_CASES = [
    ("main: missing config file", ["fgc_jax.main", "--config=configs/nope.py", "--workdir=W"], "nope.py"),
    ("main: unknown field", ["fgc_jax.main", "--config=configs/quickstart.py", "--workdir=W",
                             "--config.fgc.neighbours=5"], "unknown config field 'neighbours'"),
    ("main: bad field", ["fgc_jax.main", "--config=configs/quickstart.py", "--workdir=W",
                         "--config.eval_every_epochs=0"], "eval_every_epochs=0"),
    ("main: bad flag", ["fgc_jax.main", "--config=configs/quickstart.py", "--workdir=W", "--bogus=1"],
     "bogus"),
    ("main: missing init_from", ["fgc_jax.main", "--config=configs/quickstart.py", "--workdir=W",
                                 "--config.init_from=W/bas.pth"], "config.init_from="),
    ("evaluate: no checkpoints", ["fgc_jax.evaluate", "--config=configs/quickstart.py", "--workdir=W"],
     "holds no checkpoints"),
    ("cost: bad field", ["fgc_jax.cost", "--config=configs/quickstart.py", "--config.seed=-1"], "seed=-1"),
    ("compare: missing dir", ["fgc_jax.compare", "W/none"], "no eval_report.json"),
]


def test_user_errors_print_one_line_and_exit_2_from_every_command(tmp_path):
    env = subprocess_env()
    processes = [subprocess.Popen([sys.executable, "-m", *[a.replace("W", str(tmp_path)) for a in args]],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _, args, _ in CLI_CASES]
    verbose = subprocess.run([sys.executable, "-m", *[a.replace("W", str(tmp_path)) for a in CLI_CASES[2][1]],
                              "--verbosity=1"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    for (name, _, message), process in zip(CLI_CASES, processes):
        _, stderr = process.communicate(timeout=300)
        lines = [line for line in stderr.splitlines()  # absl's log lines and Python's warnings aside
                 if not re.match(r"[IW]\d{4} |<frozen runpy>", line)]
        assert process.returncode == 2, (name, stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, stderr)
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr
