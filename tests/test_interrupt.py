"""Ctrl-C: SIGINT with its default disposition, as a terminal sends it, during compilation, at a
training step and twice in a row; in one process of two; and in the shared command-line handling.

Each run is judged by its exit status (killed by SIGINT, which a shell shows as 130), its console
(no traceback; the one `interrupted (Ctrl-C): ...` line) and the checkpoints on disk; the run
that follows resumes, and ends bitwise equal to an uninterrupted run (test_reliability's oracle).
"""
import fcntl
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import without_compilation_cache
from fgc_jax import checkpointing, compare, evaluate, train
from fgc_jax.preemption import PreemptionFlag
from test_evaluate import tiny_setup  # noqa: F401 (a fixture)
from test_reliability import (REPO, assert_same_arrays, flags_for, main_command, read_state, steps_on_disk,
                              subprocess_env, tiny_config)
from test_scale_out import (LAUNCH, RUN_TIMEOUT, STEPS_PER_EPOCH, TRAIN_FLAGS, load_checkpoint,
                            subprocess_env as multiprocess_env)

# Runs the command with SIGINT's default action, whatever this process's: a non-interactive shell
# starts background jobs with SIGINT ignored, and children inherit that.
DEFAULT_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                  "os.execvp(sys.argv[1], sys.argv[1:])")
INTERRUPTED = -signal.SIGINT  # what a shell shows as status 130


def sigint_disposition(pid: int) -> str:
    """'ignored', 'caught' (a handler is installed) or 'default', from /proc/PID/status."""
    status = pathlib.Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":\t", 1) for line in status if ":\t" in line)
    bit = 1 << (signal.SIGINT - 1)
    if int(fields["SigIgn"], 16) & bit:
        return "ignored"
    return "caught" if int(fields["SigCgt"], 16) & bit else "default"


class Console:
    """A command started with SIGINT's default disposition; its output read line by line as it comes."""

    def __init__(self, command, env, log: pathlib.Path | None = None):
        self.lines: list[str] = []
        self.process = subprocess.Popen([sys.executable, "-c", DEFAULT_SIGINT, *command], cwd=REPO,
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        self.log = log
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.log:
                with open(self.log, "a", encoding="utf-8") as f:
                    f.write(line)

    def wait_for(self, pattern: str, timeout: float = 600) -> re.Match:
        """The first match of `pattern` in a line; fails if the process ends or times out first."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            while seen < len(self.lines):
                match = re.search(pattern, self.lines[seen])
                seen += 1
                if match:
                    return match
            assert self.process.poll() is None or self._reader.is_alive(), self.text()[-4000:]
            time.sleep(0.01)
        pytest.fail(f"no line matching {pattern!r} within {timeout}s:\n{self.text()[-4000:]}")

    def interrupt(self) -> None:
        self.process.send_signal(signal.SIGINT)

    def finish(self, timeout: float = 600) -> int:
        status = self.process.wait(timeout=timeout)
        self._reader.join(timeout=60)
        return status

    def text(self) -> str:
        return "\n".join(self.lines)


def checkpoint_entries(workdir) -> list[str]:
    directory = pathlib.Path(workdir, "checkpoints")
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def assert_one_interrupt_line(console: Console, expected: str, last: bool = True) -> None:
    """No traceback, and one `interrupted (Ctrl-C): ...` line, matching `expected` (and the last
    line: in a multi-process run JAX's shutdown may log after it)."""
    text = console.text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-4000:]
    lines = [line for line in console.lines if line.startswith("interrupted (Ctrl-C)")]
    assert len(lines) == 1 and (console.lines[-1] == lines[0] or not last), text[-4000:]
    assert re.fullmatch(r"interrupted \(Ctrl-C\): " + expected, lines[0]), text[-4000:]


@pytest.mark.slow
def test_ctrl_c_during_compilation_at_a_step_and_twice_then_resume_bitwise(tmp_path, straight):
    """One workdir, three runs of the same command and a resume:

    1. Ctrl-C while the first train step compiles: it stops with one line, nothing saved.
    2. The rerun starts from scratch (nothing of run 1 is trusted); Ctrl-C at a training step
       saves a checkpoint of the next step boundary, says so in one line, exit as interrupted.
    3. The rerun resumes from that checkpoint; two Ctrl-C in a row stop it at once: no
       traceback, no new line, the earlier checkpoints intact.
    4. A rerun (in this process) resumes from the newest committed checkpoint, without the
       temporary directory of a save cut short, and ends bitwise equal to the uninterrupted run.
    """
    workdir = tmp_path / "run"
    command = main_command(workdir, *flags_for())
    durations = {}

    # 1. During compilation (no compilation cache, so that it compiles).
    began = time.monotonic()
    run = Console(command, without_compilation_cache(subprocess_env()))
    run.wait_for(r"compiling the train step for phase")
    assert sigint_disposition(run.process.pid) == "caught"
    run.interrupt()
    assert run.finish() == INTERRUPTED, run.text()[-4000:]
    assert_one_interrupt_line(run, r"stopped before training began, nothing was saved; rerun the same "
                                   r"command to start \(or resume\) the run")
    assert checkpoint_entries(workdir) == []  # no step, no temporary directory
    with open(workdir / "lock", "rb") as lock:  # released: its flock died with the process
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    durations["during compilation"] = time.monotonic() - began

    # 2. At a training step.
    began = time.monotonic()
    run = Console(command, subprocess_env())
    logged = int(run.wait_for(r"step (\d+)/24 ").group(1))
    run.interrupt()
    assert run.finish() == INTERRUPTED, run.text()[-4000:]
    assert "Resumed from checkpoint" not in run.text()
    stopped = int(re.fullmatch(r"interrupted \(Ctrl-C\): stopped at step (\d+) and saved a checkpoint "
                               r"of it; rerun the same command to resume", run.lines[-1]).group(1))
    assert_one_interrupt_line(run, rf"stopped at step {stopped} .*")
    assert "Ctrl-C received: the run stops at the next step boundary" in run.text()
    assert logged <= stopped < 24
    assert steps_on_disk(workdir)[-1] == stopped
    assert not any("tmp" in name for name in checkpoint_entries(workdir))
    durations["at a step"] = time.monotonic() - began

    # 3. Twice in a row: the second stops the process at once, whatever it is doing.
    began = time.monotonic()
    before = steps_on_disk(workdir)
    run = Console(command, subprocess_env())
    run.wait_for(rf"Resumed from checkpoint {stopped} ")
    run.wait_for(r"step \d+/24 ")
    run.interrupt()
    run.wait_for(r"Ctrl-C received")
    assert sigint_disposition(run.process.pid) == "default"
    run.interrupt()
    assert run.finish() == INTERRUPTED, run.text()[-4000:]
    assert "Traceback" not in run.text() and "interrupted (Ctrl-C)" not in run.text(), run.text()[-4000:]
    after = steps_on_disk(workdir)
    assert set(before) <= set(after) and after[-1] < 24  # no earlier checkpoint lost
    durations["twice"] = time.monotonic() - began

    # 4. The resume: from the newest committed checkpoint, to the uninterrupted run's arrays.
    began = time.monotonic()
    train.train_and_evaluate(tiny_config(), str(workdir))
    assert not any("tmp" in name for name in checkpoint_entries(workdir))
    a, step_a = read_state(straight)
    b, step_b = read_state(str(workdir))
    assert step_a == step_b == 24
    assert_same_arrays(a, b)
    durations["resume"] = time.monotonic() - began
    print("seconds:", {k: round(v, 1) for k, v in durations.items()})


@pytest.mark.slow
def test_ctrl_c_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    """As test_scale_out's SIGTERM test: two processes, Ctrl-C to process 1 only (started, as by
    its own terminal, with SIGINT's default disposition). Both stop at the same step, a
    checkpoint of it on disk; process 1 ends as interrupted, process 0 as preempted."""
    workdir = tmp_path / "run"
    # BAS throughout: each process compiles one train step, wherever the stop falls.
    flags = (f"--workdir={workdir}", *TRAIN_FLAGS, "--config.num_epochs=300", "--config.bas.epochs=300")
    dry_run = subprocess.run([str(LAUNCH), "-n", "2", "-d", "2", "-t", "120", "--dry-run", "--", *flags],
                             cwd=REPO, env=multiprocess_env(), capture_output=True, text=True, check=True)
    commands = [shlex.split(line) for line in dry_run.stdout.splitlines()]
    assert len(commands) == 2
    runs = [Console(command, multiprocess_env(), log=tmp_path / f"process_{i}.log")
            for i, command in enumerate(commands)]
    try:
        runs[0].wait_for(r"step 2/", timeout=RUN_TIMEOUT)
        runs[1].interrupt()
        statuses = [run.finish(timeout=RUN_TIMEOUT) for run in runs]
    finally:
        for run in runs:
            if run.process.poll() is None:
                run.process.kill()
    output = "\n".join(f"===== process {i}\n{run.text()[-4000:]}" for i, run in enumerate(runs))
    assert statuses == [0, INTERRUPTED], output
    step = int(re.search(r"Stopped for preemption at step (\d+)", runs[0].text()).group(1))
    assert_one_interrupt_line(runs[1], rf"stopped at step {step} and saved a checkpoint of it; .*", last=False)
    assert "Traceback" not in runs[0].text(), output
    assert 2 <= step < 300 * STEPS_PER_EPOCH
    assert load_checkpoint(workdir)[0] == step


def test_the_flag_stops_at_once_before_training_and_at_a_step_boundary_after(monkeypatch):
    """In this process: before `save_on_interrupt` a Ctrl-C raises KeyboardInterrupt at once; after
    it, it sets the flag and leaves SIGINT's default action for a second one; `restore` puts
    the handler back. A SIGINT ignored on entry stays ignored."""
    previous = signal.getsignal(signal.SIGINT)
    # Python's own handler, as in an interactive session (a test runner started as a background
    # job of a non-interactive shell inherits SIGINT ignored, which the flag keeps ignoring).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    flag = PreemptionFlag()
    try:
        with pytest.raises(KeyboardInterrupt, match="before training began, nothing was saved"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
        assert not flag.raised_here() and not flag.interrupted
        flag.save_on_interrupt()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert flag.raised() and flag.interrupted
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
        with pytest.raises(KeyboardInterrupt, match="stopped at step 7 and saved a checkpoint of it"):
            flag.raise_if_interrupted(7)
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        flag = PreemptionFlag()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        flag.restore()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_command_interrupted_prints_one_line_and_ends_as_interrupted():
    """`cli.run`, shared by main, evaluate, cost and compare: a Ctrl-C while the command works."""
    code = ("import os, signal, time; from fgc_jax import cli\n"
            "def main(argv):\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(60)\n"
            "cli.run(main, check_config=False)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", DEFAULT_SIGINT, sys.executable, "-c", code], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == INTERRUPTED, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        "interrupted (Ctrl-C): stopped before it finished; rerun the same command"], result.stderr[-3000:]


def test_an_evaluation_interrupted_while_writing_leaves_no_report(tiny_setup, tmp_path, monkeypatch):
    """A Ctrl-C while `evaluate` writes its outputs: no report is left (neither the earlier one nor
    half of the new one), so `compare` reads none; the rerun writes it whole."""
    config, _, variables, *_ = tiny_setup
    manager = checkpointing.create_manager(str(tmp_path / "run"), config)
    checkpointing.save(manager, 7, {"params": variables["params"], "batch_stats": variables["batch_stats"]},
                       {"step": 7})
    checkpointing.wait(manager)
    manager.close()
    out = tmp_path / "eval"
    out.mkdir()
    (out / evaluate.REPORT_NAME).write_text('{"top1": 0.5}')  # an earlier evaluation's

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(evaluate.np, "savez_compressed", ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            evaluate.run_evaluation(config, str(out), workdir=str(tmp_path / "run"))
    assert not any(p.name.startswith(evaluate.REPORT_NAME) for p in out.iterdir())
    with pytest.raises(FileNotFoundError, match="no eval_report.json"):
        compare.read_report(str(out))
    report = evaluate.run_evaluation(config, str(out), workdir=str(tmp_path / "run"))
    assert compare.read_report(str(out))["top1"] == report["top1"]


def test_ctrl_c_during_the_imports_of_a_command_is_one_line(tmp_path):
    """A Ctrl-C one second after `python -m fgc_jax.main` starts lands in its imports (JAX, Flax,
    orbax take seconds; on a fast host it may land a little later, before training): one line, no
    traceback (an interrupted extension module's import once surfaced as an ImportError), ended
    as interrupted, nothing saved."""
    workdir = tmp_path / "run"
    console = Console([sys.executable, "-m", "fgc_jax.main", "--config=configs/quickstart.py",
                       f"--workdir={workdir}"], subprocess_env())
    time.sleep(1.0)
    console.interrupt()
    assert console.finish(timeout=120) == INTERRUPTED, console.text()[-4000:]
    assert_one_interrupt_line(console, r"stopped (while the command started|before training began), "
                                       r"nothing was saved; rerun the same command.*")
    assert not (workdir / "checkpoints").exists()
