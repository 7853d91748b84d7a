"""The training loop: learning, exact resume, preemption, bad checkpoints, NaN, bad input."""
import hashlib
import json
import os
import pathlib
import re
import platform
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import cifar_mini_head, without_compilation_cache
from configs import quickstart, resnet20_cifar
from fgc_jax import checkpointing, train
from test_reliability import flags_for, subprocess_env

REPO = pathlib.Path(__file__).resolve().parents[1]


def digits_config(**overrides):
    """Quickstart data with a depth-8 model: 12 steps an epoch at batch 128 (the last one 29 examples)."""
    config = quickstart.get_config()
    config.model.depth = 8
    config.batch_size = 128
    config.eval_batch_size = 360
    config.num_epochs = 3
    config.bas.epochs = 1
    config.fgc.warmup_epochs = 1
    config.sparsity.ramp_epochs = 1
    config.optimizer.lr_milestones = (2,)
    config.checkpoint_every_steps = 1000
    config.log_every_steps = 5
    config.eval_every_epochs = 100
    config.update_from_flattened_dict(overrides)
    return config


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def restore_state(workdir, step=None):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "meta")) as m:
        step = m.latest_step() if step is None else step
        return m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"], step


def file_hashes(directory):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(pathlib.Path(directory).rglob("*")) if p.is_file()}


def test_resume_after_restart_is_bitwise_exact(tmp_path, monkeypatch):
    """36 steps straight equal 24 steps, a restart, and 12 more — every array, bit for bit."""
    straight, restarted = str(tmp_path / "straight"), str(tmp_path / "restarted")
    train.train_and_evaluate(digits_config(), straight)
    train.train_and_evaluate(digits_config(num_epochs=2), restarted)
    assert restore_state(restarted)[1] == 24
    # A resume restores into the abstract state: no fresh state (banks included) is built first.
    with monkeypatch.context() as patch:
        patch.setattr(train.Trainer, "create_state", lambda *_: pytest.fail("resume built a fresh state"))
        train.train_and_evaluate(digits_config(), restarted)

    a, step_a = restore_state(straight)
    b, step_b = restore_state(restarted)
    assert step_a == step_b == 36
    leaves_a, leaves_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    assert any("banks" in jax.tree_util.keystr(p) for p, _ in leaves_a)
    for (path, x), (_, y) in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))

    # The restarted run logged the same training losses as the straight one after the restart.
    by_step = {m["step"]: m["loss"] for m in read_metrics(straight) if "loss" in m}
    for m in read_metrics(restarted):
        if "loss" in m and m["step"] > 24:
            assert m["loss"] == by_step[m["step"]]


def test_corrupt_or_foreign_checkpoint_stops_the_run_and_is_kept(tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(digits_config(num_epochs=1), workdir)
    before = file_hashes(workdir + "/checkpoints")

    with pytest.raises(checkpointing.CheckpointError, match="is of model"):
        train.train_and_evaluate(digits_config(num_epochs=2, **{"model.depth": 14}), workdir)

    state_dir = pathlib.Path(workdir, "checkpoints", "12", "state")
    for p in state_dir.rglob("*"):
        if p.is_file() and p.stat().st_size > 0 and "metadata" not in p.name:
            p.write_bytes(b"\x00garbage" * 8)
    corrupted = file_hashes(workdir + "/checkpoints")
    assert corrupted != before
    with pytest.raises(checkpointing.CheckpointError, match="left untouched"):
        train.train_and_evaluate(digits_config(num_epochs=2), workdir)
    assert file_hashes(workdir + "/checkpoints") == corrupted


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    config = digits_config(num_epochs=3, **{"optimizer.learning_rate": 1e30, "bas.epochs": 0})
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train.train_and_evaluate(config, workdir)
    checkpoints = pathlib.Path(workdir, "checkpoints")
    for step_dir in [p for p in checkpoints.iterdir() if p.name.isdigit()]:
        state, _ = restore_state(workdir, int(step_dir.name))
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 60}, "not divisible by the 8 devices"),
    ({"batch_size": 2048}, "exceeds the 1437 training examples"),
    ({"fgc.k": 1437}, "fgc.k=1437"),
    ({"fgc.temperature": 0.0}, "temperature"),
    ({"fgc.momentum": 1.0}, "momentum"),
    ({"fgc.blocks": (5,)}, "fgc.blocks"),
    ({"model.depth": 21}, "model.depth=21"),
])
def test_bad_settings_fail_before_compiling(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(digits_config(**overrides), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def main_command(workdir, *overrides):
    return [sys.executable, "-m", "fgc_jax.main", "--config=configs/quickstart.py",
            f"--workdir={workdir}", *overrides]


def test_unknown_config_field_is_rejected(tmp_path):
    result = subprocess.run(main_command(tmp_path, "--config.fgc.neighbours=5"), cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "neighbours" in result.stderr


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "run"
    # test_reliability's tiny run, made long: it compiles nothing the session has not compiled.
    process = subprocess.Popen(main_command(workdir, *flags_for(num_epochs=50)), cwd=REPO, env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "Stopped for preemption" in stderr
    # On CPU main.py restarted itself with cpu_workarounds.MALLOC_TUNABLES first; the signal reached the
    # restarted process because it kept the pid.
    if platform.libc_ver()[0] == "glibc":
        assert "Restarted the process with GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in stderr
    _, step = restore_state(str(workdir))
    logged = [m["step"] for m in read_metrics(workdir) if "loss" in m]
    assert 0 < step < 50 * 12 and step >= max(logged)


@pytest.mark.slow
def test_short_run_on_real_cifar_learns(tmp_path, cifar_mini_dir):
    """5 epochs on 5,085 real CIFAR-10 images through BAS, FGC warm-up and k-NN FGC."""
    config = resnet20_cifar.get_config()
    config.data.source = "cifar_bin"
    config.data.dir = str(cifar_mini_dir)
    config.update_from_flattened_dict({
        "model.depth": 8, "batch_size": 128, "eval_batch_size": 512, "num_epochs": 5,
        "bas.epochs": 2, "fgc.warmup_epochs": 1, "fgc.k": 50, "sparsity.ramp_epochs": 1,
        "sparsity.rho_max": 2.0, "optimizer.lr_milestones": (4,), "log_every_steps": 13,
        "eval_every_epochs": 1, "checkpoint_every_steps": 10_000})
    report = train.train_and_evaluate(config, str(tmp_path))
    assert report["num_examples"] == 1017
    assert report["top1"] > 0.3  # chance is 0.1
    records = read_metrics(tmp_path)
    train_records = [m for m in records if "loss" in m]
    for name in ("cross_entropy", "l0", "batch_shaping", "fgc", "accuracy", "gate_density"):
        values = [m[name] for m in train_records if name in m]
        assert values and np.isfinite(values).all(), name
    # rho rises from 0 at the end of BAS (step 78) to 2.0: the gates must switch off.
    density = {m["step"]: m["gate_density"] for m in train_records}
    bas_end = density[78]
    assert density[max(density)] < bas_end - 0.05
    evals = [m for m in records if "eval/top1" in m]
    assert len(evals) == 5 and evals[-1]["eval/pruning_ratio"] > evals[1]["eval/pruning_ratio"]


# What the quickstart reaches on any x86 host: 12 epochs on 1,437 images carry the last
# bit of a float32 sum order, which differs with the CPU's vector instructions, into the
# figures (top-1 0.911 on AVX2 only, 0.872 on AVX-512/AMX; chance 0.1).
QUICKSTART_TOP1_FLOOR = 0.75
QUICKSTART_PRUNING_BAND = (0.2, 0.5)  # 0.334 measured on AVX2 only


@pytest.mark.slow
def test_quickstart_completes(tmp_path):
    """The README's main-job command, as written, runs every stage offline and ends in the
    range the README quotes, printing about as many lines as it says."""
    readme = (REPO / "README.md").read_text()
    quoted = re.search(r"ending at ([\d.]+)% test top-1\s+with ([\d.]+)%\s+of the\s+backbone's MACs pruned "
                       r"on an AVX2-only host, at ([\d.]+)% test top-1 on an AVX-512/AMX host.*?above ([\d.]+)%",
                       readme, re.S)
    avx2_top1, avx2_pruned, avx512_top1, floor = (float(x) / 100 for x in quoted.groups())
    assert floor == QUICKSTART_TOP1_FLOOR and min(avx2_top1, avx512_top1) > floor
    assert QUICKSTART_PRUNING_BAND[0] < avx2_pruned < QUICKSTART_PRUNING_BAND[1]
    lines = int(re.search(r"It prints (\d+) lines", readme).group(1))
    # As a user runs it: one CPU device, without the session's compilation cache (conftest.py).
    env = without_compilation_cache(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run(main_command(tmp_path), cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path)
    assert {m["step"] for m in records if "fgc" in m}  # the FGC stage ran
    final = [m for m in records if "eval/top1" in m][-1]
    assert final["step"] == 144
    print(f"quickstart: top-1 {final['eval/top1']:.4f}, pruning ratio {final['eval/pruning_ratio']:.3f}")
    assert final["eval/top1"] > QUICKSTART_TOP1_FLOOR
    assert QUICKSTART_PRUNING_BAND[0] < final["eval/pruning_ratio"] < QUICKSTART_PRUNING_BAND[1]
    # orbax warns when a save waits over a second for the one before: as often as the host is slow.
    shown = [line for line in result.stderr.splitlines() if "Waiting for previous save to complete" not in line]
    assert abs(len(shown) - lines) <= 3, result.stderr


def cifar_subset(target: pathlib.Path, train_per_file: int, test: int) -> pathlib.Path:
    """The first records of each file of cifar10-mini, written as a cifar-10-batches-bin directory."""
    target.mkdir()
    for name, records in [(f"data_batch_{i}.bin", train_per_file) for i in range(1, 6)] + [("test_batch.bin", test)]:
        (target / name).write_bytes(cifar_mini_head(name, records))
    return target


@pytest.mark.slow
def test_fgc_stage_starts_from_the_released_bas_checkpoint(tmp_path, cifar_mini_dir, bas_checkpoint):
    """init_from a PyTorch .pth: training starts at epoch bas.epochs with the trained network.
    On 1,280 of the real CIFAR-10 images (5 steps an epoch), 512 test images."""
    pytest.importorskip("torch")
    config = resnet20_cifar.get_config()
    config.data.source = "cifar_bin"
    config.data.dir = str(cifar_subset(tmp_path / "cifar", train_per_file=256, test=512))
    config.init_from = str(bas_checkpoint)
    config.update_from_flattened_dict({
        "batch_size": 256, "eval_batch_size": 512, "num_epochs": 2, "bas.epochs": 1,
        "fgc.k": 20, "log_every_steps": 1, "eval_every_epochs": 1, "checkpoint_every_steps": 10_000})
    report = train.train_and_evaluate(config, str(tmp_path / "run"))
    records = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert [m["step"] for m in records] == [6, 7, 8, 9, 10]  # training began at step 5: the BAS epoch was skipped
    assert "fgc" in records[0] and records[0]["kappa"] == pytest.approx(0.003)
    assert records[0]["accuracy"] > 0.6  # a trained network from the first step (chance: 0.1)
    assert report["num_examples"] == 512 and report["top1"] > 0.6
