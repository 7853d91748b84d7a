"""The gate losses of FGC (spec §2): L0 sparsity, batch shaping, neighbourhood contrast."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.scipy import special

from fgc_jax import memory_bank

Array = jax.Array

BATCH_SHAPING_ALPHA = 0.6
BATCH_SHAPING_BETA = 0.4


def l0_loss(probs: Sequence[Array]) -> Array:
    """Mean gate probability over every channel of every block and example."""
    if not probs:
        raise ValueError("l0_loss needs the gate probabilities of at least one block")
    total = sum(jnp.sum(p) for p in probs)
    count = sum(p.size for p in probs)
    return total / count


def batch_shaping_loss(prob: Array, alpha: float = BATCH_SHAPING_ALPHA,
                       beta: float = BATCH_SHAPING_BETA) -> Array:
    """Cramér–von Mises distance of each channel's batch of probabilities to Beta(alpha, beta).

    `prob` is `[batch, channels]` over the batch on which the CDF is taken (the global
    batch). Loss `sum_{i,c} (i/(N+1) - BetaCDF(x_(i)))^2 / N`; its gradient is the
    reference's `-2 pdf(x_(i)) (e_i - c_i) / N`, an infinite pdf counting as 0.
    """
    if prob.ndim != 2:
        raise ValueError(f"batch_shaping_loss expects [batch, channels] probabilities, got shape {prob.shape}")
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"Beta prior parameters must be positive, got alpha={alpha}, beta={beta}")
    return _batch_shaping(prob.astype(jnp.float32), float(alpha), float(beta))


def _batch_shaping_terms(prob: Array, alpha: float, beta: float) -> tuple[Array, Array]:
    n = prob.shape[0]
    order = jnp.argsort(prob, axis=0)
    x = jnp.take_along_axis(prob, order, axis=0)
    empirical = jnp.arange(1, n + 1, dtype=jnp.float32)[:, None] / (n + 1)
    gap = empirical - special.betainc(alpha, beta, x)
    loss = jnp.sum(gap ** 2) / n
    log_pdf = ((alpha - 1) * jnp.log(x) + (beta - 1) * jnp.log1p(-x)
               - special.betaln(alpha, beta))
    pdf = jnp.exp(log_pdf)
    pdf = jnp.where(jnp.isfinite(pdf), pdf, 0.0)
    grad_sorted = -2.0 * pdf * gap / n
    columns = jnp.arange(prob.shape[1])[None, :]
    grad = jnp.zeros_like(prob).at[order, columns].set(grad_sorted)
    return loss, grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _batch_shaping(prob: Array, alpha: float, beta: float) -> Array:
    return _batch_shaping_terms(prob, alpha, beta)[0]


def _batch_shaping_fwd(prob, alpha, beta):
    return _batch_shaping_terms(prob, alpha, beta)


def _batch_shaping_bwd(alpha, beta, grad, cotangent):
    del alpha, beta
    return (cotangent * grad,)


_batch_shaping.defvjp(_batch_shaping_fwd, _batch_shaping_bwd)


def fgc_contrastive_loss(log_alpha: Array, feature: Array, index: Array, feature_bank: Array,
                         gate_bank: Array, *, k: int, temperature: float, use_neighbours: bool,
                         num_valid_rows: int | None = None, axis_name: str | None = None,
                         knn_method: str = "exact") -> Array:
    """FGC neighbourhood-contrastive gate loss of one block (spec §2), over the global batch.

    Positives of example b are its own bank row plus, when `use_neighbours`, the k rows of
    the feature bank most similar to its feature. The loss pulls its gate logits towards
    the gate-bank rows of those positives: `-mean_b log(sum_{j in P_b} q_bj + 1e-7)`,
    `q = softmax(a @ G^T / T)`. Banks are used as given (update them afterwards with
    `memory_bank.update_bank`). With `axis_name`, call inside `shard_map`: inputs are the
    local batch and the local bank shards; every device returns the same global loss.
    """
    if feature_bank.shape[0] != gate_bank.shape[0]:
        raise ValueError(f"feature_bank {feature_bank.shape} and gate_bank {gate_bank.shape} must have "
                         "the same rows (one per training example)")
    neighbours = None
    if use_neighbours:
        neighbours = memory_bank.nearest_neighbours(
            jax.lax.stop_gradient(feature), index, feature_bank, k=k,
            num_valid_rows=num_valid_rows, axis_name=axis_name, method=knn_method)
    log_prob = memory_bank.positive_log_prob(log_alpha, index, neighbours, gate_bank,
                                             temperature=temperature,
                                             num_valid_rows=num_valid_rows, axis_name=axis_name)
    return -jnp.mean(log_prob)
