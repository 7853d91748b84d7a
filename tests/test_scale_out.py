"""Scaling out: several processes on localhost train exactly like one, checkpoints move between
process layouts, start-up mistakes fail fast and clearly, and large sharded memory banks keep
their guarantees (padding, bfloat16 storage, approximate top-k).

The end-to-end tests run `python -m fgc_jax.main` through `launch/local_multiprocess.sh`:
two processes with 2 virtual CPU devices each, joined with gloo, against one process with 4
devices, on the offline digits quickstart shrunk to 9 steps (3 an epoch: BAS, FGC warm-up, FGC
with k-NN positives).

Tolerance. The two runs compute the same global batches with the same programs; they differ
only in the order in which the cross-device sums add up (in-process collectives vs gloo), so
after the first step parameters differ by ~1e-7. The gated network's gradient is not a smooth
function of the parameters at that level: changing parameters by one float32 ulp moves the
cross-entropy gradient by ~1e-3 (relative; measured in a single process with one program), and
at the quickstart's learning rate 0.1 that difference grows ~100x a step. The tests therefore
train with learning rate 1e-3, where the runs stay within 5e-5 (measured after 9 steps, the
third of each epoch padded: up to 2.0e-5 over reruns; also 5e-5 after 12 steps with a change of layout
at step 9), and compare the gradient-carrying values (grad_norm, the momentum buffer) at the level
of that ulp sensitivity. A real aggregation error (a missing or doubled share of the batch) moves
params by ~1e-4 and grad_norm by percents, far outside these bounds.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import free_port
from fgc_jax import losses, memory_bank

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "local_multiprocess.sh"

NUM_TRAIN = 1437  # digits train split
STEPS_PER_EPOCH = 3  # 1,437 digits at batch 480: two full batches and one of 477
EPOCHS = 3
TRAIN_FLAGS = (
    "--config=configs/quickstart.py",
    "--config.model.depth=8",
    "--config.batch_size=480",
    "--config.eval_batch_size=120",
    "--config.bas.epochs=1",
    "--config.fgc.warmup_epochs=1",
    "--config.optimizer.learning_rate=0.001",
    "--config.log_every_steps=1",
    "--config.eval_every_epochs=100",  # evaluate at the end of the run only
)
ATOL = 5e-5  # params, BN statistics, memory banks after the 9 steps (measured: up to 2.0e-5 across reruns)
RESUMED_ATOL = 5e-5  # the same after 8 steps and a change of layout at step 6 (measured: 1.0e-5)
LOSS_RTOL = 1e-4  # per-step loss terms (measured up to 3.6e-5 by step 8)
GRAD_RTOL = 1e-3  # gradient norms: the ulp sensitivity above
MOMENTUM_ATOL = 2e-3  # the optimiser's momentum buffer: accumulated raw gradients
RUN_TIMEOUT = 900


# ----------------------------------------------------------------------------------------------
# Helpers: launching runs, reading their results.


def subprocess_env(compilation_cache: pathlib.Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")
           and k not in ("XLA_FLAGS", "NUM_PROCESSES", "DEVICES_PER_PROCESS", "COORDINATOR_PORT",
                         "LOG_DIR", "EXTRA_XLA_FLAGS")}
    env["PYTHON"] = sys.executable
    env["PYTHONUNBUFFERED"] = "1"
    if compilation_cache is not None:
        # Single-process runs only: in a multi-process run a cache hit in one process and a miss
        # in the other skews them past gloo's fixed 30 s window for joining a collective.
        env.update(JAX_COMPILATION_CACHE_DIR=str(compilation_cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return env


class Run:
    """`launch/local_multiprocess.sh` running `fgc_jax.main` in the background."""

    def __init__(self, workdir: pathlib.Path, num_processes: int, devices: int, *flags: str,
                 timeout: int = 60, compilation_cache: pathlib.Path | None = None,
                 env: dict[str, str] | None = None):
        self.log_dir = workdir.parent / f"{workdir.name}_logs"
        shutil.rmtree(self.log_dir, ignore_errors=True)
        self.command = [str(LAUNCH), "-n", str(num_processes), "-d", str(devices), "-t", str(timeout),
                        "-l", str(self.log_dir), "--", f"--workdir={workdir}", *flags]
        self.started = time.monotonic()
        full_env = subprocess_env(compilation_cache)
        full_env.update(env or {})
        self.process = subprocess.Popen(self.command, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)

    def wait(self, timeout: float = RUN_TIMEOUT) -> tuple[int, str, float]:
        """(exit status, the script's output plus every process's log, seconds taken)."""
        try:
            output, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.terminate()  # the script stops its processes
            output, _ = self.process.communicate()
            output += f"\n[test] killed after {timeout}s"
        seconds = time.monotonic() - self.started
        for log in sorted(self.log_dir.glob("process_*.log")):
            output += f"\n===== {log.name}\n{log.read_text(errors='replace')}"
        return self.process.returncode, output, seconds

    def check(self) -> str:
        status, output, _ = self.wait()
        assert status == 0, f"{' '.join(self.command)} failed ({status}):\n{output[-6000:]}"
        return output


def load_checkpoint(workdir: pathlib.Path, step: int | None = None) -> tuple[int, dict]:
    """The whole train state of a checkpoint as NumPy arrays, whatever devices wrote it."""
    directory = workdir / "checkpoints"
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    step = steps[-1] if step is None else step
    path = directory / str(step) / "state"
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
        state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
    return step, jax.tree.map(np.asarray, state)


def read_metrics(workdir: pathlib.Path) -> dict[int, dict]:
    """metrics.jsonl as {step: merged record} (training and evaluation records of a step merged)."""
    merged: dict[int, dict] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        merged.setdefault(record.pop("step"), {}).update(record)
    return merged


def max_differences(a: dict, b: dict) -> dict[str, float]:
    """Largest absolute difference per leaf path (banks compared over the training set's rows)."""
    flat_b = {jax.tree_util.keystr(p): x for p, x in jax.tree.flatten_with_path(b)[0]}
    out = {}
    for path, x in jax.tree.flatten_with_path(a)[0]:
        name = jax.tree_util.keystr(path)
        y = flat_b[name]
        if name.startswith("['banks']"):
            x, y = x[:NUM_TRAIN], y[:NUM_TRAIN]
        assert x.shape == y.shape, (name, x.shape, y.shape)
        out[name] = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
    return out


def assert_states_match(a: dict, b: dict, atol: float = ATOL) -> None:
    differences = max_differences(a, b)
    worst = {}
    for name, difference in differences.items():
        group = name.split("]")[0] + "]"
        worst[group] = max(worst.get(group, 0.0), difference)
    print("largest |difference| per part of the state:", worst)
    assert set(differences) == {jax.tree_util.keystr(p) for p, _ in jax.tree.flatten_with_path(b)[0]}
    for name, difference in differences.items():
        limit = MOMENTUM_ATOL if name.startswith("['opt_state']") else atol
        assert difference <= limit, f"{name}: max |difference| {difference:.3g} > {limit}"
    for name in ("['step']", "['rng']"):
        assert differences[name] == 0, name
    assert any(n.startswith("['banks']") for n in differences)


def assert_metrics_match(a: dict[int, dict], b: dict[int, dict], steps) -> None:
    for step in steps:
        assert set(a[step]) == set(b[step]), step
        for name, value in a[step].items():
            if "second" in name or name.startswith("ms_"):  # timings
                continue
            if name.startswith("eval/"):
                tolerance = dict(atol=2.5 / 360) if "top" in name else dict(rtol=1e-3)
            elif name == "grad_norm":
                tolerance = dict(rtol=GRAD_RTOL)
            else:
                tolerance = dict(rtol=LOSS_RTOL, atol=1e-7)
            np.testing.assert_allclose(b[step][name], value, err_msg=f"step {step} {name}", **tolerance)


# ----------------------------------------------------------------------------------------------
# Two processes vs one, and checkpoints across process layouts.


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The 3-epoch run as 1 process x 4 devices and as 2 processes x 2 devices, side by side."""
    root = tmp_path_factory.mktemp("scale_out")
    cache = root / "compilation_cache"
    one = Run(root / "one_process", 1, 4, *TRAIN_FLAGS, f"--config.num_epochs={EPOCHS}",
              compilation_cache=cache)
    two = Run(root / "two_processes", 2, 2, *TRAIN_FLAGS, f"--config.num_epochs={EPOCHS}", timeout=120)
    two.check()
    one.check()
    return root


@pytest.mark.slow
def test_two_processes_train_like_one(trained):
    one, two = trained / "one_process", trained / "two_processes"
    total = EPOCHS * STEPS_PER_EPOCH
    step_one, state_one = load_checkpoint(one)
    step_two, state_two = load_checkpoint(two)
    assert step_one == step_two == total
    assert state_one["banks"]["block_1"]["feature"].shape == (1440, 32)  # padded to 4 devices
    assert_states_match(state_one, state_two)
    # Training moved the parameters far more than the runs differ.
    _, initial = load_checkpoint(one, step=STEPS_PER_EPOCH)
    moved = max(max_differences(state_one["params"], initial["params"]).values())
    assert moved > 100 * max(max_differences(state_one["params"], state_two["params"]).values())

    metrics_one, metrics_two = read_metrics(one), read_metrics(two)
    assert sorted(metrics_one) == sorted(metrics_two) == list(range(1, total + 1))
    assert_metrics_match(metrics_one, metrics_two, range(1, total + 1))
    # Every phase ran: batch shaping in epoch 0, the FGC loss after it; evaluation at the end.
    assert all("batch_shaping" in metrics_one[s] and "fgc" not in metrics_one[s] for s in (1, 2, 3))
    assert all("fgc" in metrics_one[s] and metrics_one[s]["kappa"] > 0 for s in range(4, total + 1))
    assert "eval/top1" in metrics_one[total]
    # Only process 0 writes metrics and the config.
    assert json.loads((two / "config.json").read_text())["batch_size"] == 480


@pytest.mark.slow
def test_checkpoints_resume_across_process_layouts(trained):
    """1-process checkpoint -> 2 processes, 2-process checkpoint -> 1 process, one more epoch each."""
    total = (EPOCHS + 1) * STEPS_PER_EPOCH
    two_from_one, one_from_two = trained / "two_from_one", trained / "one_from_two"
    for source, target in ((trained / "one_process", two_from_one), (trained / "two_processes", one_from_two)):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
    flags = (*TRAIN_FLAGS, f"--config.num_epochs={EPOCHS + 1}")
    runs = [Run(two_from_one, 2, 2, *flags, timeout=120),
            Run(one_from_two, 1, 4, *flags, compilation_cache=trained / "compilation_cache")]
    outputs = [run.check() for run in runs]
    for output in outputs:
        assert f"Resumed from checkpoint {EPOCHS * STEPS_PER_EPOCH}" in output
    step_a, state_a = load_checkpoint(two_from_one)
    step_b, state_b = load_checkpoint(one_from_two)
    assert step_a == step_b == total
    assert_states_match(state_a, state_b, atol=RESUMED_ATOL)
    metrics_a, metrics_b = read_metrics(two_from_one), read_metrics(one_from_two)
    resumed = range(EPOCHS * STEPS_PER_EPOCH + 1, total + 1)
    assert all(s in metrics_a and s in metrics_b for s in resumed)
    assert_metrics_match(metrics_a, metrics_b, resumed)


# ----------------------------------------------------------------------------------------------
# Start-up mistakes: fail fast, say what is wrong.


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    """JAX's preemption service takes SIGTERM in a multi-process run: every process stops at the
    same sync-point step with a checkpoint, though only process 1 was signalled."""
    workdir = tmp_path / "run"
    # BAS throughout: each process compiles one train step, wherever the stop falls.
    run = Run(workdir, 2, 2, *TRAIN_FLAGS, "--config.num_epochs=300", "--config.bas.epochs=300", timeout=120)
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + RUN_TIMEOUT
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
        assert run.process.poll() is None and time.monotonic() < deadline, run.wait(timeout=60)[1][-4000:]
        time.sleep(0.5)
    pids = subprocess.run(["pgrep", "-f", f"fgc_jax.main --workdir={workdir} .*--process_id=1 "],
                          capture_output=True, text=True, check=True).stdout.split()
    assert len(pids) == 1, pids
    os.kill(int(pids[0]), signal.SIGTERM)
    status, output, _ = run.wait()
    assert status == 0, output[-6000:]
    logs = [log.read_text() for log in sorted(run.log_dir.glob("process_*.log"))]
    stops = [re.findall(r"Stopped for preemption at step (\d+)", log) for log in logs]
    assert len(stops) == 2 and stops[0] == stops[1] and len(stops[0]) == 1, output[-6000:]
    step = int(stops[0][0])
    assert step < 300 * STEPS_PER_EPOCH
    assert load_checkpoint(workdir)[0] == step


def test_the_sigterm_flag_costs_no_collective_in_a_multi_process_run(monkeypatch):
    """A collective every step would stall dispatch-ahead; there the stop comes from JAX's
    preemption sync point (above), so the loop's flag is not consulted."""
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    from fgc_jax.preemption import PreemptionFlag  # pylint: disable=import-outside-toplevel

    flag = PreemptionFlag()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.raised_here() and flag.raised()  # one process: the flag itself
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        monkeypatch.setattr(multihost_utils, "process_allgather", lambda *_, **__: pytest.fail("collective"))
        assert not flag.raised()
    finally:
        flag.restore()


def run_main(*flags: str, timeout: float = 120, env: dict[str, str] | None = None
             ) -> tuple[int, str, float]:
    full_env = subprocess_env()
    full_env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu", **(env or {}))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "fgc_jax.main", *flags], cwd=REPO, env=full_env,
                            capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


def test_unreachable_coordinator_fails_within_the_timeout(tmp_path):
    timeout = 5
    status, output, seconds = run_main(
        "--config=configs/quickstart.py", f"--workdir={tmp_path / 'w'}",
        f"--coordinator_address=localhost:{free_port()}", "--num_processes=2", "--process_id=1",
        "--cpu_collectives=gloo", f"--distributed_timeout={timeout}")
    assert status == 2
    error = output.strip().splitlines()[-1]  # one line, no traceback
    assert error.startswith("error: ") and "Traceback" not in output, output[-3000:]
    assert f"was not reachable within {timeout}s" in error and "Check that process 0 of this run is running" in error
    # Python start-up and imports take a few seconds; the wait itself is bounded by the timeout.
    assert timeout <= seconds < timeout + 60, seconds


def test_without_coordinator_or_cluster_the_run_stays_single_process():
    """JAX's cluster detection finds nothing here: no distributed runtime, all local devices."""
    code = ("import jax; from fgc_jax import distributed; distributed.initialize(); "
            "print(jax.distributed.is_initialized(), jax.process_count(), jax.device_count())")
    env = subprocess_env()
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "OMPI_", "KUBERNETES_"))}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "1", "2"]


def test_bad_process_id_is_rejected_before_contacting_anyone(tmp_path):
    status, output, seconds = run_main(
        "--config=configs/quickstart.py", f"--workdir={tmp_path / 'w'}",
        f"--coordinator_address=localhost:{free_port()}", "--num_processes=2", "--process_id=2",
        "--distributed_timeout=300")
    assert status != 0
    assert "0 <= process_id < num_processes; got num_processes=2, process_id=2" in output, output[-3000:]
    assert seconds < 120  # not the 300 s start-up timeout


def test_mismatched_process_counts_are_reported_by_both_processes(tmp_path):
    port = free_port()
    common = ("--config=configs/quickstart.py", f"--workdir={tmp_path / 'w'}",
              f"--coordinator_address=localhost:{port}", "--cpu_collectives=gloo",
              "--distributed_timeout=60")
    env = subprocess_env()
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    processes = [subprocess.Popen([sys.executable, "-m", "fgc_jax.main", *common, f"--num_processes={n}",
                                   f"--process_id={i}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
                 for i, n in ((0, 2), (1, 3))]
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    expected = "was started with num_processes=3, process 0 with num_processes=2"
    for p, output in zip(processes, outputs):
        assert p.returncode != 0
        assert expected in output and "process 1 (on " in output, output[-3000:]
    assert "the processes of this run disagree" in outputs[0]
    assert "rejected this run" in outputs[1]


def rendezvous(claims, num_processes=3, timeout=3.0):
    """Runs fgc_jax.distributed's rendezvous in threads: process 0 expects `num_processes`, the
    others claim `(process_id, num_processes)`. Returns {label: None or the error message}."""
    import threading  # pylint: disable=import-outside-toplevel

    from fgc_jax import distributed  # pylint: disable=import-outside-toplevel

    port, outcome = free_port(), {}
    deadline = time.monotonic() + timeout

    def run(label, fn, *args):
        try:
            fn(*args)
            outcome[label] = None
        except distributed.DistributedStartupError as e:
            outcome[label] = str(e)

    threads = [threading.Thread(target=run, args=("0", distributed._rendezvous_coordinator, port,
                                                  num_processes, deadline))]
    threads += [threading.Thread(target=run, args=(f"{pid}/{count}#{n}", distributed._rendezvous_worker,
                                                   "localhost", port, pid, count, deadline, timeout))
                for n, (pid, count) in enumerate(claims)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 10)
    return outcome


def test_rendezvous_accepts_a_consistent_run():
    assert rendezvous([(1, 3), (2, 3)]) == {"0": None, "1/3#0": None, "2/3#1": None}


def test_rendezvous_names_a_duplicate_process_id():
    outcome = rendezvous([(1, 3), (1, 3)])
    assert "two processes were started with process_id=1" in outcome["0"]
    assert all("two processes were started with process_id=1" in outcome[k] for k in ("1/3#0", "1/3#1"))


def test_rendezvous_names_the_missing_processes_after_the_timeout():
    started = time.monotonic()
    # The worker connects at once and waits past the shared deadline (its grace period) for the
    # coordinator's verdict, which comes when the deadline passes; the bound proves the wait ends.
    outcome = rendezvous([(2, 3)], timeout=4.0)
    assert "processes [1] of 3 did not report within the timeout" in outcome["0"]
    assert "rejected this run" in outcome["2/3#0"]
    assert time.monotonic() - started < 30


def test_rendezvous_worker_waits_for_a_coordinator_whose_timeout_ends_later():
    # Process 0 started its timeout later than process 2 (it was launched later): its verdict
    # arrives after process 2's own timeout has run out, and must still be heard.
    from fgc_jax import distributed  # pylint: disable=import-outside-toplevel
    import threading  # pylint: disable=import-outside-toplevel

    port, errors = free_port(), []
    coordinator = threading.Thread(target=lambda: errors.append(pytest.raises(
        distributed.DistributedStartupError, distributed._rendezvous_coordinator, port, 3,
        time.monotonic() + 3.0)))
    coordinator.start()
    with pytest.raises(distributed.DistributedStartupError, match="rejected this run"):
        distributed._rendezvous_worker("localhost", port, 2, 3, time.monotonic() + 1.0, 1.0)
    coordinator.join()
    assert "processes [1] of 3 did not report" in str(errors[0].value)


def test_rendezvous_ignores_connections_that_are_not_processes_of_the_run():
    from fgc_jax import distributed  # pylint: disable=import-outside-toplevel
    import threading  # pylint: disable=import-outside-toplevel

    port, errors = free_port(), []
    deadline = time.monotonic() + 5

    def coordinator():
        try:
            distributed._rendezvous_coordinator(port, 2, deadline)
        except distributed.DistributedStartupError as e:
            errors.append(str(e))

    thread = threading.Thread(target=coordinator)
    thread.start()
    for _ in range(50):  # a port scanner: connects, sends garbage, leaves
        try:
            with socket.create_connection(("localhost", port), timeout=1) as stray:
                stray.sendall(b"GET / HTTP/1.1\r\n\r\n")
            break
        except OSError:
            time.sleep(0.1)
    distributed._rendezvous_worker("localhost", port, 1, 2, deadline, 5)
    thread.join()
    assert errors == []


def test_global_batch_not_divisible_by_all_devices_fails_before_compiling(tmp_path):
    # 30 examples split over 2 processes is fine, over 2 x 2 devices it is not.
    run = Run(tmp_path / "w", 2, 2, "--config=configs/quickstart.py", "--config.batch_size=30",
              timeout=60, env={"JAX_LOG_COMPILES": "1"})
    status, output, _ = run.wait(timeout=300)
    assert status != 0
    assert output.count("batch_size=30 is not divisible by the 4 devices; use a multiple of 4") >= 2, \
        output[-3000:]
    assert "Compiling" not in output  # failed while validating the config, before any jit


# ----------------------------------------------------------------------------------------------
# Memory banks at scale: padding, bfloat16 storage, approximate top-k (8 virtual devices).

NUM_DEVICES = 8


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < NUM_DEVICES:
        pytest.skip(f"needs {NUM_DEVICES} devices (conftest.py forces 8 virtual CPU devices)")
    return jax.make_mesh((NUM_DEVICES,), ("data",), devices=jax.devices()[:NUM_DEVICES])


def shard(mesh, *arrays):
    return [jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data"))) for x in arrays]


def sharded_neighbours(mesh, f, idx, bank, *, k, num_valid_rows, method="exact"):
    fn = jax.jit(jax.shard_map(
        lambda f, i, b: memory_bank.nearest_neighbours(f, i, b, k=k, num_valid_rows=num_valid_rows,
                                                       axis_name="data", method=method),
        mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data")))
    out = np.asarray(fn(*shard(mesh, f, idx, bank)))
    copies = out.reshape(NUM_DEVICES, -1, out.shape[-1])  # every device holds the global answer
    for copy in copies[1:]:
        np.testing.assert_array_equal(copy, copies[0])
    return copies[0]


def adversarial_padded_bank(num_valid_rows, rows, dim, seed=0):
    """Valid rows of norm 1; padding rows that would beat every valid row if they were counted."""
    rng = np.random.default_rng(seed)
    bank = np.full((rows, dim), 10.0, np.float32)
    valid = rng.normal(size=(num_valid_rows, dim))
    bank[:num_valid_rows] = valid / np.linalg.norm(valid, axis=1, keepdims=True)
    return bank


@pytest.mark.parametrize("method", ["exact", "approx"])
def test_sharded_padding_rows_are_never_neighbours(mesh, method):
    # 50 valid rows over 8 shards of 8: shard 6 is partly padding, shard 7 entirely. With k = 49
    # every shard must offer padding candidates (-inf) to the merge, which must drop them all.
    num_valid_rows, dim, batch = 50, 8, 16
    bank = adversarial_padded_bank(num_valid_rows, 64, dim)
    rng = np.random.default_rng(1)
    f = rng.normal(size=(batch, dim))
    f = (0.9 * f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)  # |sim| < 1: self (-2) last
    idx = rng.choice(num_valid_rows, batch, replace=False).astype(np.int32)
    for k in (5, num_valid_rows - 1):
        got = sharded_neighbours(mesh, f, idx, bank, k=k, num_valid_rows=num_valid_rows, method=method)
        assert got.max() < num_valid_rows and np.all(got != idx[:, None])
        sims = f @ bank[:num_valid_rows].T
        sims[np.arange(batch), idx] = -2.0
        expected = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(got, expected)


def test_sharded_padding_rows_carry_no_probability(mesh):
    num_valid_rows, dim, batch = 50, 8, 16
    feature_bank = adversarial_padded_bank(num_valid_rows, 64, dim, seed=2)
    gate_bank = adversarial_padded_bank(num_valid_rows, 64, dim, seed=3)
    rng = np.random.default_rng(4)
    a = rng.normal(0, 0.5, (batch, dim)).astype(np.float32)
    f = np.abs(rng.normal(size=(batch, dim))).astype(np.float32)
    idx = rng.choice(num_valid_rows, batch, replace=False).astype(np.int32)
    kwargs = dict(k=5, temperature=0.07, use_neighbours=True)
    sharded = jax.jit(jax.shard_map(
        lambda *args: losses.fgc_contrastive_loss(*args, num_valid_rows=num_valid_rows, axis_name="data",
                                                  **kwargs),
        mesh=mesh, in_specs=(P("data"),) * 5, out_specs=P()))
    with jax.set_mesh(mesh):
        loss, grad = jax.value_and_grad(sharded)(*shard(mesh, a, f, idx, feature_bank, gate_bank))
    # The same loss on the unpadded banks, on one device.
    expected_loss, expected_grad = jax.value_and_grad(
        lambda *args: losses.fgc_contrastive_loss(*args, **kwargs))(
        a, f, idx, feature_bank[:num_valid_rows], gate_bank[:num_valid_rows])
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)


def clustered_problem(num_clusters=8, per_cluster=8, dim=64, batch=16, seed=0):
    """Rows in well-separated clusters (cos ~0.95 inside, ~0 across): k-NN = the own cluster."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:num_clusters]
    rows = np.repeat(centres, per_cluster, axis=0) + 0.1 * rng.normal(size=(num_clusters * per_cluster, dim))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    idx = rng.choice(len(rows), batch, replace=False).astype(np.int32)
    features = (rows[idx] + 0.05 * rng.normal(size=(batch, dim))).astype(np.float32)
    return features, idx, rows.astype(np.float32), per_cluster


def test_bfloat16_bank_gives_the_float32_neighbour_sets_and_loss(mesh):
    f, idx, bank, per_cluster = clustered_problem()
    k = per_cluster - 1
    fp32 = sharded_neighbours(mesh, f, idx, bank, k=k, num_valid_rows=len(bank))
    bf16 = sharded_neighbours(mesh, f, idx, jnp.asarray(bank, jnp.bfloat16), k=k, num_valid_rows=len(bank))
    own_cluster = [set(range(i // per_cluster * per_cluster, (i // per_cluster + 1) * per_cluster)) - {i}
                   for i in idx]
    assert [set(row) for row in fp32] == own_cluster
    assert [set(row) for row in bf16] == own_cluster  # order inside a cluster may differ
    rng = np.random.default_rng(5)
    a = rng.normal(0, 0.3, f.shape).astype(np.float32)
    kwargs = dict(k=k, temperature=0.07, use_neighbours=True, axis_name="data")
    loss = jax.jit(jax.shard_map(lambda *args: losses.fgc_contrastive_loss(*args, **kwargs), mesh=mesh,
                                 in_specs=(P("data"),) * 5, out_specs=P()))
    loss_fp32 = loss(*shard(mesh, a, f, idx, bank, bank))
    loss_bf16 = loss(*shard(mesh, a, f, idx, *[jnp.asarray(bank, jnp.bfloat16)] * 2))
    np.testing.assert_allclose(loss_bf16, loss_fp32, rtol=2e-2)


@pytest.mark.parametrize("k", [1, 7, 40])
def test_approx_and_exact_top_k_agree_on_cpu(mesh, k):
    rng = np.random.default_rng(k)
    num_valid_rows, dim, batch = 250, 16, 16  # padded to 256 rows over 8 shards
    bank = adversarial_padded_bank(num_valid_rows, 256, dim, seed=k)
    f = rng.normal(size=(batch, dim)).astype(np.float32)
    idx = rng.choice(num_valid_rows, batch, replace=False).astype(np.int32)
    sharded = {m: sharded_neighbours(mesh, f, idx, bank, k=k, num_valid_rows=num_valid_rows, method=m)
               for m in ("exact", "approx")}
    np.testing.assert_array_equal(sharded["approx"], sharded["exact"])
    # One device, unpadded bank.
    single = {m: np.asarray(memory_bank.nearest_neighbours(f, idx, bank[:num_valid_rows], k=k, method=m))
              for m in ("exact", "approx")}
    np.testing.assert_array_equal(single["approx"], single["exact"])
    np.testing.assert_array_equal(sharded["exact"], single["exact"])


def test_approx_top_k_on_one_device_with_a_padded_bank():
    rng = np.random.default_rng(0)
    bank = adversarial_padded_bank(250, 256, 16)
    f = rng.normal(size=(4, 16)).astype(np.float32)
    idx = np.arange(4, dtype=np.int32)
    approx = memory_bank.nearest_neighbours(f, idx, bank, k=5, num_valid_rows=250, method="approx")
    exact = memory_bank.nearest_neighbours(f, idx, bank, k=5, num_valid_rows=250, method="exact")
    np.testing.assert_array_equal(approx, exact)
