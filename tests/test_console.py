"""The console of `python -m fgc_jax.main`: what is shown, how training is timed, profiling.

Oracles: hand-made log records with known paths and levels, a fake clock whose readings are
chosen by the test, and the stderr and files of a real short run.
"""
import logging
import os
import pathlib
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from configs import quickstart
from fgc_jax import config_check, console, train

REPO = pathlib.Path(__file__).resolve().parents[1]
ORBAX_FILE = "/venv/lib/python3.12/site-packages/orbax/checkpoint/_src/checkpoint_manager.py"
OWN_FILE = str(REPO / "fgc_jax" / "train.py")


def record(pathname, level, msg="a message"):
    return logging.LogRecord("name", level, pathname, 1, msg, None, None)


def test_filter_keeps_warnings_from_everyone_and_info_from_fgc_jax_on_process_0():
    first, other = console.ConsoleFilter(0), console.ConsoleFilter(1)
    assert not first.filter(record(ORBAX_FILE, logging.INFO))
    assert first.filter(record(ORBAX_FILE, logging.WARNING))
    assert other.filter(record(ORBAX_FILE, logging.ERROR))
    assert first.filter(record(OWN_FILE, logging.INFO))
    assert not other.filter(record(OWN_FILE, logging.INFO))
    assert other.filter(record(OWN_FILE, logging.WARNING))
    # A file named like ours outside the package is a library's.
    assert not first.filter(record("/elsewhere/fgc_jax_extras/train.py", logging.INFO))
    # orbax's warning at every save without metrics is dropped; its other warnings are not.
    assert not first.filter(record(ORBAX_FILE, logging.WARNING,
                                   "Requested `tracked_metric`; did not provide metrics."))
    assert first.filter(record(ORBAX_FILE, logging.WARNING, "Waiting for previous save to complete"))


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_step_clock_counts_only_timed_steps():
    fake = FakeClock()
    clock = console.StepClock(fake)
    with clock.excluded():  # the compiling first step
        fake.now += 30.0
    for _ in range(4):  # four timed steps of 0.5 s
        fake.now += 0.5
        clock.count()
    with clock.excluded():  # evaluation
        fake.now += 7.0
    with clock.excluded():  # checkpoint
        fake.now += 3.0
    assert clock.lap() == (4, 2.0)
    assert clock.eta(3600) == "0:30:00"  # 3600 steps of 0.5 s
    fake.now += 1.0
    clock.count()
    assert clock.lap() == (1, 1.0)
    assert (clock.total_steps, clock.total_seconds) == (5, 3.0)
    assert console.StepClock(fake).eta(10) == "?"


def test_flush_metrics_rates_come_from_timed_steps_only(tmp_path):
    class Writer:
        def write_scalars(self, step, scalars):
            self.row = (step, scalars)

    fake = FakeClock()
    clock = console.StepClock(fake)
    fake.now += 0.5
    for _ in range(2):
        clock.count()
    writer, pending = Writer(), [{"loss": 1.0}, {"loss": 3.0}, {"loss": 2.0}]
    means = train._flush_metrics(pending, 3, clock, 100, writer, None)  # pylint: disable=protected-access
    assert means == {"loss": 2.0, "images_per_second": 400.0, "ms_per_step": 250.0}
    assert writer.row == (3, means) and pending == []
    with clock.excluded():
        fake.now += 40.0
    means = train._flush_metrics([{"loss": 1.0}], 4, clock, 100, writer, None)  # pylint: disable=protected-access
    assert means == {"loss": 1.0}  # only a compiling step: no rate at all


def test_flush_metrics_times_the_device_work_not_its_dispatch():
    """Steps are dispatched ahead: the interval ends when their metrics reach the host."""
    class Writer:
        def write_scalars(self, step, scalars):
            pass

    work = jax.jit(lambda x: jax.lax.fori_loop(0, 30, lambda i, a: jnp.tanh(a @ a), x).sum())
    x = jnp.full((1000, 1000), 1e-3)
    work(x).block_until_ready()  # compiled
    began = time.perf_counter()
    work(x).block_until_ready()
    device_seconds = time.perf_counter() - began

    clock = console.StepClock()
    pending = [{"loss": work(x)}]  # returns at once, the device still computing
    clock.count()
    means = train._flush_metrics(pending, 1, clock, 1, Writer(), None)  # pylint: disable=protected-access
    assert means["ms_per_step"] / 1e3 > 0.5 * device_seconds, (means, device_seconds)


@pytest.mark.parametrize("value", [(5,), (3, 3), (4, 2), (-1, 2), (1.0, 2), (1, 2, 3), "1,2"])
def test_bad_profile_steps_are_rejected(value):
    config = quickstart.get_config()
    with config.ignore_type():
        config.profile_steps = value
    with pytest.raises(config_check.ConfigError, match="profile_steps"):
        config_check.check_fields(config)


def test_good_profile_steps_are_accepted():
    config = quickstart.get_config()
    for value in ((), (0, 1), (100, 105)):
        config.profile_steps = value
        config_check.check_fields(config)


@pytest.mark.slow
def test_short_run_prints_a_short_readable_console_and_writes_a_profile(tmp_path):
    """24 steps through BAS, FGC warm-up and FGC, two evaluations, checkpoints and a profile."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("GLIBC_TUNABLES", None)
    flags = ["--config.model.depth=8", "--config.num_epochs=3", "--config.bas.epochs=1",
             "--config.fgc.warmup_epochs=1", "--config.sparsity.ramp_epochs=1",
             "--config.optimizer.lr_milestones=(2,)", "--config.log_every_steps=4",
             "--config.checkpoint_every_steps=6", "--config.eval_every_epochs=2",
             "--config.profile_steps=(13,15)"]
    result = subprocess.run([sys.executable, "-m", "fgc_jax.main", "--config=configs/quickstart.py",
                             f"--workdir={tmp_path}", *flags], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) < 100, "\n".join(lines)
    own_files = {p.name for p in (REPO / "fgc_jax").rglob("*.py")}
    for line in lines:  # every absl INFO line (I<date> <time> <thread> <file>:<line>]) is ours
        match = re.match(r"I\d{4} \S+ +\d+ ([^:]+):\d+\]", line)
        assert not match or match.group(1) in own_files, line
    text = "\n".join(lines)
    assert "gated CIFAR ResNet-8 on digits" in text
    assert "1,437 train / 360 test examples, batch 128, 12 steps an epoch, 36 steps" in text
    assert re.search(r"devices +8 x cpu", text)
    assert re.search(r"[\d,]+ parameters; MACs per example: dense [\d,]+, gates [\d,]+", text)
    for phase in ("bas", "fgc_instance", "fgc_neighbours"):
        assert f"compiling the train step for phase {phase} ..." in text
    assert len(re.findall(r"compiled and ran its first train step in [\d.]+ s", text)) == 3
    assert "compiling the eval step ..." in text
    assert re.search(r"step 36/36 \(epoch 2\) .* img/s, ETA 0:00:00", text)
    assert "Config:" not in text and (tmp_path / "config.json").is_file()
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    assert "wrote a profile of steps 14-15" in text
