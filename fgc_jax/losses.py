"""The gate losses of FGC (spec §2): L0 sparsity, batch shaping, neighbourhood contrast."""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy import special

from fgc_jax import memory_bank

Array = jax.Array

BATCH_SHAPING_ALPHA = 0.6
BATCH_SHAPING_BETA = 0.4


def l0_loss(probs: Sequence[Array], mask: Array | None = None, axis_name: str | None = None) -> Array:
    """Mean gate probability over every channel of every block and example.

    `mask` [batch] marks the real examples of a padded batch; padding is not counted.
    With `axis_name` (inside `shard_map`), the mean is over the global batch.
    """
    if not probs:
        raise ValueError("l0_loss needs the gate probabilities of at least one block")
    weight = jnp.ones(probs[0].shape[0], jnp.float32) if mask is None else mask.astype(jnp.float32)
    total = sum(jnp.sum(p * weight[:, None]) for p in probs)
    count = jnp.sum(weight) * sum(p.shape[1] for p in probs)
    if axis_name is not None:
        total, count = jax.lax.psum((total, count), axis_name)
    return total / count


def batch_shaping_loss(prob: Array, alpha: float = BATCH_SHAPING_ALPHA,
                       beta: float = BATCH_SHAPING_BETA, mask: Array | None = None, *,
                       series_loop: bool = False) -> Array:
    """Cramér–von Mises distance of each channel's batch of probabilities to Beta(alpha, beta).

    `prob` is `[batch, channels]` over the batch on which the CDF is taken (the global
    batch). Loss `sum_{i,c} (i/(N+1) - BetaCDF(x_(i)))^2 / N`; its gradient is the
    reference's `-2 pdf(x_(i)) (e_i - c_i) / N`, an infinite pdf counting as 0. With
    `mask` [batch], N and the CDF are those of the real examples alone. `series_loop`: see
    `beta_cdf` (the same values either way).
    """
    if prob.ndim != 2:
        raise ValueError(f"batch_shaping_loss expects [batch, channels] probabilities, got shape {prob.shape}")
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"Beta prior parameters must be positive, got alpha={alpha}, beta={beta}")
    if mask is None:
        mask = jnp.ones(prob.shape[0], bool)
    return _batch_shaping(prob.astype(jnp.float32), mask, float(alpha), float(beta), bool(series_loop))


def beta_cdf(x: Array, alpha: float, beta: float, num_terms: int = 48, *, loop: bool = False) -> Array:
    """Regularised incomplete beta function I_x(alpha, beta), accurate to float32 rounding.

    `jax.scipy.special.betainc` is off by up to ~50 float32 ulps for the batch-shaping prior
    (3e-6 at Beta(0.6, 0.4)), which moved the loss 2.5e-5 from the reference's float64 CDF.
    This sums the power series `I_x(a, b) = x^a / B(a, b) * sum_n (1-b)_n / n! * x^n / (a+n)`
    on whichever side of 1/2 `x` lies (`I_x(a, b) = 1 - I_{1-x}(b, a)`), so the ratio of
    consecutive terms is at most 1/2 and the sum is done after `num_terms` terms. For
    alpha, beta <= 1 every term is positive: no cancellation.

    `loop=True` sums in `lax.scan` loops instead of unrolled operations: the same operations in
    the same order, so the same bits. Unrolled in a train step (the loss an output as well as
    its gradient) XLA:CPU splits the series into ~150 fusions a call and compiles them for
    seconds (docs/performance.md); on accelerators a loop would cost an iteration per term, so
    only the trainer's CPU runs use it (`fgc_jax.cpu_workarounds`).
    """
    x = jnp.asarray(x, jnp.float32)
    flip = x > 0.5
    y = jnp.where(flip, 1.0 - x, x)
    a, b = jnp.where(flip, beta, alpha), jnp.where(flip, alpha, beta)

    def term(carry, n):  # the n-th term, and the next one's coefficient and power of y
        coefficient, power = carry
        return (coefficient * (n + 1 - b) / (n + 1), power * y), coefficient * power / (a + n)

    first = (jnp.ones_like(y), jnp.ones_like(y))
    if loop:
        _, terms = lax.scan(term, first, jnp.arange(num_terms, dtype=jnp.float32))
        series, _ = lax.scan(lambda total, t: (total + t, None), terms[-1], terms[-2::-1])  # smallest first
    else:
        carry, terms = first, []
        for n in range(num_terms):
            carry, t = term(carry, n)
            terms.append(t)
        series = functools.reduce(jnp.add, reversed(terms))  # smallest terms first
    inverse_beta = math.exp(math.lgamma(alpha + beta) - math.lgamma(alpha) - math.lgamma(beta))
    near_side = jnp.power(y, a) * inverse_beta * series
    return jnp.where(flip, 1.0 - near_side, near_side)


def _batch_shaping_terms(prob: Array, mask: Array, alpha: float, beta: float, series_loop: bool
                         ) -> tuple[Array, Array]:
    n = jnp.sum(mask).astype(jnp.float32)
    # Padding sorts after every probability (all <= 1) and is then left out.
    order = jnp.argsort(jnp.where(mask[:, None], prob, 2.0), axis=0)
    x = jnp.take_along_axis(prob, order, axis=0)
    position = jnp.arange(1, prob.shape[0] + 1, dtype=jnp.float32)[:, None]
    real = position <= n
    x = jnp.where(real, x, 0.5)
    gap = jnp.where(real, position / (n + 1) - beta_cdf(x, alpha, beta, loop=series_loop), 0.0)
    loss = jnp.sum(gap ** 2) / n
    log_pdf = ((alpha - 1) * jnp.log(x) + (beta - 1) * jnp.log1p(-x)
               - special.betaln(alpha, beta))
    pdf = jnp.exp(log_pdf)
    pdf = jnp.where(jnp.isfinite(pdf), pdf, 0.0)
    grad_sorted = -2.0 * pdf * gap / n
    columns = jnp.arange(prob.shape[1])[None, :]
    grad = jnp.zeros_like(prob).at[order, columns].set(grad_sorted)
    return loss, grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _batch_shaping(prob: Array, mask: Array, alpha: float, beta: float, series_loop: bool) -> Array:
    return _batch_shaping_terms(prob, mask, alpha, beta, series_loop)[0]


def _batch_shaping_fwd(prob, mask, alpha, beta, series_loop):
    return _batch_shaping_terms(prob, mask, alpha, beta, series_loop)


def _batch_shaping_bwd(alpha, beta, series_loop, grad, cotangent):
    del alpha, beta, series_loop
    return cotangent * grad, None


_batch_shaping.defvjp(_batch_shaping_fwd, _batch_shaping_bwd)


def fgc_contrastive_loss(log_alpha: Array, feature: Array, index: Array, feature_bank: Array,
                         gate_bank: Array, *, k: int, temperature: float, use_neighbours: bool,
                         num_valid_rows: int | None = None, axis_name: str | None = None,
                         knn_method: str = "exact", knn_routing: str = "all_to_all",
                         mask: Array | None = None) -> Array:
    """FGC neighbourhood-contrastive gate loss of one block (spec §2), over the global batch.

    Positives of example b are its own bank row plus, when `use_neighbours`, the k rows of
    the feature bank most similar to its feature. The loss pulls its gate logits towards
    the gate-bank rows of those positives: `-mean_b log(sum_{j in P_b} q_bj + 1e-7)`,
    `q = softmax(a @ G^T / T)`. Banks are used as given (update them afterwards with
    `memory_bank.update_bank`). With `axis_name`, call inside `shard_map`: inputs are the
    local batch and the local bank shards; every device returns the same global loss.
    `mask` [local batch] marks the real examples of a padded batch: the mean is over them.
    `knn_method` / `knn_routing`: `method` / `routing` of `memory_bank.nearest_neighbours`.
    """
    if feature_bank.shape[0] != gate_bank.shape[0]:
        raise ValueError(f"feature_bank {feature_bank.shape} and gate_bank {gate_bank.shape} must have "
                         "the same rows (one per training example)")
    neighbours = None
    if use_neighbours:
        neighbours = memory_bank.nearest_neighbours(
            jax.lax.stop_gradient(feature), index, feature_bank, k=k,
            num_valid_rows=num_valid_rows, axis_name=axis_name, method=knn_method,
            routing=knn_routing)
    log_prob = memory_bank.positive_log_prob(log_alpha, index, neighbours, gate_bank,
                                             temperature=temperature,
                                             num_valid_rows=num_valid_rows, axis_name=axis_name)
    local = log_alpha.shape[0]
    if axis_name is not None:  # every device holds the global batch's terms: sum its own rows
        log_prob = jax.lax.dynamic_slice_in_dim(log_prob, jax.lax.axis_index(axis_name) * local, local)
    weight = jnp.ones(local, jnp.float32) if mask is None else mask.astype(jnp.float32)
    total, count = jnp.sum(log_prob * weight), jnp.sum(weight)
    if axis_name is not None:
        total, count = jax.lax.psum((total, count), axis_name)
    return -total / count
