"""Cost accounting against FGC_SPEC §4's table and MAC counts worked out by hand.

Oracles: the spec's figures for ResNet-20/32/56; per-layer MACs C_in*C_out*H_out*W_out*k*k
computed below by hand; the torchvision ResNet-18 figures (1,813,561,344 conv MACs at
224 px, 11,689,512 parameters), which no code of ours produced.
"""
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import resnet20_cifar
from fgc_jax import macs, input_pipeline
from fgc_jax.models import cifar_resnet, imagenet_resnet

REPO = pathlib.Path(__file__).resolve().parents[1]

# FGC_SPEC §4: depth -> (dense MACs, gate MACs, final dense, backbone params, gate params).
SPEC_TABLE = {
    20: (40_550_400, 9_984, 640, 269_722, 10_608),
    32: (68_861_952, 17_152, 640, 464_154, 18_192),
    56: (125_485_056, 31_488, 640, 853_018, 33_360),
}

# ResNet-20 by hand (32x32 input): stem 3*16*32*32*9.
STEM_MACS = 3 * 16 * 32 * 32 * 9  # 442,368
FULL_BLOCK = 2 * (16 * 16 * 32 * 32 * 9)  # 4,718,592: any block without a stride (16*16*1024 = 32*32*256 = 64*64*64)
DOWN_BLOCK = 16 * 32 * 16 * 16 * 9 + 32 * 32 * 16 * 16 * 9  # 3,538,944: first block of stages 2 and 3
R20_BLOCKS = [FULL_BLOCK] * 3 + [DOWN_BLOCK] + [FULL_BLOCK] * 2 + [DOWN_BLOCK] + [FULL_BLOCK] * 2
R20_GATES = 9_984
R20_DENSE = 40_550_400


def random_variables(model, shape, seed=0):
    """Variables shaped like the model's, filled by NumPy (no compiled init: fast on CPU)."""
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0, np.sqrt(2 / fan_in), leaf.shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0, 0.3, leaf.shape).astype(np.float32)  # bias, BN offset and mean

    return jax.tree_util.tree_map_with_path(fill, template)


@pytest.fixture(scope="module")
def r20_cost():
    return macs.cost_model(cifar_resnet(20, 10), (32, 32, 3))


@pytest.mark.parametrize("depth", sorted(SPEC_TABLE))
def test_spec_table(depth):
    cost = macs.cost_model(cifar_resnet(depth, 10), (32, 32, 3))
    dense, gates, head, backbone, gate_params = SPEC_TABLE[depth]
    assert cost.dense_macs == dense
    assert cost.gate_macs == gates
    assert cost.head_macs == head
    assert cost.backbone_params == backbone
    assert cost.gate_params == gate_params
    assert cost.params == backbone + gate_params
    assert cost.num_blocks == (depth - 2) // 2


def test_resnet20_layers_by_hand(r20_cost):
    assert r20_cost.stem_macs == STEM_MACS
    np.testing.assert_array_equal(r20_cost.block_macs, R20_BLOCKS)
    assert STEM_MACS + sum(R20_BLOCKS) == R20_DENSE  # the hand numbers add up to the spec's
    kinds = [layer.kind for layer in r20_cost.layers]
    assert kinds.count("stem") == 1 and kinds.count("head") == 1
    assert kinds.count("conv1") == kinds.count("conv2") == 9 and kinds.count("gate") == 18
    fc2 = {layer.name: layer for layer in r20_cost.layers}["layer3_0/gate/mlp/fc2"]
    assert (fc2.kind, fc2.block, fc2.macs, fc2.params) == ("gate", 6, 16 * 64, 16 * 64 + 64)
    conv = {layer.name: layer for layer in r20_cost.layers}["layer2_0/conv1"]
    assert (conv.in_shape, conv.out_shape, conv.kernel) == ((32, 32, 16), (16, 16, 32), (3, 3))


def test_imagenet_resnet18_counts_shortcuts():
    cost = macs.cost_model(imagenet_resnet(18, 1000), (224, 224, 3))
    # stem 3*64*112*112*49; layer1 4 convs 64*64*56*56*9; layers 2-4 each: strided conv1
    # C*2C*(H/2)^2*9, three 2C*2C convs, 1x1 downsample C*2C*(H/2)^2 -> 411,041,792 each.
    stem = 3 * 64 * 112 * 112 * 49
    layer1 = 4 * 64 * 64 * 56 * 56 * 9
    stage = 64 * 128 * 28 * 28 * 9 + 3 * 128 * 128 * 28 * 28 * 9 + 64 * 128 * 28 * 28
    assert stage == 411_041_792
    assert cost.dense_macs == stem + layer1 + 3 * stage == 1_813_561_344
    assert cost.head_macs == 512 * 1000
    assert cost.backbone_params == 11_689_512  # torchvision resnet18
    shortcuts = [layer for layer in cost.layers if layer.kind == "shortcut"]
    assert len(shortcuts) == 3 and all(layer.block is None for layer in shortcuts)
    # Shortcuts stay dense: all gates off leaves stem + shortcuts + gate layers.
    off = [np.zeros((1, c)) for c in (64, 64, 128, 128, 256, 256, 512, 512)]
    assert macs.dynamic_macs(cost, off)[0] == stem + 3 * 64 * 128 * 28 * 28 + cost.gate_macs


def test_ungated_model_has_no_gates():
    cost = macs.cost_model(cifar_resnet(20, 10, gated=False), (32, 32, 3))
    assert (cost.dense_macs, cost.gate_macs, cost.gate_params, cost.num_blocks) == (R20_DENSE, 0, 0, 0)
    assert cost.params == 269_722


def _pattern(fractions, batch=1):
    """Gates [batch, C_b] per ResNet-20 block with the first round(f*C_b) channels on."""
    widths = [16] * 3 + [32] * 3 + [64] * 3
    out = []
    for f, c in zip(fractions, widths):
        g = np.zeros((batch, c))
        g[:, : int(round(f * c))] = 1
        out.append(g)
    return out


def test_dynamic_macs_hand_patterns(r20_cost):
    assert macs.dynamic_macs(r20_cost, _pattern([1] * 9))[0] == R20_DENSE + R20_GATES
    assert macs.dynamic_macs(r20_cost, _pattern([0] * 9))[0] == STEM_MACS + R20_GATES == 452_352
    half = STEM_MACS + R20_GATES + (R20_DENSE - STEM_MACS) // 2
    assert half == 20_506_368
    assert macs.dynamic_macs(r20_cost, _pattern([0.5] * 9))[0] == half
    # Per example: ex 0 has 4 of block 0's 16 channels on; ex 1 has 8 of block 3's 32.
    gates = _pattern([0] * 9, batch=2)
    gates[0][0, :4] = 1
    gates[3][1, :8] = 1
    expected = [452_352 + FULL_BLOCK // 4, 452_352 + DOWN_BLOCK // 4]
    assert expected == [1_632_000, 1_337_088]
    np.testing.assert_array_equal(macs.dynamic_macs(r20_cost, gates), expected)
    ratio = macs.pruning_ratio(r20_cost, np.mean(expected))
    assert ratio == pytest.approx(1 - 1_484_544 / R20_DENSE)


def test_dynamic_macs_under_jit_on_model_gates():
    model = cifar_resnet(8, 10)  # one block a stage: 16->16, 16->32 (stride 2), 32->64 (stride 2)
    cost = macs.cost_model(model, (32, 32, 3))
    blocks = [FULL_BLOCK, DOWN_BLOCK, DOWN_BLOCK]
    gate_macs = (16 * 16 + 16 * 16) + (16 * 16 + 16 * 32) + (32 * 16 + 16 * 64)  # 2,816
    assert cost.dense_macs == STEM_MACS + sum(blocks) and cost.gate_macs == gate_macs
    x = jax.random.normal(jax.random.key(1), (6, 32, 32, 3))
    variables = random_variables(model, x.shape)
    _, outs = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)

    @jax.jit
    def per_example_macs(gates):
        return macs.dynamic_macs(cost, gates)

    got = per_example_macs([o.gate for o in outs])
    assert got.shape == (6,)
    density = np.stack([np.asarray(o.gate).mean(1) for o in outs], 1)  # [6, 3]
    expected = STEM_MACS + gate_macs + density @ np.array(blocks, np.float64)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)


def test_dynamic_macs_jnp_hand_pattern(r20_cost):
    # The same hand patterns through jnp: float32 but exact for these values.
    np.testing.assert_allclose(macs.dynamic_macs(r20_cost, [jnp.asarray(g) for g in _pattern([0.5] * 9)]),
                               [20_506_368], rtol=1e-7)


def test_dynamic_macs_rejects_wrong_block_count(r20_cost):
    with pytest.raises(ValueError, match="9 gated blocks"):
        macs.dynamic_macs(r20_cost, _pattern([1] * 8))


def test_input_spec_needs_no_data():
    config = resnet20_cifar.get_config()
    config.data.dir = "/nonexistent"
    assert input_pipeline.input_spec(config) == ((32, 32, 3), 10)
    config.dataset, config.data.source = "imagenet2012", "imagenet_folder"
    config.data.image_size = 160
    assert input_pipeline.input_spec(config) == ((160, 160, 3), 1000)
    config.dataset, config.data.source = "digits", "sklearn"
    assert input_pipeline.input_spec(config) == ((8, 8, 1), 10)


def test_cli_json_matches_spec():
    out = subprocess.run([sys.executable, "-m", "fgc_jax.cost", "--config=configs/resnet20_cifar.py",
                          "--json"], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert "RuntimeWarning" not in out.stderr, out.stderr  # the package does not import the module run
    report = json.loads(out.stdout)
    assert report["dense_macs"] == R20_DENSE
    assert report["gate_macs"] == R20_GATES
    assert report["head_macs"] == 640
    assert report["backbone_params"] == 269_722
    assert report["gate_params"] == 10_608
    assert report["params"] == 269_722 + 10_608
    assert report["block_macs"] == R20_BLOCKS
