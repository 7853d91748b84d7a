"""fgc_jax in Flax NNX models through `flax.nnx.bridge.ToNNX` (docs/nnx.md).

Oracles: the Linen model's `apply` with the same variables and gate key, a hand-written
SGD update, and the ResNet-20 MAC count of FGC_SPEC §4 (tests/test_macs.py).
"""
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fgc_jax

REPO = pathlib.Path(__file__).resolve().parents[1]
R20_DENSE = 40_550_400  # FGC_SPEC §4, ResNet-20 dense MACs
LR = 0.1


def wrapped(linen_model: nn.Module) -> nnx.bridge.ToNNX:
    """`linen_model` as an initialised NNX module with 'params' and 'gate' streams."""
    model = nnx.bridge.ToNNX(linen_model, rngs=nnx.Rngs(params=0, gate=1))
    model.lazy_init(jnp.zeros((1, 32, 32, 3)), train=False)
    return model


def params(model: nnx.bridge.ToNNX) -> dict:
    """The wrapper's `nnx.Param` state as a Linen 'params' collection."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def batch_stats(model: nnx.bridge.ToNNX) -> dict:
    """The wrapper's `nnx.BatchStat` state as a Linen 'batch_stats' collection."""
    return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def linen_variables(model: nnx.bridge.ToNNX) -> dict:
    """The wrapper's state as Linen variables."""
    return {"params": params(model), "batch_stats": batch_stats(model)}


def assert_trees_close(a, b, atol: float = 1e-6) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


@pytest.fixture(scope="module")
def problem():
    linen_model = fgc_jax.cifar_resnet(8, 10)
    images = jax.random.normal(jax.random.key(4), (4, 32, 32, 3))
    labels = jnp.arange(4) % 10
    return linen_model, images, labels


def test_forward_equals_linen_apply_with_the_same_variables(problem):
    linen_model, images, _ = problem
    model = wrapped(linen_model)
    variables = linen_variables(model)
    logits, gates = model(images, train=False)
    expected_logits, expected_gates = linen_model.apply(variables, images, train=False)
    assert_trees_close((logits, gates), (expected_logits, expected_gates))
    # Training mode: the same gate key gives the same noise, and the same new statistics.
    gate_key = nnx.Rngs(gate=7).gate()  # the first key a fresh 'gate' stream of seed 7 hands out
    out = model(images, train=True, rngs=nnx.Rngs(gate=7), mutable=["batch_stats"])
    expected, updates = linen_model.apply(variables, images, train=True, rngs={"gate": gate_key},
                                          mutable=["batch_stats"])
    assert_trees_close(out, expected)
    assert_trees_close(batch_stats(model), updates["batch_stats"])


def test_train_mode_updates_batch_stats_and_eval_mode_does_not(problem):
    linen_model, images, _ = problem
    model = wrapped(linen_model)
    before = batch_stats(model)
    model(images, train=False)
    assert_trees_close(batch_stats(model), before, atol=0)
    model(images, train=True, mutable=["batch_stats"])
    after = batch_stats(model)
    changed = [not np.allclose(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    assert all(changed), "every BatchNorm mean and variance moves on a random batch"


def losses(logits, gates, labels, index, feature_bank, gate_bank):
    """Cross-entropy + L0 + the FGC loss of the last block, as in docs/nnx.md."""
    g = gates[-1]
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            + 0.4 * fgc_jax.l0_loss([o.prob for o in gates])
            + 0.003 * fgc_jax.fgc_contrastive_loss(g.log_alpha, g.feature, index, feature_bank, gate_bank,
                                                   k=3, temperature=0.07, use_neighbours=True))


def test_one_nnx_sgd_step_equals_the_hand_written_linen_step(problem):
    linen_model, images, labels = problem
    index = jnp.arange(4)
    feature_bank = fgc_jax.init_bank(jax.random.key(2), 16, 64)
    gate_bank = fgc_jax.init_bank(jax.random.key(3), 16, 64)
    model = wrapped(linen_model)
    variables = linen_variables(model)
    optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer):
        def loss_fn(model):
            logits, gates = model(images, train=True, rngs=nnx.Rngs(gate=7), mutable=["batch_stats"])
            return losses(logits, gates, labels, index, feature_bank, gate_bank)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    def linen_loss(params):
        (logits, gates), updates = linen_model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, images, train=True,
            rngs={"gate": nnx.Rngs(gate=7).gate()}, mutable=["batch_stats"])
        return losses(logits, gates, labels, index, feature_bank, gate_bank), updates

    (expected_loss, updates), grads = jax.jit(jax.value_and_grad(linen_loss, has_aux=True))(variables["params"])
    loss = nnx_step(model, optimizer)
    np.testing.assert_allclose(loss, expected_loss, rtol=0, atol=1e-6)
    expected_params = jax.tree.map(lambda p, g: p - LR * g, variables["params"], grads)
    assert_trees_close(params(model), expected_params)
    assert_trees_close(batch_stats(model), updates["batch_stats"])
    moved = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
    assert LR * moved > 1e-3, "the step moves the parameters well beyond the tolerance"


def test_cost_model_counts_the_wrapped_linen_module():
    linen_model = fgc_jax.cifar_resnet(20, 10)
    cost = fgc_jax.cost_model(nnx.bridge.ToNNX(linen_model, rngs=nnx.Rngs(0)), (32, 32, 3))
    assert cost.dense_macs == R20_DENSE
    assert cost.summary() == fgc_jax.cost_model(linen_model, (32, 32, 3)).summary()


def test_cost_model_rejects_a_pure_nnx_module():
    with pytest.raises(TypeError, match="ToNNX"):
        fgc_jax.cost_model(nnx.Linear(3, 10, rngs=nnx.Rngs(0)), (32, 32, 3))


def test_docs_example_runs_as_written():
    (code,) = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "nnx.md").read_text(), re.S)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
                                              "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    steps = [re.fullmatch(r"step (\d): loss ([\d.]+), gates on: ([\d.]+)", line) for line in lines[:2]]
    assert [int(m.group(1)) for m in steps] == [0, 1]
    first, second = (float(m.group(2)) for m in steps)
    assert np.log(10) < first < 2 * np.log(10) and second < first  # near chance, then lower
    assert all(0 < float(m.group(3)) < 1 for m in steps)
    assert lines[2] == f"MACs: {R20_DENSE}"
