"""`fgc_jax.plan` and `python -m fgc_jax.cost --plan`: per-device memory and FLOPs of the compiled
train step, against hand-computed bank bytes, the model's parameter count and the k-NN dot's
FLOPs (as in tests/test_memory_bank.py)."""
import json
import subprocess
import sys

import pytest

from configs import quickstart
from fgc_jax import input_pipeline, macs, plan
from fgc_jax.models import create_model

from test_macs import REPO

ROWS = 8000  # bank rows: enough that the FGC terms are mostly bank work
WIDTHS = (32, 64)  # ResNet-8's FGC blocks (-2, -1): its last two blocks


def tiny_config():
    config = quickstart.get_config()  # 8x8 digits
    config.model.depth = 8
    config.batch_size = config.eval_batch_size = 16
    return config


@pytest.fixture(scope="module")
def plans():
    return plan.plan(tiny_config(), devices=[2, 8], bank_dtypes=["float32"], rows=ROWS)


@pytest.mark.needs_cpu
@pytest.mark.needs_devices(8)
def test_state_bytes_per_device_are_exact(plans):
    config = tiny_config()
    shape, classes = input_pipeline.input_spec(config)
    params = macs.cost_model(create_model(config.model, classes), shape).summary()["params"]
    for p in plans:
        rows_per_device = -(-ROWS // p.devices)  # padded to a multiple of the devices
        assert p.bank_bytes == 2 * rows_per_device * sum(WIDTHS) * 4  # feature + gate banks, float32
        assert p.params_bytes == params * 4  # float32, replicated
        assert 0 <= p.optimizer_bytes - params * 4 <= 64  # momentum, plus the lr and counters
        assert p.batch_per_device == 16 // p.devices
        # Every state byte is an argument of the step (with the batch).
        state = p.params_bytes + p.optimizer_bytes + p.batch_stats_bytes + p.bank_bytes
        assert state <= p.argument_bytes <= state + 16 * (8 * 8 + 3) * 4 + 1024
        assert p.total_bytes >= p.argument_bytes + p.temp_bytes - p.aliased_bytes
        fits = [name for name, capacity in plan.ACCELERATORS if p.total_bytes <= capacity]
        assert p.fits() == fits == [name for name, _ in plan.ACCELERATORS]  # a few MiB fit anywhere


@pytest.mark.needs_cpu
@pytest.mark.needs_devices(8)
def test_flops_split_into_model_and_fgc_terms(plans):
    two, eight = plans
    for p in plans:
        # Each device scores the global batch against its rows of each feature bank: 2 B (N/n) C.
        knn_dot = sum(2 * 16 * -(-ROWS // p.devices) * c for c in WIDTHS)
        assert 1.5 * knn_dot <= p.fgc_flops <= 6 * knn_dot, (p.fgc_flops, knn_dot)
    assert 3.0 <= two.model_flops / eight.model_flops <= 4.2  # batch / devices
    assert 3.5 <= two.fgc_flops / eight.fgc_flops <= 4.2  # bank rows / devices


@pytest.mark.slow
def test_plan_command_json_and_one_line_errors():
    command = [sys.executable, "-m", "fgc_jax.cost", "--config=configs/quickstart.py",
               "--config.model.depth=8", "--config.batch_size=16", "--config.eval_batch_size=16",
               "--plan", f"--rows={ROWS}"]  # the fixture's: its model-only 2-device step is in the session's cache
    out = subprocess.run(command + ["--devices=2", "--bank_dtypes=bfloat16", "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=True)
    (only,) = json.loads(out.stdout)["plans"]  # the command arranged its own 2 CPU devices
    assert (only["devices"], only["bank_dtype"], only["rows"]) == (2, "bfloat16", 8000)
    assert only["bank_bytes"] == 2 * 4000 * sum(WIDTHS) * 2  # 4,000 rows a device, 2 bytes each
    for flags, says in ((["--devices=3"], "not divisible by the 3 devices"),
                        (["--devices=two"], "--devices=two"),
                        (["--rows=0"], "--rows=0")):
        bad = subprocess.run(command + flags, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and says in bad.stderr, bad.stderr


def test_fits_are_the_accelerators_with_enough_memory():
    def plan_of(total_gib):  # a plan whose step needs `total_gib` GiB (all of it temporaries)
        return plan.StepPlan(devices=1, rows=1, bank_dtype="float32", batch_per_device=1, params_bytes=0,
                             optimizer_bytes=0, batch_stats_bytes=0, bank_bytes=0, argument_bytes=0,
                             output_bytes=0, aliased_bytes=0, temp_bytes=int(total_gib * 2**30),
                             flops=2.0, model_flops=1.0)
    assert plan_of(20).fits() == ["TPU v4", "A100 40GB", "A100 80GB", "H100 80GB", "TPU v5p", "H200"]
    # A100 40GB: 40e9 B = 37.25 GiB.
    assert plan_of(37.2).fits() == ["A100 40GB", "A100 80GB", "H100 80GB", "TPU v5p", "H200"]
    assert plan_of(37.3).fits()[0] == "A100 80GB"
    assert plan_of(94).fits() == ["TPU v5p", "H200"]  # 95 GiB; H100's 80 GB is 74.5 GiB
    assert plan_of(132).fits() == []  # H200: 141e9 B = 131.3 GiB
    assert "TPU v5p and larger" in plan.format_plan([plan_of(94)], "t")
    assert "none listed" in plan.format_plan([plan_of(132)], "t")
