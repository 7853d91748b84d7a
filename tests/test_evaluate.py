"""Evaluation against NumPy re-computations: accuracy from logits, MACs by hand, a NumPy ResNet-20.

Oracles: the CIFAR binary format and normalisation constants (FGC_SPEC §3) read here
with NumPy; MAC counts worked out by hand (FGC_SPEC §4); for the released checkpoint a
NumPy forward pass written from the spec's block definition (§1) straight off the
PyTorch state_dict, sharing no code with fgc_jax.
"""
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
import pytest

from configs import resnet20_cifar
from fgc_jax import checkpointing, evaluate, evaluation, macs, models
from fgc_jax.models import create_model
from test_macs import random_variables

REPO = pathlib.Path(__file__).resolve().parents[1]
MEAN = np.array([0.4914, 0.4822, 0.4465])
STD = np.array([0.2023, 0.1994, 0.2010])

# Hand counts (32x32 input). A stride-1 block of C->C at HxW has 2*C*C*H*W*9 MACs; the first
# block of stages 2 and 3 has C*2C*(H/2)^2*9 + 2C*2C*(H/2)^2*9.
STEM = 3 * 16 * 32 * 32 * 9  # 442,368
FULL = 2 * 16 * 16 * 32 * 32 * 9  # 4,718,592
DOWN = 16 * 32 * 16 * 16 * 9 + 32 * 32 * 16 * 16 * 9  # 3,538,944
R8_BLOCKS = np.array([FULL, DOWN, DOWN], np.float64)
R8_GATES = (16 * 16 + 16 * 16) + (16 * 16 + 16 * 32) + (32 * 16 + 16 * 64)  # 2,816
R8_DENSE = STEM + FULL + 2 * DOWN  # 12,238,848
R20_BLOCKS = np.array([FULL] * 3 + [DOWN] + [FULL] * 2 + [DOWN] + [FULL] * 2, np.float64)
R20_GATES = 9_984
R20_DENSE = 40_550_400


def write_cifar_bin(directory, images, labels):
    """CIFAR-10 binary files: test_batch.bin from (images, labels), tiny train files."""
    directory.mkdir(parents=True, exist_ok=True)

    def records(imgs, labs):
        chw = imgs.transpose(0, 3, 1, 2).reshape(len(imgs), -1)
        return np.concatenate([labs.astype(np.uint8)[:, None], chw], axis=1).tobytes()

    (directory / "test_batch.bin").write_bytes(records(images, labels))
    for i in range(1, 6):
        (directory / f"data_batch_{i}.bin").write_bytes(records(images[:8], labels[:8]))


def read_cifar_bin(path):
    raw = np.fromfile(path, np.uint8).reshape(-1, 3073)
    images = raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ((images / 255.0 - MEAN) / STD).astype(np.float32), raw[:, 0].astype(np.int64)


def tiny_config(data_dir, depth=8):
    config = resnet20_cifar.get_config()
    config.model.depth = depth
    config.data.source = "cifar_bin"
    config.data.dir = str(data_dir)
    config.eval_batch_size = 32  # 100 examples: three full batches and one of 4 + 28 padding
    return config


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """100 synthetic test images; labels of the first 60 are the model's own predictions."""
    config = tiny_config(tmp_path_factory.mktemp("data"))
    model = create_model(config.model, 10)
    variables = random_variables(model, (1, 32, 32, 3))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)
    x = ((images / 255.0 - MEAN) / STD).astype(np.float32)
    logits, outs = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    logits = np.asarray(logits)
    labels = rng.integers(0, 10, 100)
    labels[:60] = logits[:60].argmax(1)
    write_cifar_bin(pathlib.Path(config.data.dir), images, labels)
    gates = [np.asarray(o.gate) for o in outs]
    return config, model, variables, labels, logits, gates


def test_evaluate_model_matches_numpy(tiny_setup):
    config, model, variables, labels, logits, gates = tiny_setup
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    assert jax.device_count() == 8
    cost = macs.cost_model(model, (32, 32, 3))
    report = evaluation.evaluate_model(model, variables, config, mesh, cost, collect=True)

    density = np.stack([g.astype(np.float64).mean(1) for g in gates], 1)  # [100, 3]
    expected_macs = STEM + R8_GATES + density @ R8_BLOCKS
    assert expected_macs.std() > 0  # the gates really differ between examples
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert report["num_examples"] == 100
    assert report["top1"] == np.mean(logits.argmax(1) == labels)
    assert report["top1"] >= 0.6
    assert report["top5"] == np.mean([labels[i] in top5[i] for i in range(100)])
    assert report["dense_macs"] == R8_DENSE
    assert report["mean_macs"] == pytest.approx(expected_macs.mean(), rel=1e-12)
    assert report["total_macs"] == pytest.approx(expected_macs.mean() + 640, rel=1e-12)
    assert report["pruning_ratio"] == pytest.approx(1 - expected_macs.mean() / R8_DENSE, rel=1e-12)
    np.testing.assert_allclose(report["block_density"], density.mean(0), rtol=1e-12)
    p = np.percentile(expected_macs, [5, 50, 95])
    assert report["macs_percentiles"] == pytest.approx({"p5": p[0], "p50": p[1], "p95": p[2]})
    per = report["per_example"]
    np.testing.assert_array_equal(per["label"], labels)  # every example once, in order
    np.testing.assert_allclose(per["macs"], expected_macs)
    np.testing.assert_array_equal(per["gate"][2], gates[2] > 0.5)
    # Without collect: numbers only (what the training loop logs).
    plain = evaluation.evaluate_model(model, variables, config, mesh, cost)
    assert "per_example" not in plain and plain["top1"] == report["top1"]


def test_macs_percentiles_known_distribution():
    # 1..1000 with linear interpolation: position p/100 * 999 from the first value.
    got = evaluation.macs_percentiles(np.arange(1, 1001))
    assert got == pytest.approx({"p5": 50.95, "p50": 500.5, "p95": 950.05})
    assert evaluation.macs_percentiles(np.full(7, 3.0)) == {"p5": 3.0, "p50": 3.0, "p95": 3.0}


def test_resolve_blocks():
    assert models.resolve_blocks((-2, -1), 9) == [7, 8]
    assert models.resolve_blocks((0, -9), 9) == [0]
    with pytest.raises(ValueError, match="fgc.blocks names block 9"):
        models.resolve_blocks((9,), 9)


def test_workdir_checkpoint_and_errors(tiny_setup, tmp_path):
    config, model, variables, labels, logits, _ = tiny_setup
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        evaluate.run_evaluation(config, str(tmp_path / "out"), workdir=str(tmp_path / "empty"))
    manager = checkpointing.create_manager(str(tmp_path / "run"), config)
    checkpointing.save(manager, 7, {"params": variables["params"],
                                    "batch_stats": variables["batch_stats"]}, {"step": 7})
    manager.wait_until_finished()
    manager.close()
    report = evaluate.run_evaluation(config, str(tmp_path / "out"), workdir=str(tmp_path / "run"))
    assert report["num_examples"] == 100 and report["top1"] == np.mean(logits.argmax(1) == labels)
    assert report["source"].endswith("step 7")
    # The same checkpoint under a ResNet-20 config: the error names the checkpoint's model.
    with pytest.raises(evaluate.EvaluationError, match="ResNet-8 .3 blocks, 10 classes"):
        evaluate.run_evaluation(tiny_config(config.data.dir, depth=20), str(tmp_path / "o2"),
                                workdir=str(tmp_path / "run"))
    missing = tiny_config(tmp_path / "nowhere")
    missing.data.download_url = (tmp_path / "absent.tar.gz").as_uri()  # nor to be fetched
    with pytest.raises(evaluate.EvaluationError, match="test data is not available"):
        evaluate.run_evaluation(missing, str(tmp_path / "o3"), workdir=str(tmp_path / "run"))


def test_torch_checkpoint_of_other_depth(bas_checkpoint, cifar_mini_dir, tmp_path):
    config = tiny_config(cifar_mini_dir, depth=32)
    with pytest.raises(evaluate.EvaluationError, match="gated CIFAR ResNet-20 .9 blocks, 10 classes"):
        evaluate.run_evaluation(config, str(tmp_path), torch_checkpoint=str(bas_checkpoint))


# --- The released BAS checkpoint: CLI vs a NumPy ResNet-20 ---------------------------------


def numpy_resnet20(state_dict, x):
    """Eval-mode gated ResNet-20 (FGC_SPEC §1) in float64 NumPy, NHWC; returns logits, densities."""
    w = {k: v.double().numpy() for k, v in state_dict.items()}

    def conv3(x, kernel, stride):  # kernel: PyTorch OIHW
        windows = sliding_window_view(np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), axis=(1, 2))
        return np.tensordot(windows[:, ::stride, ::stride], kernel, axes=([3, 4, 5], [1, 2, 3]))

    def bn(x, p):
        return (x - w[p + ".running_mean"]) / np.sqrt(w[p + ".running_var"] + 1e-5) * w[p + ".weight"] \
            + w[p + ".bias"]

    x = np.maximum(bn(conv3(x, w["conv1.weight"], 1), "bn1"), 0)
    densities = []
    for stage, planes in enumerate((16, 32, 64)):
        for j in range(3):
            p = f"layer{stage + 1}.{j}"
            stride = 2 if stage > 0 and j == 0 else 1
            h = np.maximum(bn(conv3(x, w[p + ".conv1.weight"], stride), p + ".bn1"), 0)
            g = np.maximum(bn(x.mean((1, 2)) @ w[p + ".gate.mlp.fc1.weight"][:, :, 0, 0].T,
                              p + ".gate.mlp.bn"), 0)
            gate = (g @ w[p + ".gate.mlp.fc2.weight"][:, :, 0, 0].T + w[p + ".gate.mlp.fc2.bias"] > 0) * 1.0
            densities.append(gate.mean(1))
            h = bn(conv3(h * gate[:, None, None, :], w[p + ".conv2.weight"], 1), p + ".bn2")
            shortcut = x
            if stride != 1 or x.shape[-1] != planes:  # option A
                shortcut = np.pad(x[:, ::2, ::2], ((0, 0), (0, 0), (0, 0), (planes // 4, planes // 4)))
            x = np.maximum(h + shortcut, 0)
    logits = x.mean((1, 2)) @ w["linear.weight"].T + w["linear.bias"]
    return logits, np.stack(densities, 1)


def test_cli_released_checkpoint(bas_checkpoint, cifar_mini_dir, tmp_path):
    torch = pytest.importorskip("torch")
    out_dir = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "fgc_jax.evaluate", "--config=configs/resnet20_cifar.py",
         "--config.data.source=cifar_bin", f"--config.data.dir={cifar_mini_dir}",
         f"--torch_checkpoint={bas_checkpoint}", f"--output_dir={out_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pruning ratio" in result.stdout and "top-1" in result.stdout

    report = json.loads((out_dir / "eval_report.json").read_text())
    for key in ("num_examples", "top1", "top5", "mean_macs", "dense_macs", "total_macs",
                "pruning_ratio", "block_density", "macs_percentiles", "alignment"):
        assert key in report
    for name in ("block_density.png", "class_channel_gates_block7.png",
                 "class_channel_gates_block8.png", "macs_histogram.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    x, labels = read_cifar_bin(cifar_mini_dir / "test_batch.bin")
    assert report["num_examples"] == len(labels) == 1017
    assert report["top1"] > 0.7
    assert report["dense_macs"] == R20_DENSE
    assert len(report["block_density"]) == 9
    blocks = report["alignment"]["blocks"]
    assert [b["block"] for b in blocks if b["fgc"]] == [7, 8]
    assert all(set(b["overlap"]) == {"5", "10", "50"} for b in blocks)

    # Per-example arrays: the report's numbers are their means over the 1017 examples.
    per = np.load(out_dir / "per_example.npz")
    np.testing.assert_array_equal(per["label"], labels)
    assert report["top1"] == pytest.approx(np.mean(per["prediction"] == labels), abs=1e-12)
    assert report["mean_macs"] == pytest.approx(np.mean(per["macs"]), rel=1e-12)
    assert report["pruning_ratio"] == pytest.approx(1 - np.mean(per["macs"]) / R20_DENSE, rel=1e-12)

    # The same forward pass in NumPy on the first images: predictions and MACs agree.
    n = 96
    state_dict = torch.load(bas_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    logits, density = numpy_resnet20(state_dict, x[:n].astype(np.float64))
    expected_macs = STEM + R20_GATES + density @ R20_BLOCKS
    assert np.sum(logits.argmax(1) != per["prediction"][:n]) <= 1
    assert np.sum(np.abs(expected_macs - per["macs"][:n]) > 1) <= 1  # a gate at the threshold may flip
    assert np.mean(logits.argmax(1) == labels[:n]) > 0.7
