"""Tests of fgc_jax.torch_import: PyTorch FGC/BAS checkpoints in our Flax models.

Oracles: the key names and shapes of the reference PyTorch models (written out here and
checked against the released checkpoint), forward passes re-implemented with
torch.nn.functional on the PyTorch tensors, and the released ResNet-20's accuracy on real
CIFAR-10 test images.
"""
import argparse
import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fgc_jax import torch_import
from fgc_jax.models import cifar_resnet, imagenet_resnet

torch = pytest.importorskip("torch")
F = torch.nn.functional

CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR_STD = np.array([0.2023, 0.1994, 0.2010], np.float32)
IMAGENET_STAGES = (2, 2, 2, 2)  # ResNet-18


# ----------------------------------------------------------------------------- reference models
def bn_shapes(prefix, channels):
    return {f"{prefix}.{leaf}": (channels,) for leaf in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()}


def torch_shapes(stem, stage_sizes, stage_planes, num_classes):
    """state_dict names and shapes of the reference gated ResNets (torchvision names on ImageNet)."""
    cifar = stem == "cifar"
    shapes = {"conv1.weight": (stage_planes[0], 3, 3, 3) if cifar else (64, 3, 7, 7)}
    shapes |= bn_shapes("bn1", shapes["conv1.weight"][0])
    c_in = shapes["conv1.weight"][0]
    for stage, (blocks, planes) in enumerate(zip(stage_sizes, stage_planes)):
        for j in range(blocks):
            p = f"layer{stage + 1}.{j}."
            shapes[p + "conv1.weight"] = (planes, c_in, 3, 3)
            shapes |= bn_shapes(p + "bn1", planes)
            shapes[p + "conv2.weight"] = (planes, planes, 3, 3)
            shapes |= bn_shapes(p + "bn2", planes)
            shapes[p + "gate.mlp.fc1.weight"] = (16, c_in, 1, 1)
            shapes |= bn_shapes(p + "gate.mlp.bn", 16)
            shapes[p + "gate.mlp.fc2.weight"] = (planes, 16, 1, 1)
            shapes[p + "gate.mlp.fc2.bias"] = (planes,)
            if not cifar and (stage > 0 and j == 0):
                shapes[p + "downsample.0.weight"] = (planes, c_in, 1, 1)
                shapes |= bn_shapes(p + "downsample.1", planes)
            c_in = planes
    classifier = "linear" if cifar else "fc"
    shapes[f"{classifier}.weight"] = (num_classes, c_in)
    shapes[f"{classifier}.bias"] = (num_classes,)
    return shapes


def cifar_shapes(depth, num_classes=10):
    n = (depth - 2) // 6
    return torch_shapes("cifar", (n, n, n), (16, 32, 64), num_classes)


def random_state_dict(shapes, seed):
    """Random tensors with sensible scales: He-normal weights, BN statistics near (0, 1)."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = np.array(100, np.int64)
        elif len(shape) > 1:
            state[key] = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
        elif key.endswith(("running_var", "bn.weight", "bn1.weight", "bn2.weight", "1.weight")):
            state[key] = rng.uniform(0.5, 1.5, shape)
        else:
            state[key] = rng.normal(0, 0.2, shape)
        state[key] = state[key].astype(np.float32) if state[key].dtype == np.float64 else state[key]
    return state


def torch_forward(state, x, stem="cifar", stage_sizes=(3, 3, 3), stage_planes=(16, 32, 64)):
    """Eval-mode forward of the reference gated ResNet with torch.nn.functional, NCHW.

    Returns the logits, every gate-logit tensor, and the intermediate values of `layer1.0`
    and each block's output, by name.
    """
    t = {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}
    x = torch.as_tensor(x)

    def bn(h, p):
        return F.batch_norm(h, t[p + ".running_mean"], t[p + ".running_var"], t[p + ".weight"],
                            t[p + ".bias"], training=False, eps=1e-5)

    seen = {}
    if stem == "cifar":
        h = F.relu(bn(F.conv2d(x, t["conv1.weight"], padding=1), "bn1"))
    else:
        h = F.max_pool2d(F.relu(bn(F.conv2d(x, t["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    seen["stem"] = h
    gate_logits = []
    for stage, (blocks, planes) in enumerate(zip(stage_sizes, stage_planes)):
        for j in range(blocks):
            p, stride = f"layer{stage + 1}.{j}.", 2 if stage > 0 and j == 0 else 1
            conv1 = F.conv2d(h, t[p + "conv1.weight"], stride=stride, padding=1)
            bn1 = bn(conv1, p + "bn1")
            act = F.relu(bn1)
            fc1 = F.conv2d(h.mean((2, 3), keepdim=True), t[p + "gate.mlp.fc1.weight"])
            gbn = bn(fc1, p + "gate.mlp.bn")
            logit = F.conv2d(F.relu(gbn), t[p + "gate.mlp.fc2.weight"], t[p + "gate.mlp.fc2.bias"]).flatten(1)
            gate = (logit > 0).float()
            conv2 = F.conv2d(act * gate[:, :, None, None], t[p + "conv2.weight"], padding=1)
            bn2 = bn(conv2, p + "bn2")
            if stride == 1 and h.shape[1] == planes:
                shortcut = h
            elif stem == "cifar":  # option A
                shortcut = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))
            else:
                shortcut = bn(F.conv2d(h, t[p + "downsample.0.weight"], stride=stride), p + "downsample.1")
            h = F.relu(bn2 + shortcut)
            gate_logits.append(logit)
            if p == "layer1.0.":
                seen |= dict(conv1=conv1, bn1=bn1, feature=act.mean((2, 3)), fc1=fc1.flatten(1),
                             gate_bn=gbn.flatten(1), log_alpha=logit, gate=gate, conv2=conv2, bn2=bn2,
                             shortcut=shortcut)
            seen[p + "out"] = h
    classifier = "linear" if stem == "cifar" else "fc"
    logits = F.linear(h.mean((2, 3)), t[classifier + ".weight"], t[classifier + ".bias"])
    return logits, gate_logits, seen


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def template(model, size=32):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))


def read_cifar_test(data_dir):
    """(labels, normalised NHWC float32 images) of test_batch.bin (CIFAR-10 binary records)."""
    raw = np.frombuffer((data_dir / "test_batch.bin").read_bytes(), np.uint8).reshape(-1, 1 + 3 * 32 * 32)
    images = raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255.0
    return raw[:, 0].astype(np.int64), (images - CIFAR_MEAN) / CIFAR_STD


@pytest.fixture
def released(bas_checkpoint):
    """(torch state_dict as NumPy, imported ResNet-20 variables) of the released checkpoint."""
    checkpoint = torch.load(bas_checkpoint, map_location="cpu", weights_only=True)
    state = {k: v.numpy() for k, v in checkpoint["state_dict"].items()}
    return state, torch_import.load_torch_checkpoint(bas_checkpoint, template(cifar_resnet(20)))


# ----------------------------------------------------------------------------- mapping
def test_reference_names_match_the_released_checkpoint(released):
    state, _ = released
    assert {k: v.shape for k, v in state.items()} == cifar_shapes(20)


def test_released_checkpoint_values_land_in_the_right_places(released):
    state, variables = released
    params, stats = variables["params"], variables["batch_stats"]
    assert jax.tree.structure(variables) == jax.tree.structure(template(cifar_resnet(20)))
    np.testing.assert_array_equal(params["conv1"]["kernel"], state["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["layer2_1"]["conv2"]["kernel"][1, 2, 5, 7],
                                  state["layer2.1.conv2.weight"][7, 5, 1, 2])
    np.testing.assert_array_equal(params["layer3_0"]["gate"]["mlp"]["fc1"]["kernel"],
                                  state["layer3.0.gate.mlp.fc1.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(params["layer3_0"]["gate"]["mlp"]["fc2"]["bias"],
                                  state["layer3.0.gate.mlp.fc2.bias"])
    np.testing.assert_array_equal(params["layer1_2"]["gate"]["mlp"]["bn"]["scale"],
                                  state["layer1.2.gate.mlp.bn.weight"])
    np.testing.assert_array_equal(stats["layer1_2"]["gate"]["mlp"]["bn"]["var"],
                                  state["layer1.2.gate.mlp.bn.running_var"])
    np.testing.assert_array_equal(stats["layer3_2"]["bn2"]["mean"], state["layer3.2.bn2.running_mean"])
    np.testing.assert_array_equal(params["linear"]["kernel"], state["linear.weight"].T)
    for leaf in jax.tree.leaves(variables):
        assert leaf.dtype == jnp.float32


def test_mismatched_state_dict_names_every_offending_key():
    state = random_state_dict(cifar_shapes(8), seed=0)
    del state["layer2.0.bn1.running_var"]
    state["layer9.0.conv1.weight"] = np.zeros((4, 4, 3, 3), np.float32)
    state["layer3.0.gate.mlp.fc2.weight"] = np.zeros((64, 8, 1, 1), np.float32)
    with pytest.raises(ValueError) as error:
        torch_import.torch_state_dict_to_flax(state, template(cifar_resnet(8)))
    message = str(error.value)
    assert "layer2.0.bn1.running_var" in message and "(32,)" in message
    assert "layer9.0.conv1.weight" in message and "(4, 4, 3, 3)" in message
    assert "layer3.0.gate.mlp.fc2.weight" in message and "(64, 8, 1, 1)" in message
    assert "(64, 16, 1, 1)" in message or "(64, 16)" in message  # the expected shape


def test_ungated_models_import_only_backbone_keys():
    shapes = cifar_shapes(8)
    backbone = {k: v for k, v in shapes.items() if ".gate." not in k}
    variables = torch_import.torch_state_dict_to_flax(random_state_dict(backbone, seed=5),
                                                      template(cifar_resnet(8, gated=False)))
    assert "gate" not in variables["params"]["layer1_0"]
    with pytest.raises(ValueError, match=r"unexpected.*layer1\.0\.gate\.mlp\.fc1\.weight"):
        torch_import.torch_state_dict_to_flax(random_state_dict(shapes, seed=5),
                                              template(cifar_resnet(8, gated=False)))


def test_module_prefix_and_num_batches_tracked_are_handled_without_torch(monkeypatch):
    state = random_state_dict(cifar_shapes(8), seed=1)
    wrapped = {"module." + k: v for k, v in state.items()}
    monkeypatch.setitem(sys.modules, "torch", None)  # the pure-NumPy path must not need torch
    variables = torch_import.torch_state_dict_to_flax(wrapped, template(cifar_resnet(8)))
    np.testing.assert_array_equal(variables["params"]["layer1_0"]["conv1"]["kernel"],
                                  state["layer1.0.conv1.weight"].transpose(2, 3, 1, 0))


def test_missing_torch_gives_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)
    module = importlib.reload(torch_import)  # importing the module itself needs no torch
    with pytest.raises(ImportError, match=r"pip install -e \.\[torch\]"):
        module.load_torch_checkpoint(tmp_path / "x.pth", {})


@pytest.mark.parametrize("layout", ["raw", "wrapped", "data_parallel_with_namespace"])
def test_load_accepts_the_usual_checkpoint_layouts(tmp_path, layout):
    state = random_state_dict(cifar_shapes(8), seed=2)
    tensors = {k: torch.as_tensor(v) for k, v in state.items()}
    if layout == "wrapped":
        contents = {"epoch": 3, "arch": "resnet8", "state_dict": tensors}
    elif layout == "data_parallel_with_namespace":  # argparse.Namespace: allowed, no code runs
        contents = {"args": argparse.Namespace(lr=0.1),
                    "state_dict": {"module." + k: v for k, v in tensors.items()}}
    else:
        contents = tensors
    torch.save(contents, tmp_path / "ckpt.pth")
    variables = torch_import.load_torch_checkpoint(tmp_path / "ckpt.pth", template(cifar_resnet(8)))
    np.testing.assert_array_equal(variables["batch_stats"]["layer3_0"]["bn2"]["var"],
                                  state["layer3.0.bn2.running_var"])


def test_imagenet_resnet18_matches_a_torchvision_style_forward():
    shapes = torch_shapes("imagenet", IMAGENET_STAGES, (64, 128, 256, 512), num_classes=5)
    state = random_state_dict(shapes, seed=3)
    model = imagenet_resnet(18, num_classes=5)
    variables = torch_import.torch_state_dict_to_flax(state, template(model, 64))
    x = np.random.default_rng(4).normal(size=(2, 64, 64, 3)).astype(np.float32)
    expected, gate_logits, _ = torch_forward(state, nchw(x), "imagenet", IMAGENET_STAGES, (64, 128, 256, 512))
    assert min(float(g.abs().min()) for g in gate_logits) > 1e-3  # no gate sits on its threshold
    logits, gate_outputs = model.apply(variables, jnp.asarray(x), train=False)
    for ours, theirs in zip(gate_outputs, gate_logits):
        np.testing.assert_array_equal(ours.gate, (theirs > 0).numpy())
    np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


# ----------------------------------------------------------------------------- the released ResNet-20
def test_first_block_activations_match_torch(released, cifar_mini_dir):
    state, variables = released
    _, images = read_cifar_test(cifar_mini_dir)
    x = images[:8]
    model = cifar_resnet(20)
    _, captured = model.apply(variables, jnp.asarray(x), train=False, capture_intermediates=True,
                              mutable=["intermediates"])
    got = {path[:-1]: value[0] for path, value in
           traverse_util.flatten_dict(captured["intermediates"], keep_empty_nodes=False).items()}
    _, _, expected = torch_forward(state, nchw(x))
    block = ("layer1_0",)
    out, info = got[block]

    def check(ours, name, spatial=True):
        theirs = expected[name].numpy()
        ours = nchw(ours) if spatial else np.asarray(ours)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4, err_msg=name)

    check(jax.nn.relu(got[("bn1",)]), "stem")
    check(got[block + ("conv1",)], "conv1")
    check(got[block + ("bn1",)], "bn1")
    check(info.feature, "feature", spatial=False)
    check(got[block + ("gate", "mlp", "fc1")], "fc1", spatial=False)
    check(got[block + ("gate", "mlp", "bn")], "gate_bn", spatial=False)
    check(info.log_alpha, "log_alpha", spatial=False)
    assert float(expected["log_alpha"].abs().min()) > 1e-3
    np.testing.assert_array_equal(info.gate, expected["gate"].numpy())
    assert 0 < float(expected["gate"].mean()) < 1  # the trained gates switch channels off
    check(got[block + ("conv2",)], "conv2")
    check(got[block + ("bn2",)], "bn2")
    check(out, "layer1.0.out")
    for stage in (2, 3):  # option-A shortcut blocks
        check(got[(f"layer{stage}_0",)][0], f"layer{stage}.0.out")


def test_released_resnet20_is_trained_and_matches_torch(released, cifar_mini_dir):
    state, variables = released
    labels, images = read_cifar_test(cifar_mini_dir)
    assert images.shape == (1017, 32, 32, 3)
    logits, gate_outputs = jax.jit(lambda v, x: cifar_resnet(20).apply(v, x, train=False))(variables, images)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == labels))
    assert accuracy > 0.70, accuracy  # the checkpoint reports 82.8% on the full test set
    assert 0.05 < float(np.mean([np.mean(o.gate) for o in gate_outputs])) < 0.95

    # Compare on images where no gate logit is within 1e-3 of its threshold: there float
    # noise of either framework could flip a gate and legitimately change the logits.
    expected, gate_logits, _ = torch_forward(state, nchw(images[:32]))
    clear = np.min([g.abs().amin(1).numpy() for g in gate_logits], axis=0) > 1e-3
    assert clear.sum() >= 16, clear.sum()
    for ours, theirs in zip(gate_outputs, gate_logits):
        np.testing.assert_array_equal(ours.gate[:32][clear], (theirs > 0).numpy()[clear])
    np.testing.assert_allclose(logits[:32][clear], expected.numpy()[clear], rtol=1e-4, atol=1e-4)
