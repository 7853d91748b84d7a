"""configs/resnet18_imagenet.py end to end on the real-format ImageNet sample (folder layout).

Both stages (BAS, then FGC with k-NN positives from the first FGC epoch) on the 8 virtual
CPU devices; SIGTERM in the FGC stage and the same call again equal an uninterrupted run bit
for bit (kill -9 at any moment is tests/test_reliability.py's, on any config); then evaluation
(per-example MACs, pictures), compare and the cost command on its workdir; a training set of
another size is refused before resuming. At CI size the network is the config's own data path,
schedule and banks with a depth-8 CIFAR-style ResNet at 32 px (ResNet-18 itself takes minutes
to compile on 2 cores; its run is the README's longer one). Oracles: the uninterrupted run,
dense MACs counted by hand, the sample's sizes.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import ml_collections
import numpy as np
import pytest

from configs import resnet18_imagenet
from conftest import CIFAR_MINI
from fgc_jax import checkpointing, compare, evaluate, train
from fgc_jax.data import imagenet_sample
from test_reliability import REPO, assert_same_arrays, metric_rows, read_state, subprocess_env

# 194 sample images at batch 32: 7 steps an epoch; BAS epoch 0, FGC (k-NN positives) epoch 1.
TINY = {"data.source": "imagenet_folder", "data.image_size": 32, "model.arch": "cifar_resnet",
        "model.depth": 8, "batch_size": 32, "eval_batch_size": 32, "num_epochs": 2, "bas.epochs": 1,
        "fgc.warmup_epochs": 0, "fgc.k": 5, "sparsity.ramp_epochs": 1, "optimizer.lr_milestones": (2,),
        "optimizer.learning_rate": 0.0125, "checkpoint_every_steps": 4, "log_every_steps": 1,
        "eval_every_epochs": 1}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    if not CIFAR_MINI.is_dir():
        pytest.skip(f"{CIFAR_MINI} not found (../shared is absent)")
    out = tmp_path_factory.mktemp("imagenet_sample")
    imagenet_sample.write(CIFAR_MINI, out)
    return out / "folder"


def wait_until(predicate, timeout=600):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline
        time.sleep(0.01)


def tiny_config(folder) -> ml_collections.ConfigDict:
    config = resnet18_imagenet.get_config()
    config.update_from_flattened_dict(dict(TINY, **{"data.dir": str(folder)}))
    return config


@pytest.mark.slow
def test_both_stages_stop_resume_evaluate_compare(folder, tmp_path):
    straight = str(tmp_path / "straight")
    train.train_and_evaluate(tiny_config(folder), straight)

    # SIGTERM once the FGC stage is under way (step 8's checkpoint), then the same call again.
    workdir = tmp_path / "stopped"
    rows = workdir / "metrics.jsonl"
    stopper = threading.Thread(target=lambda: (
        wait_until(lambda: rows.exists() and len(rows.read_text().splitlines()) >= 9),
        os.kill(os.getpid(), signal.SIGTERM)))
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # never pytest's default: exit
    try:
        stopper.start()
        train.train_and_evaluate(tiny_config(folder), str(workdir))
        stopper.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    stopped_at = read_state(str(workdir))[1]
    assert 8 <= stopped_at < 14
    train.train_and_evaluate(tiny_config(folder), str(workdir))

    a, step_a = read_state(straight)
    b, step_b = read_state(str(workdir))
    assert step_a == step_b == 14
    assert_same_arrays(a, b)
    assert metric_rows(str(workdir)) == metric_rows(straight)
    fgc_rows = [r for r in metric_rows(straight) if r["step"] > 7 and "kappa" in r]
    assert len(fgc_rows) == 7 and all(r["kappa"] > 0 and r["fgc"] > 0 for r in fgc_rows)

    report = evaluate.run_evaluation(tiny_config(folder), str(workdir / "eval"), workdir=str(workdir))
    assert report["num_examples"] == 24
    per = np.load(workdir / "eval" / "per_example.npz")
    assert per["macs"].shape == (24,) and (per["macs"] <= report["dense_macs"]).all()
    assert np.isclose(per["macs"].mean(), report["mean_macs"])
    assert {"block_density.png", "macs_histogram.png"} <= set(report["pictures"])
    for picture in report["pictures"]:
        assert (workdir / "eval" / picture).stat().st_size > 0
    table = compare.format_table(["stopped"], [compare.read_report(str(workdir))])
    assert "stopped" in table and f"{100 * report['top1']:.2f}" in table
    # The cost command on the run's config: the network's dense MACs, by hand: a 3x3 stem (3 -> 16
    # channels) at 32x32, then two 3x3 convs per block: 16->16 at 32x32, 16->32 and 32->32 at 16x16,
    # 32->64 and 64->64 at 8x8 (option-A shortcuts: no MACs).
    dense = 9 * (3 * 16 * 1024 + 2 * 16 * 16 * 1024 + (16 * 32 + 32 * 32) * 256 + (32 * 64 + 64 * 64) * 64)
    command = [sys.executable, "-m", "fgc_jax.cost", "--config=configs/resnet18_imagenet.py", "--json",
               f"--config.data.dir={folder}", *(f"--config.{k}={v}" for k, v in TINY.items())]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["dense_macs"] == report["dense_macs"] == dense == 12_238_848

    # One image fewer: 193 rows pad to the same 200-row banks, yet the resume is refused.
    smaller = tmp_path / "smaller"
    shutil.copytree(folder, smaller)
    next((smaller / "train").rglob("*.JPEG")).unlink()
    with pytest.raises(checkpointing.CheckpointError, match=r"banks of 194 training examples, but "
                       r"the imagenet2012 data configured now has 193"):
        train.train_and_evaluate(tiny_config(smaller), str(workdir))
