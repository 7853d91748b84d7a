"""`python -m fgc_jax.infer` on the released BAS ResNet-20 and cifar10-mini."""
import json
import pathlib
import re
import subprocess
import sys

import pytest

from configs import resnet20_cifar
from fgc_jax import infer
from fgc_jax.evaluation import EvaluationError

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_infer_command_released_checkpoint(bas_checkpoint, cifar_mini_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fgc_jax.infer", "--config=configs/resnet20_cifar.py",
         "--config.data.source=cifar_bin", f"--config.data.dir={cifar_mini_dir}",
         "--config.eval_batch_size=512", f"--torch_checkpoint={bas_checkpoint}",
         "--check_examples=4", "--calibration_split=test", f"--export={tmp_path / 'exported'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "skipping vs masked on 4 test images at batch 1" in out
    assert ", 0 differing gate decisions" in out
    # The BAS stage leaves no channel unused, so slimming removes none: the slimmed network is
    # the ungated one, whose predictions differ from the gated model's on some images.
    assert "slimmed on the test split: 0 of 336 gated channels removed" in out
    agree = re.search(r"slimmed vs gated predictions on 1017 test examples: ([0-9.]+)% agree", out)
    assert agree and 10 < float(agree.group(1)) < 100
    meta = json.loads((tmp_path / "exported" / "program.json").read_text())
    assert meta["input_shape"] == [1, 32, 32, 3] and meta["dtype"] == "float32"


def test_checkpoint_of_another_model_is_one_error(bas_checkpoint, cifar_mini_dir):
    config = resnet20_cifar.get_config()
    config.model.depth = 32
    config.data.source, config.data.dir = "cifar_bin", str(cifar_mini_dir)
    with pytest.raises(EvaluationError, match="gated CIFAR ResNet-20 .9 blocks, 10 classes.*config builds"):
        infer.run_inference(config, torch_checkpoint=str(bas_checkpoint))
    with pytest.raises(EvaluationError, match="exactly one of --workdir"):
        infer.run_inference(config)


def test_bad_flag_is_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "fgc_jax.infer", "--config=configs/resnet20_cifar.py", "--torch_checkpoint=/nonexistent.pth"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
    assert "/nonexistent.pth is not a file" in result.stderr
