"""The skipping and slimmed programs against the masked evaluation model, on real images.

Oracle: the Flax `GatedResNet(train=False)`, which computes every channel and multiplies
the gated-off ones by zero (BatchNorm unfolded). The programs fold BatchNorm into the
convolutions, so logits agree to float32 noise: |difference| <= LOGIT_TOL (float32's eps
1.2e-7 times a logit scale of ~10 times ~40 rounding steps through 20 layers). Gate
decisions must be identical, except a gate whose masked-model logit lies within
GATE_TOL of the threshold 0 (where float32 noise decides): such an example is reported
and its logits not compared.
"""
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgc_jax import skipping, torch_import
from fgc_jax.models import GatedResNet, cifar_resnet

REPO = pathlib.Path(__file__).resolve().parents[1]
LOGIT_TOL = 5e-5
GATE_TOL = 1e-4
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def read_images(path, n):
    raw = np.fromfile(path, np.uint8).reshape(-1, 3073)[:n]
    images = raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) / 255.0
    return ((images - CIFAR10_MEAN) / CIFAR10_STD).astype(np.float32)


def bas_model(bas_checkpoint):
    model = cifar_resnet(20)
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    return model, torch_import.load_torch_checkpoint(bas_checkpoint, template)


def assert_matches_masked(model, variables, program, params, images, batch):
    """Runs both on `images` in batches of `batch`; returns the number of examples compared."""
    masked = jax.jit(lambda x: model.apply(variables, x, train=False))
    run = skipping.bind(program, params)
    compared = 0
    for start in range(0, len(images), batch):
        x = images[start:start + batch]
        want_logits, outputs = masked(x)
        logits, gates = run(x)
        assert len(gates) == len(outputs)
        near = np.zeros(len(x), bool)
        for out, gate in zip(outputs, gates):
            differ = np.asarray(out.gate) != np.asarray(gate)
            at_threshold = np.abs(np.asarray(out.log_alpha)) < GATE_TOL
            assert not np.any(differ & ~at_threshold), "a gate decision differs away from the threshold"
            near |= np.any(at_threshold, axis=1)
        ok = ~near
        np.testing.assert_allclose(np.asarray(logits)[ok], np.asarray(want_logits)[ok], rtol=0, atol=LOGIT_TOL)
        compared += int(ok.sum())
    return compared


def test_skipping_equals_masked_bas_resnet20(bas_checkpoint, cifar_mini_dir):
    model, variables = bas_model(bas_checkpoint)
    arch = skipping.Architecture.of(model)
    params = skipping.fold_variables(arch, variables)
    images = read_images(cifar_mini_dir / "test_batch.bin", 12)
    program = skipping.skipping_program(arch, buckets=3)  # widths 0, 6, 11, 16 (16 channels)
    assert skipping.bucket_widths(16, 3) == (0, 6, 11, 16)
    assert assert_matches_masked(model, variables, program, params, images[:4], 1) >= 3
    assert assert_matches_masked(model, variables, program, params, images[4:], 4) >= 6  # union of channels


def tiny_imagenet_resnet():
    """The ImageNet layout (7x7 stem, max-pool, 1x1-conv shortcuts) at a small width."""
    return GatedResNet(stage_sizes=(1, 1, 1), stage_planes=(8, 16, 32), num_classes=10, stem="imagenet",
                       shortcut="B")


def init_variables(model, seed):
    """Random variables of the model's shapes, drawn by NumPy (Flax's init takes most of a
    minute here); BatchNorm statistics away from 0/1 so that folding them is tested."""
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "'var'" in name:
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        scale = 1.0 / np.sqrt(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.3
        return (rng.standard_normal(leaf.shape) * scale + ("'scale'" in name)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, template)


def with_gate_biases(variables, biases):
    """`variables` with each named block's gate fc2 kernel zeroed and its bias replaced."""
    params = dict(variables["params"])
    for name, bias in biases.items():
        mlp = params[name]["gate"]["mlp"]
        fc2 = {"kernel": np.zeros_like(mlp["fc2"]["kernel"]), "bias": np.asarray(bias, np.float32)}
        params[name] = {**params[name], "gate": {"mlp": {**mlp, "fc2": fc2}}}
    return {**variables, "params": params}


def test_skipping_imagenet_layout_all_and_no_channels(cifar_mini_dir):
    """Shortcut B and the max-pool stem, with blocks at no, every and some channels."""
    model = tiny_imagenet_resnet()
    variables = init_variables(model, 1)
    some = np.full(32, -10.0)
    some[np.random.default_rng(0).permutation(32)[:13]] = 10.0  # 13 of 32: between two buckets
    variables = with_gate_biases(variables, {"layer1_0": np.full(8, -10.0), "layer2_0": np.full(16, 10.0),
                                             "layer3_0": some})
    arch = skipping.Architecture.of(model)
    assert [(b.shortcut, b.stride) for b in arch.blocks] == [("B", 1), ("B", 2), ("B", 2)]
    params = skipping.fold_variables(arch, variables)
    images = read_images(cifar_mini_dir / "test_batch.bin", 4)
    assert assert_matches_masked(model, variables, skipping.skipping_program(arch, buckets=4), params,
                                 images, 2) == 4


def test_slimmed_equals_gated_model_with_calibrated_gates(bas_checkpoint, cifar_mini_dir):
    """Slimmed = the masked model with every gate replaced by 'was on for some calibration example'."""
    model, variables = bas_model(bas_checkpoint)
    # The BAS stage uses every channel for some image; switch a quarter of each block's off for good.
    rng = np.random.default_rng(0)
    params_tree = dict(variables["params"])
    dead = {}
    for name in [f"layer{s}_{j}" for s in (1, 2, 3) for j in range(3)]:
        bias = np.asarray(params_tree[name]["gate"]["mlp"]["fc2"]["bias"]).copy()
        dead[name] = rng.permutation(bias.size)[:bias.size // 4]
        bias[dead[name]] = -1e3
        mlp = params_tree[name]["gate"]["mlp"]
        params_tree[name] = {**params_tree[name], "gate": {"mlp": {**mlp, "fc2": {**mlp["fc2"], "bias": bias}}}}
    variables = {**variables, "params": params_tree}
    arch = skipping.Architecture.of(model)
    params = skipping.fold_variables(arch, variables)
    calibration = read_images(cifar_mini_dir / "data_batch_1.bin", 128)
    keep = skipping.ever_active(skipping.skipping_program(arch, buckets=2), params,
                                [(calibration[i:i + 64], np.ones(64, bool)) for i in range(0, 128, 64)])
    # Oracle for the keep masks: the masked model's gates over the same images.
    masked = jax.jit(lambda x: model.apply(variables, x, train=False))
    want = [np.zeros(k.shape, bool) for k in keep]
    for i in range(0, 128, 64):
        for b, out in enumerate(masked(calibration[i:i + 64])[1]):
            want[b] |= np.asarray(out.gate).any(axis=0)
    assert [k.tolist() for k in keep] == [w.tolist() for w in want]
    for blk, k in zip(arch.blocks, keep):
        assert not k[dead[blk.name]].any()

    slimmed = skipping.slim_params(arch, params, keep)
    assert slimmed["layer1_0"]["w1"].shape[-1] == keep[0].sum() <= 12 and "gate" not in slimmed["layer1_0"]
    oracle_vars = with_gate_biases(variables, {blk.name: np.where(k, 10.0, -10.0)
                                               for blk, k in zip(arch.blocks, keep)})
    test = read_images(cifar_mini_dir / "test_batch.bin", 16)
    logits, gates = jax.jit(skipping.dense_program(arch))(slimmed, test)
    assert gates == ()
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model.apply(oracle_vars, test, train=False)[0]),
                               rtol=0, atol=LOGIT_TOL)


def test_export_round_trip_without_fgc_jax(cifar_mini_dir, tmp_path):
    model = tiny_imagenet_resnet()
    variables = init_variables(model, 2)
    arch = skipping.Architecture.of(model)
    params = skipping.fold_variables(arch, variables)
    images = read_images(cifar_mini_dir / "test_batch.bin", 3)
    skipping.export_program(skipping.skipping_program(arch, buckets=2), params, (1, 32, 32, 3), str(tmp_path))
    np.save(tmp_path / "x.npy", images[2:3])
    # A fresh interpreter with jax alone: fgc_jax, flax and torch are never imported.
    script = (
        "import sys, numpy as np, jax\n"
        f"exp = jax.export.deserialize(bytearray(open({str(tmp_path / skipping.EXPORT_FILE)!r}, 'rb').read()))\n"
        f"logits, gates = exp.call(np.load({str(tmp_path / 'x.npy')!r}))\n"
        f"np.save({str(tmp_path / 'logits.npy')!r}, np.asarray(logits))\n"
        "assert not any(m.split('.')[0] in ('fgc_jax', 'flax', 'torch') for m in sys.modules), sys.modules\n"
        "print(len(gates))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "3"
    want = model.apply(variables, images[2:3], train=False)[0]
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), np.asarray(want), rtol=0, atol=LOGIT_TOL)

    call = skipping.load_exported(str(tmp_path))
    np.testing.assert_allclose(np.asarray(call(images[2:3])[0]), np.asarray(want), rtol=0, atol=LOGIT_TOL)
    with pytest.raises(ValueError, match=r"built for float32\[1, 32, 32, 3\].*got float32\[2, 32, 32, 3\]"):
        call(images[:2])
    with pytest.raises(ValueError, match=r"built for float32\[1, 32, 32, 3\].*got float32\[1, 24, 24, 3\]"):
        call(images[:1, :24, :24])
    with pytest.raises(ValueError, match=r"built for float32\[1, 32, 32, 3\].*got float16\[1, 32, 32, 3\]"):
        call(images[:1].astype(np.float16))
