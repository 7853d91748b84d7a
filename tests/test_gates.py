"""Tests of fgc_jax.gates against the formulas of FGC_SPEC.md §1, recomputed in NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgc_jax import gates

TAU = 2.0 / 3.0


def uniform_draw(rng, shape):
    """The uniform draw that the spec's sampler makes from `rng` (u in [1e-12, 1))."""
    return np.asarray(jax.random.uniform(rng, shape, jnp.float32, minval=1e-12, maxval=1.0),
                      np.float64)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("tau", [TAU, 1.0, 0.1])
def test_gumbel_sigmoid_forward_is_the_hard_threshold_of_the_noisy_logit(tau):
    log_alpha = np.random.default_rng(0).normal(0.0, 2.0, (64, 32)).astype(np.float32)
    rng = jax.random.key(1)
    u = uniform_draw(rng, log_alpha.shape)
    y = (log_alpha + np.log(u) - np.log(1.0 - u)) / tau
    g = np.asarray(gates.straight_through_gumbel_sigmoid(jnp.asarray(log_alpha), rng, tau))
    assert set(np.unique(g)) <= {0.0, 1.0}
    clear = np.abs(y) > 1e-4  # float32 vs float64 rounding can only flip a gate at y ~ 0
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(g[clear], (y > 0)[clear].astype(np.float32))
    assert 0.2 < g.mean() < 0.8  # both values occur


def test_gumbel_sigmoid_gradient_is_the_sigmoid_slope_over_tau():
    shape = (16, 8)
    log_alpha = np.random.default_rng(2).normal(0.0, 1.5, shape).astype(np.float32)
    weights = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    rng = jax.random.key(4)
    grad = jax.grad(lambda a: jnp.sum(weights * gates.straight_through_gumbel_sigmoid(a, rng, TAU)))(
        jnp.asarray(log_alpha))
    u = uniform_draw(rng, shape)
    s = sigmoid((log_alpha + np.log(u) - np.log(1.0 - u)) / TAU)
    np.testing.assert_allclose(grad, weights * s * (1.0 - s) / TAU, rtol=1e-4, atol=1e-7)


def test_gumbel_sigmoid_gate_is_on_with_probability_sigmoid_log_alpha():
    # P(log_alpha + Logistic > 0) = sigmoid(log_alpha), whatever tau.
    log_alpha = np.array([-2.0, -0.5, 0.0, 1.0, 3.0], np.float32)
    draws = 40_000
    g = gates.straight_through_gumbel_sigmoid(jnp.tile(log_alpha, (draws, 1)), jax.random.key(5), TAU)
    np.testing.assert_allclose(np.asarray(g).mean(0), sigmoid(log_alpha), atol=4 * 0.5 / np.sqrt(draws))


def test_gumbel_sigmoid_same_key_same_sample_other_key_other_sample():
    log_alpha = jnp.zeros((256,))
    a = gates.straight_through_gumbel_sigmoid(log_alpha, jax.random.key(0))
    b = gates.straight_through_gumbel_sigmoid(log_alpha, jax.random.key(0))
    c = gates.straight_through_gumbel_sigmoid(log_alpha, jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.any(np.asarray(a) != np.asarray(c))


@pytest.mark.parametrize("tau", [0.0, -0.5])
def test_gumbel_sigmoid_rejects_non_positive_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        gates.straight_through_gumbel_sigmoid(jnp.zeros((2, 3)), jax.random.key(0), tau)


def test_deterministic_gate_is_sigmoid_above_one_half():
    log_alpha = np.concatenate([np.random.default_rng(6).normal(0, 3, 200), [0.0, -0.0, 1e-6, -1e-6]])
    log_alpha = log_alpha.astype(np.float32)
    g1 = np.asarray(gates.deterministic_gate(jnp.asarray(log_alpha)))
    g2 = np.asarray(gates.deterministic_gate(jnp.asarray(log_alpha)))
    np.testing.assert_array_equal(g1, (sigmoid(log_alpha.astype(np.float64)) > 0.5).astype(np.float32))
    np.testing.assert_array_equal(g1, g2)
    assert g1.dtype == np.float32


def gate_network_numpy(x, params, stats, train, eps=1e-5):
    """GAP -> fc1 (no bias) -> BN -> ReLU -> fc2 (+bias), spec §1, in float64."""
    mlp = params["mlp"]
    pooled = x.astype(np.float64).mean(axis=(1, 2))
    h = pooled @ np.asarray(mlp["fc1"]["kernel"], np.float64)
    if train:
        mean, var = h.mean(0), h.var(0)
    else:
        mean, var = np.asarray(stats["mlp"]["bn"]["mean"]), np.asarray(stats["mlp"]["bn"]["var"])
    h = (h - mean) / np.sqrt(var + eps) * np.asarray(mlp["bn"]["scale"]) + np.asarray(mlp["bn"]["bias"])
    return np.maximum(h, 0) @ np.asarray(mlp["fc2"]["kernel"], np.float64) + np.asarray(mlp["fc2"]["bias"])


@pytest.fixture(scope="module")
def channel_gate():
    module = gates.ChannelGate(features=12)
    x = jnp.asarray(np.random.default_rng(7).normal(size=(6, 5, 5, 8)), jnp.float32)
    variables = module.init({"params": jax.random.key(0), "gate": jax.random.key(1)}, x, train=False)
    # Non-trivial running statistics, so eval mode visibly uses them.
    rs = np.random.default_rng(8)
    variables = {"params": variables["params"],
                 "batch_stats": {"mlp": {"bn": {"mean": jnp.asarray(rs.normal(0, 0.3, 16), jnp.float32),
                                                "var": jnp.asarray(rs.uniform(0.5, 2, 16), jnp.float32)}}}}
    return module, variables, x


def test_channel_gate_eval_needs_no_rng_and_is_deterministic(channel_gate):
    module, variables, x = channel_gate
    log_alpha, prob, gate = module.apply(variables, x, train=False)
    again = module.apply(variables, x, train=False)
    for a, b in zip((log_alpha, prob, gate), again):
        np.testing.assert_array_equal(a, b)
    expected = gate_network_numpy(np.asarray(x), variables["params"], variables["batch_stats"], train=False)
    np.testing.assert_allclose(log_alpha, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(prob, sigmoid(expected), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(gate, (expected > 0).astype(np.float32))
    assert log_alpha.shape == prob.shape == gate.shape == (6, 12)


def test_channel_gate_train_samples_from_the_gate_rng_stream(channel_gate):
    module, variables, x = channel_gate
    with pytest.raises(Exception, match="gate"):
        module.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})

    def sample(key):
        (log_alpha, prob, gate), new = module.apply(variables, x, train=True, mutable=["batch_stats"],
                                                    rngs={"gate": key})
        return np.asarray(log_alpha), np.asarray(prob), np.asarray(gate), new

    log_alpha, prob, gate, new = sample(jax.random.key(3))
    # Train mode normalises with the batch statistics, not the running ones.
    expected = gate_network_numpy(np.asarray(x), variables["params"], None, train=True)
    np.testing.assert_allclose(log_alpha, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(prob, sigmoid(log_alpha), rtol=1e-6)
    assert set(np.unique(gate)) <= {0.0, 1.0}
    np.testing.assert_array_equal(sample(jax.random.key(3))[2], gate)
    others = [sample(jax.random.key(i))[2] for i in range(4, 8)]
    assert any(np.any(o != gate) for o in others)
    # Running statistics move 10% towards the batch's (PyTorch momentum 0.1).
    h = np.asarray(x, np.float64).mean((1, 2)) @ np.asarray(variables["params"]["mlp"]["fc1"]["kernel"])
    old = variables["batch_stats"]["mlp"]["bn"]
    np.testing.assert_allclose(new["batch_stats"]["mlp"]["bn"]["mean"],
                               0.9 * np.asarray(old["mean"]) + 0.1 * h.mean(0), rtol=1e-4, atol=1e-6)
