"""Tests of fgc_jax.models: shapes, parameter counts, initialisation and the gated block.

Oracles: the figures of FGC_SPEC.md §1/§4, torchvision's ResNet-18/34 parameter counts,
PyTorch's default initialisation, and a NumPy re-implementation of the gated block.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from fgc_jax import models
from fgc_jax.models import GatedBasicBlock, cifar_resnet, imagenet_resnet
from fgc_jax.models.resnet import _materialise

CIFAR_PLANES = (16, 32, 64)
IMAGENET_PLANES = (64, 128, 256, 512)


def init(model, shape):
    return jax.jit(lambda key: model.init({"params": key}, jnp.zeros(shape), train=False))(jax.random.key(0))


def abstract_init(model, shape):
    return jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros(shape), train=False))


def apply(model, variables, x, train):
    if not train:
        return model.apply(variables, x, train=False), None
    return model.apply(variables, x, train=True, rngs={"gate": jax.random.key(1)}, mutable=["batch_stats"])


def block_planes(stage_sizes, planes):
    return [p for n, p in zip(stage_sizes, planes) for _ in range(n)]


def param_counts(params):
    """(backbone, gate) parameter counts; gate = everything under a module named 'gate'."""
    flat = traverse_util.flatten_dict(params)
    gate = sum(int(np.prod(v.shape)) for path, v in flat.items() if "gate" in path)
    return sum(int(np.prod(v.shape)) for v in flat.values()) - gate, gate


@pytest.fixture(scope="module")
def resnet8():
    """The one really initialised network (initialisation compiles slowly on CPU)."""
    model = cifar_resnet(8)
    return model, init(model, (2, 32, 32, 3))


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
@pytest.mark.parametrize("train", [False, True])
def test_cifar_resnets_have_the_right_output_shapes(depth, train):
    model = cifar_resnet(depth, num_classes=10)
    x = jnp.zeros((2, 32, 32, 3))
    variables = abstract_init(model, x.shape)
    (logits, gate_outputs), _ = jax.eval_shape(lambda v: apply(model, v, x, train), variables)
    n = (depth - 2) // 6
    assert logits.shape == (2, 10)
    assert len(gate_outputs) == 3 * n
    for out, planes in zip(gate_outputs, block_planes((n, n, n), CIFAR_PLANES)):
        for field in (out.log_alpha, out.prob, out.gate, out.feature):
            assert field.shape == (2, planes)


@pytest.mark.parametrize("depth,stage_sizes", [(18, (2, 2, 2, 2)), (34, (3, 4, 6, 3))])
def test_imagenet_resnets_have_the_right_output_shapes(depth, stage_sizes):
    model = imagenet_resnet(depth)
    x = jnp.zeros((2, 224, 224, 3))
    variables = abstract_init(model, x.shape)
    for train in (False, True):
        (logits, gate_outputs), _ = jax.eval_shape(lambda v: apply(model, v, x, train), variables)
        assert logits.shape == (2, 1000)
        planes = block_planes(stage_sizes, IMAGENET_PLANES)
        assert [o.gate.shape for o in gate_outputs] == [(2, p) for p in planes]


@pytest.mark.parametrize("depth", [8, 20])
def test_cifar_resnet_runs_in_train_and_eval_mode(depth, resnet8):
    if depth == 8:
        model, variables = resnet8
    else:
        model = cifar_resnet(depth)
        variables = as_float32(randomised(abstract_init(model, (2, 32, 32, 3)), seed=0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    for train in (False, True):
        (logits, gate_outputs), updates = apply(model, variables, x, train)
        assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
        assert len(gate_outputs) == (depth - 2) // 2
        for out in gate_outputs:
            assert set(np.unique(out.gate)) <= {0.0, 1.0}
            np.testing.assert_allclose(out.prob, jax.nn.sigmoid(out.log_alpha), rtol=1e-6)
            assert np.all(np.asarray(out.feature) >= 0)  # pooled ReLU output
        if train:  # running statistics move in train mode
            old, new = variables["batch_stats"]["bn1"]["mean"], updates["batch_stats"]["bn1"]["mean"]
            assert np.any(np.asarray(old) != np.asarray(new))


def test_train_mode_needs_the_gate_rng(resnet8):
    model, variables = resnet8
    with pytest.raises(Exception, match="gate"):
        model.apply(variables, jnp.zeros((2, 32, 32, 3)), train=True, mutable=["batch_stats"])


def test_ungated_model_has_no_gates():
    model = cifar_resnet(20, gated=False)
    variables = abstract_init(model, (2, 32, 32, 3))
    paths = traverse_util.flatten_dict(variables["params"])
    assert not any("gate" in p for p in paths)
    assert param_counts(variables["params"]) == (269_722, 0)
    logits, gate_outputs = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 32, 32, 3)), train=False),
                                          variables)
    assert logits.shape == (2, 10) and gate_outputs == ()


def test_unknown_depth_or_architecture_raises():
    for depth in (21, 2, 0):
        with pytest.raises(ValueError, match="depth"):
            cifar_resnet(depth)
    with pytest.raises(ValueError, match="depth"):
        imagenet_resnet(50)
    config = ml_collections.ConfigDict(dict(arch="vgg", depth=16, gated=True, gate_hidden=16, tau=2 / 3))
    with pytest.raises(ValueError, match="arch"):
        models.create_model(config, num_classes=10)


# ----------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("depth,backbone,gate", [(20, 269_722, 10_608), (32, 464_154, 18_192),
                                                 (56, 853_018, 33_360)])
def test_cifar_parameter_counts_match_the_spec(depth, backbone, gate):
    assert param_counts(abstract_init(cifar_resnet(depth), (1, 32, 32, 3))["params"]) == (backbone, gate)


@pytest.mark.parametrize("depth,stage_sizes,torchvision_params", [(18, (2, 2, 2, 2), 11_689_512),
                                                                  (34, (3, 4, 6, 3), 21_797_672)])
def test_imagenet_parameter_counts_match_torchvision(depth, stage_sizes, torchvision_params):
    backbone, gate = param_counts(abstract_init(imagenet_resnet(depth), (1, 224, 224, 3))["params"])
    assert backbone == torchvision_params
    # Gate network per block: dense C_in->16 (no bias), BN(16), dense 16->C_out with bias.
    planes = block_planes(stage_sizes, IMAGENET_PLANES)
    inputs = [64] + planes[:-1]
    assert gate == sum(c_in * 16 + 2 * 16 + 16 * c_out + c_out for c_in, c_out in zip(inputs, planes))


def test_initialisation_follows_pytorch_defaults(resnet8):
    _, variables = resnet8
    params = variables["params"]
    flat = traverse_util.flatten_dict(params)
    # Every conv and dense kernel, gates included, ~ N(0, 2/fan_in), untruncated.
    kernels = {p: np.asarray(v) for p, v in flat.items() if p[-1] == "kernel"}
    assert len(kernels) == 1 + 3 * 4 + 1  # stem, (conv1, conv2, fc1, fc2) per block, linear
    z = []
    for path, w in kernels.items():
        fan_in = int(np.prod(w.shape[:-1]))
        np.testing.assert_allclose(w.std(), np.sqrt(2.0 / fan_in), rtol=4 / np.sqrt(2 * w.size), err_msg=path)
        z.append(np.ravel(w) / np.sqrt(2.0 / fan_in))
    z = np.concatenate(z)
    np.testing.assert_allclose(z.std(), 1.0, rtol=0.01)
    assert abs(z.mean()) < 0.01
    np.testing.assert_allclose(np.mean(np.abs(z) > 2), 0.0455, atol=0.003)  # normal, untruncated tail
    # Gate second-layer bias ~ U(+-1/sqrt(16)), classifier bias ~ U(+-1/sqrt(64)).
    fc2_bias = np.concatenate([v for p, v in flat.items() if p[-2:] == ("fc2", "bias")])
    assert fc2_bias.size == 16 + 32 + 64
    assert np.abs(fc2_bias).max() <= 0.25 and np.abs(fc2_bias).max() > 0.2
    linear_bias = np.asarray(params["linear"]["bias"])
    assert np.abs(linear_bias).max() <= 1 / 8 and np.abs(linear_bias).max() > 0.05
    # BatchNorm: scale 1, offset 0, running mean 0, running variance 1.
    bn = {p: v for p, v in traverse_util.flatten_dict(variables).items() if p[-2].startswith("bn")}
    assert len(bn) == 4 * (1 + 3 * 3)  # stem + (bn1, bn2, gate bn) per block, 4 leaves each
    for path, value in bn.items():
        np.testing.assert_array_equal(value, 1.0 if path[-1] in ("scale", "var") else 0.0)


# ----------------------------------------------------------------------------- the gated block
def conv_numpy(x, kernel, stride):
    """'Same' 3x3 (or 1x1) convolution with symmetric padding, NHWC x HWIO, float64."""
    kh, kw = kernel.shape[:2]
    pad = (kh - 1) // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h_out = (x.shape[1] + 2 * pad - kh) // stride + 1
    w_out = (x.shape[2] + 2 * pad - kw) // stride + 1
    out = np.zeros((x.shape[0], h_out, w_out, kernel.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i:i + stride * h_out:stride, j:j + stride * w_out:stride, :]
            out += patch @ kernel[i, j]
    return out


def bn_numpy(x, params, stats, eps=1e-5):
    return (x - stats["mean"]) / np.sqrt(stats["var"] + eps) * params["scale"] + params["bias"]


def relu(x):
    return np.maximum(x, 0.0)


def block_numpy(x, params, stats, stride, planes):
    """Eval-mode gated BasicBlock of FGC_SPEC.md §1 with an option-A shortcut."""
    h = relu(bn_numpy(conv_numpy(x, params["conv1"]["kernel"], stride), params["bn1"], stats["bn1"]))
    feature = h.mean(axis=(1, 2))
    mlp, mlp_stats = params["gate"]["mlp"], stats["gate"]["mlp"]
    g = relu(bn_numpy(x.mean(axis=(1, 2)) @ mlp["fc1"]["kernel"], mlp["bn"], mlp_stats["bn"]))
    log_alpha = g @ mlp["fc2"]["kernel"] + mlp["fc2"]["bias"]
    gate = (log_alpha > 0).astype(np.float64)
    h = conv_numpy(h * gate[:, None, None, :], params["conv2"]["kernel"], 1)
    h = bn_numpy(h, params["bn2"], stats["bn2"])
    shortcut = x
    if stride != 1 or x.shape[-1] != planes:
        pad = planes // 4
        shortcut = np.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (pad, pad)))
    return relu(h + shortcut), feature, log_alpha, gate


def randomised(variables, seed):
    """Random values of the right shapes everywhere, variances positive, gate biases +-3."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, v in traverse_util.flatten_dict(variables).items():
        value = rng.normal(0.0, 0.3, v.shape)
        if path[-1] == "var":
            value = rng.uniform(0.5, 2.0, v.shape)
        elif path[-1] == "scale":
            value = rng.uniform(0.5, 1.5, v.shape)
        elif path[-2:] == ("fc2", "bias"):
            value = rng.choice([-3.0, 3.0], v.shape)  # some channels off, some on
        flat[path] = value
    return traverse_util.unflatten_dict(flat)


def as_float32(tree):
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), tree)


@pytest.fixture(scope="module")
def block():
    """A stride-2, 16 -> 32 channel gated block with random parameters and statistics."""
    module = GatedBasicBlock(planes=32, stride=2, shortcut="A")
    x = np.random.default_rng(1).normal(size=(3, 8, 8, 16))
    shapes = abstract_init(module, x.shape)
    return module, randomised(shapes, seed=2), x


def run_block(module, variables, x):
    out, info = module.apply(as_float32(variables), jnp.asarray(x, jnp.float32), train=False)
    return np.asarray(out), info


def test_gated_block_matches_numpy_in_eval_mode(block):
    module, variables, x = block
    out, info = run_block(module, variables, x)
    expected, feature, log_alpha, gate = block_numpy(x, variables["params"], variables["batch_stats"], 2, 32)
    assert 0 < gate.mean() < 1
    np.testing.assert_allclose(info.log_alpha, log_alpha, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(info.gate, gate)
    np.testing.assert_allclose(info.feature, feature, rtol=1e-4, atol=1e-4)  # before gating
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_a_closed_gate_cuts_its_channel_out_of_conv2(block):
    module, variables, x = block
    out, info = run_block(module, variables, x)
    gate = np.asarray(info.gate)
    closed = int(np.flatnonzero(gate.max(0) == 0)[0])  # off for every example
    opened = int(np.flatnonzero(gate.min(0) == 1)[0])  # on for every example

    def perturbed(channel):
        v = jax.tree.map(np.copy, variables)
        v["params"]["bn1"]["bias"][channel] += 2.0  # raises relu(bn1(conv1(x))) on that channel
        return run_block(module, v, x)

    out_closed, info_closed = perturbed(closed)
    np.testing.assert_array_equal(out_closed, out)
    assert np.all(np.asarray(info_closed.feature)[:, closed] > np.asarray(info.feature)[:, closed])
    out_opened, _ = perturbed(opened)
    assert np.abs(out_opened - out).max() > 0.1


def test_option_a_shortcut_subsamples_and_zero_pads_channels(block):
    module, variables, x = block
    v = jax.tree.map(np.copy, variables)
    v["params"]["bn2"]["scale"][:] = 0.0  # the residual branch outputs 0: out = relu(shortcut)
    v["params"]["bn2"]["bias"][:] = 0.0
    out, _ = run_block(module, v, x)
    expected = np.zeros((3, 4, 4, 32))
    expected[..., 8:24] = relu(x[:, ::2, ::2, :])
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_identity_shortcut_when_shape_is_kept():
    module = GatedBasicBlock(planes=16, stride=1)
    x = np.random.default_rng(3).normal(size=(2, 6, 6, 16))
    variables = randomised(abstract_init(module, x.shape), seed=4)
    out, _ = run_block(module, variables, x)
    np.testing.assert_allclose(out, block_numpy(x, variables["params"], variables["batch_stats"], 1, 16)[0],
                               rtol=1e-4, atol=1e-4)
    assert "downsample_conv" not in variables["params"]


def test_imagenet_blocks_use_a_projection_shortcut_only_where_the_shape_changes():
    params = abstract_init(imagenet_resnet(18), (1, 64, 64, 3))["params"]
    with_projection = sorted(name for name, p in params.items() if "downsample_conv" in p)
    assert with_projection == ["layer2_0", "layer3_0", "layer4_0"]
    assert params["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 64, 128)
    assert params["conv1"]["kernel"].shape == (7, 7, 3, 64)


def test_materialise_is_an_exact_identity_with_an_identity_gradient():
    """The buffer-forcing identity of float32 CPU training must not change values or gradients."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2, 3, 3, 16)) * 10.0 ** rng.integers(-20, 20, (2, 3, 3, 16))).astype(np.float32)
    np.testing.assert_array_equal(jax.jit(_materialise)(x), x)
    w = rng.normal(size=x.shape).astype(np.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(_materialise(x) * w)))(jnp.asarray(x))
    np.testing.assert_array_equal(grad, w)
