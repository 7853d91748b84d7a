"""Memory banks of FGC (spec §2): one row per training example, sharded by rows over devices.

Every function here works on one shard of a bank: the `[rows_per_shard, dim]` block that a
device holds. With `axis_name=None` the shard is the whole bank (single device). With
`axis_name` set, the function runs inside `jax.shard_map` over that mesh axis; the
examples of the local batch are gathered so every shard scores the whole global batch
against its rows, and only small per-example results (top-k candidates, softmax
normalisers) cross devices. Results equal the single-device ones exactly (ties in
top-k go to the lower row index in both forms).

A bank may have more rows than the training set (padded to a multiple of the device
count); rows at or beyond `num_valid_rows` are never neighbours and carry no probability.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

SELF_SIMILARITY = -2.0  # the reference excludes an example's own row by setting its similarity to -2
KNN_METHODS = ("exact", "approx")
KNN_ROUTINGS = ("all_to_all", "all_gather")


def padded_num_rows(num_rows: int, num_shards: int) -> int:
    """Bank rows after padding `num_rows` up to a multiple of `num_shards`."""
    return -(-num_rows // num_shards) * num_shards


def init_bank(rng: Array, num_rows: int, dim: int, *, num_shards: int = 1,
              dtype: Any = jnp.float32) -> Array:
    """A bank of `num_rows` rows uniform in `[-s, s]`, `s = 1/sqrt(dim/3)`; padding rows are 0."""
    scale = 1.0 / (dim / 3.0) ** 0.5
    bank = jax.random.uniform(rng, (num_rows, dim), jnp.float32, -scale, scale)
    padding = padded_num_rows(num_rows, num_shards) - num_rows
    return jnp.pad(bank, ((0, padding), (0, 0))).astype(dtype)


def gather_batch(x: Array, axis_name: str | None) -> Array:
    """The global batch: `x` itself on one device, else the device-ordered concatenation."""
    return x if axis_name is None else lax.all_gather(x, axis_name, tiled=True)


def _shard_rows(bank_shard: Array, axis_name: str | None) -> Array:
    """Global row numbers of this shard's rows."""
    n_local = bank_shard.shape[0]
    offset = 0 if axis_name is None else lax.axis_index(axis_name) * n_local
    return offset + jnp.arange(n_local)


def _local_row(index: Array, rows: Array) -> tuple[Array, Array]:
    """Position of global row `index` within this shard, and whether the shard holds it."""
    local = index - rows[0]
    held = (local >= 0) & (local < rows.shape[0])
    return jnp.where(held, local, 0), held


def _scores(queries: Array, bank_shard: Array) -> Array:
    """`queries @ bank_shard.T` accumulated in float32 whatever the bank's storage dtype."""
    return jnp.einsum("bd,nd->bn", queries.astype(bank_shard.dtype), bank_shard,
                      preferred_element_type=jnp.float32)


def _valid_rows(num_valid_rows: int | None, bank_shard: Array, axis_name: str | None) -> int:
    """`num_valid_rows` checked against the bank's total rows (its default)."""
    total = bank_shard.shape[0] * (1 if axis_name is None else lax.axis_size(axis_name))
    if num_valid_rows is None:
        return total
    if not 0 < num_valid_rows <= total:
        raise ValueError(f"num_valid_rows={num_valid_rows} must lie in [1, {total}] (the bank's rows)")
    return num_valid_rows


def _check_rows(name: str, values: Array, index: Array, bank_shard: Array) -> None:
    if values.shape != (index.shape[0], bank_shard.shape[-1]):
        raise ValueError(f"{name} {values.shape} must be [len(index), bank width] = "
                         f"[{index.shape[0]}, {bank_shard.shape[-1]}] (index {index.shape})")


def _validate(k: int, num_valid_rows: int, method: str, routing: str) -> None:
    if not 0 < k < num_valid_rows:
        raise ValueError(f"k={k} must satisfy 0 < k < bank size ({num_valid_rows}): an example "
                         "cannot have more neighbours than there are other rows")
    if method not in KNN_METHODS:
        raise ValueError(f"knn method {method!r} is unknown; choose one of {KNN_METHODS}")
    if routing not in KNN_ROUTINGS:
        raise ValueError(f"knn routing {routing!r} is unknown; choose one of {KNN_ROUTINGS}")


def _to_owner(x: Array, axis_name: str, *, via_all_gather: bool) -> Array:
    """`[global_batch, k]` per shard -> `[local_batch, shards * k]` on the example's device.

    Columns are grouped by source shard, in shard order. An `all_to_all`, or with
    `via_all_gather` an all-gather and a slice: `shards` times the traffic, fine for the few
    devices of a CPU mesh (see `nearest_neighbours`).
    """
    if not via_all_gather:
        return lax.all_to_all(x, axis_name, split_axis=0, concat_axis=1, tiled=True)
    shards, local = lax.axis_size(axis_name), x.shape[0] // lax.axis_size(axis_name)
    mine = lax.dynamic_slice_in_dim(lax.all_gather(x, axis_name), lax.axis_index(axis_name) * local,
                                    local, axis=1)  # [shards, local_batch, k]
    return jnp.swapaxes(mine, 0, 1).reshape(local, shards * x.shape[1])


def nearest_neighbours(features: Array, index: Array, feature_bank_shard: Array, *, k: int,
                       num_valid_rows: int | None = None, axis_name: str | None = None,
                       method: str = "exact", routing: str = "all_to_all") -> Array:
    """Global row numbers `[global_batch, k]` of each example's k most similar bank rows.

    Similarity is the raw dot product `f @ F^T` (spec §2.1); each example's own row
    (`index`) scores -2 and padding rows -inf. `features`/`index` are the local batch;
    the answer covers the global batch, in device order. `method='approx'` uses
    `lax.approx_max_k`, which is fast on TPU only. `routing` moves each shard's candidates
    to the example's device: 'all_to_all', or 'all_gather' (`shards` times the traffic; on
    XLA:CPU an all_to_all consumer makes XLA replace the shard's top_k kernel by a full sort,
    measured up to 26x slower, so the trainer picks it there: `fgc_jax/cpu_workarounds.py`).
    Same answer either way.
    """
    num_valid_rows = _valid_rows(num_valid_rows, feature_bank_shard, axis_name)
    _validate(k, num_valid_rows, method, routing)
    _check_rows("features", features, index, feature_bank_shard)
    queries, index = gather_batch(features, axis_name), gather_batch(index, axis_name)
    rows = _shard_rows(feature_bank_shard, axis_name)
    sims = _scores(queries, feature_bank_shard)
    sims = jnp.where(rows[None, :] == index[:, None], SELF_SIMILARITY, sims)
    sims = jnp.where(rows[None, :] < num_valid_rows, sims, -jnp.inf)

    k_local = min(k, rows.shape[0])
    if method == "approx":
        # Recall is defined over the whole (padded) bank that the shards split between them.
        total_rows = rows.shape[0] * (1 if axis_name is None else lax.axis_size(axis_name))
        values, local = lax.approx_max_k(sims, k_local, recall_target=0.95,
                                         reduction_input_size_override=total_rows)
    else:
        values, local = lax.top_k(sims, k_local)
    candidates = local + rows[0]
    if axis_name is None:
        return candidates

    # Route each example's candidates to the device that holds the example, merge there
    # (shard order keeps ties on the lower row), then share the merged lists.
    route = functools.partial(_to_owner, axis_name=axis_name, via_all_gather=routing == "all_gather")
    values, candidates = route(values), route(candidates)
    best_values, best = lax.top_k(values, k)
    del best_values
    merged = jnp.take_along_axis(candidates, best, axis=1)
    return lax.all_gather(merged, axis_name, tiled=True)


def positive_log_prob(log_alpha: Array, index: Array, neighbours: Array | None, gate_bank_shard: Array,
                      *, temperature: float, num_valid_rows: int | None = None,
                      axis_name: str | None = None) -> Array:
    """`log(sum_{j in P_b} q_bj + 1e-7)` for every example of the global batch.

    `q = softmax(a @ G^T / T)` over all valid bank rows; `P_b = {index_b} ∪ neighbours_b`
    (instance discrimination alone when `neighbours` is None). The softmax max and
    normaliser are combined across shards; gradients reach `log_alpha` only.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    num_valid_rows = _valid_rows(num_valid_rows, gate_bank_shard, axis_name)
    _check_rows("log_alpha", log_alpha, index, gate_bank_shard)
    queries, index = gather_batch(log_alpha, axis_name), gather_batch(index, axis_name)
    bank = lax.stop_gradient(gate_bank_shard)
    rows = _shard_rows(bank, axis_name)
    logits = _scores(queries, bank) / temperature
    logits = jnp.where(rows[None, :] < num_valid_rows, logits, -jnp.inf)

    shift = lax.stop_gradient(jnp.max(logits, axis=1))
    if axis_name is not None:
        shift = lax.pmax(shift, axis_name)
    exp = jnp.exp(logits - shift[:, None])
    normaliser = jnp.sum(exp, axis=1)

    positives, counted = index[:, None], jnp.ones((index.shape[0], 1), bool)
    if neighbours is not None:
        positives = jnp.concatenate([positives, neighbours], axis=1)
        # A set union: the example's own row counts once even if top-k returned it.
        counted = jnp.concatenate([counted, neighbours != index[:, None]], axis=1)
    local, held = _local_row(positives, rows)
    positive_mass = jnp.sum(jnp.where(counted & held, jnp.take_along_axis(exp, local, axis=1), 0.0),
                            axis=1)
    if axis_name is not None:
        normaliser = lax.psum(normaliser, axis_name)
        positive_mass = lax.psum(positive_mass, axis_name)
    return jnp.log(positive_mass / normaliser + 1e-7)


def update_bank(bank_shard: Array, index: Array, values: Array, *, momentum: float,
                axis_name: str | None = None) -> Array:
    """Momentum update of rows `index`: `v = m * bank[i] + (1 - m) * x`, stored as `v / ||v||`.

    `index`/`values` are the local batch; every shard applies the rows of the global
    batch that it holds. Indices must be distinct within a global batch.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    _check_rows("values", values, index, bank_shard)
    index = gather_batch(index, axis_name)
    values = gather_batch(lax.stop_gradient(values), axis_name).astype(jnp.float32)
    rows = _shard_rows(bank_shard, axis_name)
    local, held = _local_row(index, rows)
    v = momentum * bank_shard[local].astype(jnp.float32) + (1.0 - momentum) * values
    v = v / jnp.maximum(jnp.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    target = jnp.where(held, local, bank_shard.shape[0])  # out of range: dropped
    return bank_shard.at[target].set(v.astype(bank_shard.dtype), mode="drop")
