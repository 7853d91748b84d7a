"""Tests of fgc_jax.losses against NumPy/SciPy implementations of FGC_SPEC.md §2."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fgc_jax import losses

T = 0.07


# ----------------------------------------------------------------------------- L0
def test_l0_loss_is_the_mean_over_all_gate_entries():
    rng = np.random.default_rng(0)
    probs = [rng.uniform(size=(4, c)).astype(np.float32) for c in (16, 32, 64)]
    probs[2] *= 0.1  # per-block means differ, so a mean of block means would be wrong
    expected = np.concatenate([p.ravel() for p in probs]).mean()
    np.testing.assert_allclose(losses.l0_loss([jnp.asarray(p) for p in probs]), expected, rtol=1e-6)
    grads = jax.grad(losses.l0_loss)([jnp.asarray(p) for p in probs])
    for g in grads:
        np.testing.assert_allclose(g, np.full(g.shape, 1.0 / sum(p.size for p in probs)), rtol=1e-6)


def test_l0_loss_rejects_no_blocks():
    with pytest.raises(ValueError):
        losses.l0_loss([])


# ----------------------------------------------------------------------------- batch shaping
def batch_shaping_numpy(prob, a=0.6, b=0.4):
    """Loss and reference gradient of the spec, per channel over the sorted batch, float64."""
    prob = prob.astype(np.float64)
    n = prob.shape[0]
    order = np.argsort(prob, axis=0, kind="stable")
    x = np.take_along_axis(prob, order, axis=0)
    gap = np.arange(1, n + 1)[:, None] / (n + 1) - stats.beta.cdf(x, a, b)
    with np.errstate(divide="ignore"):
        pdf = stats.beta.pdf(x, a, b)
    pdf[~np.isfinite(pdf)] = 0.0
    grad = np.zeros_like(prob)
    np.put_along_axis(grad, order, -2.0 * pdf * gap / n, axis=0)
    return (gap ** 2).sum() / n, grad


def shaping_probs():
    rng = np.random.default_rng(1)
    prob = 1.0 / (1.0 + np.exp(-rng.normal(0, 2, (32, 6))))
    prob[3, 0], prob[7, 0], prob[0, 1] = 0.0, 1.0, 1.0  # infinite pdf: zero gradient
    prob[5, 2], prob[9, 2] = 1e-5, 1.0 - 1e-4  # large but finite pdf
    prob = prob.astype(np.float32)
    assert all(len(np.unique(c)) == len(c) for c in prob.T)  # no ties: the gradient is unambiguous
    return prob


@pytest.mark.parametrize("series_loop", [False, True])
@pytest.mark.parametrize("a,b", [(0.6, 0.4), (2.0, 3.0)])
def test_batch_shaping_value_and_gradient_match_scipy(a, b, series_loop):
    prob = shaping_probs()
    expected_loss, expected_grad = batch_shaping_numpy(prob, a, b)
    loss, grad = jax.value_and_grad(functools.partial(losses.batch_shaping_loss, series_loop=series_loop))(
        jnp.asarray(prob), a, b)
    np.testing.assert_allclose(loss, expected_loss, rtol=2e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=2e-4, atol=1e-6)
    if (a, b) == (0.6, 0.4):
        assert grad[3, 0] == grad[7, 0] == grad[0, 1] == 0.0
        assert abs(grad[5, 2]) > 0.01  # the pdf near 0 is large, not zeroed


def test_batch_shaping_defaults_are_the_spec_prior_and_chain_rule_applies():
    prob = shaping_probs()
    expected_loss, expected_grad = batch_shaping_numpy(prob)
    np.testing.assert_allclose(jax.jit(losses.batch_shaping_loss)(prob), expected_loss, rtol=2e-6)
    grad = jax.grad(lambda p: 3.0 * losses.batch_shaping_loss(p))(jnp.asarray(prob))
    np.testing.assert_allclose(grad, 3.0 * expected_grad, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("a,b", [(0.6, 0.4), (0.4, 0.6), (0.5, 0.5), (1.0, 1.0), (2.0, 3.0)])
def test_beta_cdf_is_float32_accurate(a, b):
    """Within 3 float32 ulps of SciPy's float64 CDF (jax.scipy's betainc is off by ~50); summed
    in loops (the trainer's CPU option), the very same bits."""
    x = np.random.default_rng(3).uniform(0, 1, 20_000).astype(np.float32)
    x = np.concatenate([x, np.float32([0.0, 1e-30, 1e-6, 1e-3, 0.5, 0.999, 1 - 2 ** -24, 1.0])])
    got = np.asarray(jax.jit(losses.beta_cdf, static_argnums=(1, 2))(x, a, b))
    np.testing.assert_allclose(got.astype(np.float64), stats.beta.cdf(x.astype(np.float64), a, b), rtol=0,
                               atol=1.8e-7)
    looped = np.asarray(jax.jit(functools.partial(losses.beta_cdf, loop=True), static_argnums=(1, 2))(x, a, b))
    np.testing.assert_array_equal(looped.view(np.uint32), got.view(np.uint32))


def test_batch_shaping_summed_in_loops_is_the_same_bits_in_a_compiled_step():
    """The loss and its gradient, jitted as in a train step (both outputs live), on a padded
    batch: the CPU option changes the program, not one bit of the result."""
    rng = np.random.default_rng(4)
    prob = jnp.asarray(1.0 / (1.0 + np.exp(-rng.normal(0, 2, (96, 24)))), jnp.float32)
    mask = jnp.arange(96) < 90

    def loss_and_grad(series_loop):
        step = jax.jit(jax.value_and_grad(lambda p: losses.batch_shaping_loss(p, mask=mask, series_loop=series_loop)))
        return jax.tree.map(np.asarray, step(prob))

    unrolled, looped = loss_and_grad(False), loss_and_grad(True)
    for u, v in zip(jax.tree.leaves(unrolled), jax.tree.leaves(looped)):
        np.testing.assert_array_equal(v.view(np.uint32), u.view(np.uint32))


def test_batch_shaping_of_a_padded_batch_is_that_of_its_real_examples():
    prob = shaping_probs()
    mask = np.arange(32) < 25
    padded = np.where(mask[:, None], prob, 0.9).astype(np.float32)
    expected_loss, expected_grad = batch_shaping_numpy(prob[:25])
    loss, grad = jax.value_and_grad(losses.batch_shaping_loss)(jnp.asarray(padded), 0.6, 0.4, jnp.asarray(mask))
    np.testing.assert_allclose(loss, expected_loss, rtol=2e-6)
    np.testing.assert_allclose(grad[:25], expected_grad, rtol=2e-4, atol=1e-6)
    assert not np.asarray(grad[25:]).any()


def test_l0_of_a_padded_batch_counts_its_real_examples_only():
    probs = [np.random.default_rng(4).uniform(size=(10, c)).astype(np.float32) for c in (3, 5)]
    mask = np.arange(10) < 6
    expected = sum(p[:6].sum() for p in probs) / (6 * 8)
    np.testing.assert_allclose(losses.l0_loss([jnp.asarray(p) for p in probs], jnp.asarray(mask)), expected,
                               rtol=1e-6)


def test_batch_shaping_of_a_batch_shaped_like_the_prior_is_small():
    # Quantiles of Beta(0.6, 0.4) at i/(N+1) make every term zero.
    n = 50
    quantiles = stats.beta.ppf(np.arange(1, n + 1) / (n + 1), 0.6, 0.4)
    prob = np.random.default_rng(2).permuted(np.tile(quantiles[:, None], (1, 3)), axis=0)
    assert losses.batch_shaping_loss(jnp.asarray(prob, jnp.float32)) < 1e-8
    assert losses.batch_shaping_loss(jnp.full((n, 3), 0.5)) > 0.1


@pytest.mark.parametrize("shape", [(8,), (2, 8, 4)])
def test_batch_shaping_rejects_non_matrix_input(shape):
    with pytest.raises(ValueError, match="shape"):
        losses.batch_shaping_loss(jnp.full(shape, 0.5))


@pytest.mark.parametrize("a,b", [(0.0, 0.4), (0.6, -1.0)])
def test_batch_shaping_rejects_invalid_prior(a, b):
    with pytest.raises(ValueError, match="alpha|beta"):
        losses.batch_shaping_loss(jnp.full((8, 4), 0.5), a, b)


# ----------------------------------------------------------------------------- FGC contrastive
def positive_sets(f, idx, feature_bank, k, use_neighbours):
    """P_b = {idx_b} ∪ top-k rows of f @ F^T with the own row scored -2 (ties: lower row)."""
    sets = [{int(i)} for i in idx]
    if use_neighbours:
        sims = f.astype(np.float64) @ feature_bank.astype(np.float64).T
        sims[np.arange(len(idx)), idx] = -2.0
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        sets = [s | set(t.tolist()) for s, t in zip(sets, top)]
    return sets


def fgc_numpy(a, f, idx, feature_bank, gate_bank, k, use_neighbours, temperature=T):
    """Spec §2 loss and its analytic gradient w.r.t. the gate logits `a`, float64."""
    a, gate_bank = a.astype(np.float64), gate_bank.astype(np.float64)
    sets = positive_sets(f, idx, feature_bank, k, use_neighbours)
    z = a @ gate_bank.T / temperature
    q = np.exp(z - z.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    mask = np.zeros_like(q)
    for b, s in enumerate(sets):
        mask[b, list(s)] = 1.0
    mass = (q * mask).sum(1)
    loss = -np.log(mass + 1e-7).mean()
    # d mass_b / d a_b = (sum_{j in P_b} q_bj G_j - mass_b * sum_j q_bj G_j) / T
    d_mass = ((q * mask) @ gate_bank - mass[:, None] * (q @ gate_bank)) / temperature
    grad = -d_mass / (mass + 1e-7)[:, None] / len(idx)
    return loss, grad


def unit_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fgc_problem(n_rows=50, dim=8, batch=6, seed=3):
    rng = np.random.default_rng(seed)
    feature_bank = unit_rows(rng.normal(size=(n_rows, dim))).astype(np.float32)
    gate_bank = unit_rows(rng.normal(size=(n_rows, dim))).astype(np.float32)
    idx = rng.choice(n_rows, batch, replace=False).astype(np.int32)
    f = np.abs(rng.normal(size=(batch, dim))).astype(np.float32)  # pooled ReLU features are >= 0
    a = rng.normal(0, 0.3, (batch, dim)).astype(np.float32)
    return a, f, idx, feature_bank, gate_bank


def fgc_jax(a, f, idx, feature_bank, gate_bank, k, use_neighbours, **kwargs):
    return losses.fgc_contrastive_loss(a, f, idx, feature_bank, gate_bank, k=k, temperature=T,
                                       use_neighbours=use_neighbours, **kwargs)


@pytest.mark.parametrize("use_neighbours,k", [(False, 5), (True, 1), (True, 5), (True, 49)])
def test_fgc_loss_value_and_gradient_match_numpy(use_neighbours, k):
    a, f, idx, fb, gb = fgc_problem()
    expected_loss, expected_grad = fgc_numpy(a, f, idx, fb, gb, k, use_neighbours)
    loss, grad = jax.jit(jax.value_and_grad(fgc_jax), static_argnums=(5, 6))(a, f, idx, fb, gb, k,
                                                                             use_neighbours)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_fgc_loss_gradient_matches_central_differences():
    a, f, idx, fb, gb = fgc_problem(seed=4)
    grad = np.asarray(jax.grad(fgc_jax)(a, f, idx, fb, gb, 3, True))
    step = 1e-3
    for b, c in [(0, 0), (2, 5), (5, 7)]:
        plus, minus = a.copy(), a.copy()
        plus[b, c] += step
        minus[b, c] -= step
        numeric = (fgc_numpy(plus, f, idx, fb, gb, 3, True)[0]
                   - fgc_numpy(minus, f, idx, fb, gb, 3, True)[0]) / (2 * step)
        np.testing.assert_allclose(grad[b, c], numeric, rtol=1e-3, atol=1e-6)


def test_fgc_loss_neighbours_change_the_loss():
    a, f, idx, fb, gb = fgc_problem()
    assert fgc_jax(a, f, idx, fb, gb, 5, True) < fgc_jax(a, f, idx, fb, gb, 5, False) - 1e-3


def test_fgc_loss_counts_the_own_row_once_when_top_k_returns_it():
    # Every other row scores in (-2.8, -2.2), so the own row (scored -2) is the top neighbour.
    a, _, idx, _, gb = fgc_problem(n_rows=20, batch=3)
    f = np.full((3, 8), 1.0 / 8, np.float32)
    fb = np.repeat(np.random.default_rng(5).uniform(-2.8, -2.2, (20, 1)), 8, axis=1).astype(np.float32)
    sets = positive_sets(f, idx, fb, 4, True)
    assert all(len(s) == 4 and int(i) in s for s, i in zip(sets, idx))
    expected_loss, expected_grad = fgc_numpy(a, f, idx, fb, gb, 4, True)
    loss, grad = jax.value_and_grad(fgc_jax)(a, f, idx, fb, gb, 4, True)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_fgc_loss_sends_no_gradient_to_banks_or_features():
    a, f, idx, fb, gb = fgc_problem()
    grads = jax.grad(fgc_jax, argnums=(1, 3, 4))(a, f, idx, fb, gb, 5, True)
    for g in grads:
        np.testing.assert_array_equal(g, np.zeros_like(g))


@pytest.mark.parametrize("k", [5, 44])
def test_fgc_loss_ignores_padding_rows(k):
    a, f, idx, fb, gb = fgc_problem(n_rows=45)
    pad = ((0, 3), (0, 0))  # zero rows, as memory_bank.init_bank pads: logit 0, similarity 0
    expected = fgc_numpy(a, f, idx, fb, gb, k, True)
    loss, grad = jax.value_and_grad(fgc_jax)(a, f, idx, np.pad(fb, pad), np.pad(gb, pad), k, True,
                                             num_valid_rows=45)
    np.testing.assert_allclose(loss, expected[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad, expected[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -0.07])
def test_fgc_loss_rejects_non_positive_temperature(temperature):
    a, f, idx, fb, gb = fgc_problem()
    with pytest.raises(ValueError, match="temperature"):
        losses.fgc_contrastive_loss(a, f, idx, fb, gb, k=5, temperature=temperature, use_neighbours=True)


def test_fgc_loss_rejects_gate_logits_that_do_not_fit_the_gate_bank():
    a, f, idx, fb, gb = fgc_problem()
    with pytest.raises(ValueError, match="log_alpha|gate"):
        fgc_jax(a[:, :5], f, idx, fb, gb, 5, False)
