"""Tests of fgc_jax.memory_bank against NumPy (FGC_SPEC.md §2), single-device and sharded.

The sharded tests run the per-shard functions under `jax.shard_map` on the 8 virtual
CPU devices of conftest.py and require the single-device answers exactly.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fgc_jax import losses, memory_bank

NUM_DEVICES = 8
T = 0.07


def unit_rows(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def neighbours_numpy(f, idx, bank, k, num_valid_rows=None):
    """Top-k rows of f @ F^T over the valid rows, own row scored -2, ties to the lower row."""
    bank = bank[:num_valid_rows or len(bank)].astype(np.float64)
    sims = f.astype(np.float64) @ bank.T
    sims[np.arange(len(idx)), idx] = -2.0
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def update_numpy(bank, idx, values, momentum):
    out = bank.astype(np.float64).copy()
    v = momentum * out[idx] + (1.0 - momentum) * values
    out[idx] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


# ----------------------------------------------------------------------------- init
@pytest.mark.parametrize("num_rows,num_shards,padded", [(61, 8, 64), (64, 8, 64), (10, 1, 10), (1, 4, 4)])
def test_padded_num_rows(num_rows, num_shards, padded):
    assert memory_bank.padded_num_rows(num_rows, num_shards) == padded


def test_init_bank_is_uniform_in_plus_minus_s_and_zero_padded():
    dim, rows = 12, 1001
    s = 1.0 / np.sqrt(dim / 3.0)  # = 0.5
    bank = np.asarray(memory_bank.init_bank(jax.random.key(0), rows, dim, num_shards=NUM_DEVICES))
    assert bank.shape == (1008, dim) and bank.shape[0] % NUM_DEVICES == 0
    np.testing.assert_array_equal(bank[rows:], 0.0)
    valid = bank[:rows]
    assert valid.min() >= -s and valid.max() <= s
    assert valid.min() < -0.99 * s and valid.max() > 0.99 * s
    np.testing.assert_allclose(valid.var(), s ** 2 / 3, rtol=0.03)  # variance of U(-s, s)
    assert abs(valid.mean()) < 0.01
    assert len(np.unique(valid)) > 0.99 * valid.size


def test_init_bank_dtype_and_no_padding_on_one_shard():
    bank = memory_bank.init_bank(jax.random.key(1), 10, 4, dtype=jnp.bfloat16)
    assert bank.shape == (10, 4) and bank.dtype == jnp.bfloat16
    assert np.all(np.asarray(bank, np.float32) != 0)


# ----------------------------------------------------------------------------- update
@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_update_bank_matches_numpy_and_leaves_other_rows(momentum):
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(20, 6)).astype(np.float32)
    idx = np.array([3, 7, 11, 0], np.int32)
    values = rng.normal(size=(4, 6)).astype(np.float32)
    out = np.asarray(jax.jit(memory_bank.update_bank, static_argnames="momentum")(
        bank, idx, values, momentum=momentum))
    np.testing.assert_allclose(out, update_numpy(bank, idx, values, momentum), rtol=1e-5, atol=1e-6)
    untouched = np.setdiff1d(np.arange(20), idx)
    np.testing.assert_array_equal(out[untouched], bank[untouched])
    np.testing.assert_allclose(np.linalg.norm(out[idx], axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5])
def test_update_bank_rejects_momentum_outside_unit_interval(momentum):
    with pytest.raises(ValueError, match="momentum"):
        memory_bank.update_bank(jnp.ones((4, 3)), jnp.arange(2), jnp.ones((2, 3)), momentum=momentum)


@pytest.mark.parametrize("index,values", [(np.arange(2), np.ones((2, 5))), (np.arange(3), np.ones((2, 4)))])
def test_update_bank_rejects_mismatched_shapes(index, values):
    with pytest.raises(ValueError, match="values|index"):
        memory_bank.update_bank(jnp.ones((10, 4)), jnp.asarray(index), jnp.asarray(values), momentum=0.5)


# ----------------------------------------------------------------------------- neighbours
def integer_problem(seed=0, n_rows=24, dim=4, batch=6):
    """Small integers: every dot product is exact, so ties are real ties."""
    rng = np.random.default_rng(seed)
    bank = rng.integers(-3, 4, (n_rows, dim)).astype(np.float32)
    bank[17], bank[20], bank[9] = bank[5], bank[2], bank[2]  # duplicated rows tie
    f = rng.integers(0, 4, (batch, dim)).astype(np.float32)
    idx = rng.choice(n_rows, batch, replace=False).astype(np.int32)
    return f, idx, bank


@pytest.mark.parametrize("k", [1, 3, 10, 23])
def test_nearest_neighbours_match_numpy_argsort(k):
    f, idx, bank = integer_problem()
    got = np.asarray(jax.jit(memory_bank.nearest_neighbours, static_argnames="k")(f, idx, bank, k=k))
    np.testing.assert_array_equal(got, neighbours_numpy(f, idx, bank, k))


def test_nearest_neighbours_score_own_row_minus_two_and_break_ties_by_lower_row():
    bank = np.zeros((8, 2), np.float32)
    bank[[1, 3, 6]] = [1.0, 0.0]  # three equal best rows for a query along x
    bank[4] = [2.0, 0.0]  # the query's own row, the most similar of all
    got = np.asarray(memory_bank.nearest_neighbours(np.array([[1.0, 0.0]]), np.array([4]), bank, k=2))
    np.testing.assert_array_equal(got, [[1, 3]])
    # The own row scores exactly -2: above rows that score less, as in the reference.
    bank = np.array([[-2.5, 0.0], [-2.1, 0.0], [5.0, 0.0], [-1.9, 0.0]], np.float32)
    got = np.asarray(memory_bank.nearest_neighbours(np.array([[1.0, 0.0]]), np.array([2]), bank, k=3))
    np.testing.assert_array_equal(got, [[3, 2, 1]])


def test_nearest_neighbours_never_return_padding_rows():
    # Valid similarities lie in (-2, 0); zero padding rows would score 0 and win if counted.
    rng = np.random.default_rng(1)
    valid = 13
    bank = np.zeros((16, 4), np.float32)
    bank[:valid] = -rng.uniform(0.05, 0.45, (valid, 4))
    f = rng.uniform(0.1, 1.0, (5, 4)).astype(np.float32)
    idx = np.array([0, 4, 7, 12, 9], np.int32)
    got = np.asarray(memory_bank.nearest_neighbours(f, idx, bank, k=valid - 1, num_valid_rows=valid))
    np.testing.assert_array_equal(got, neighbours_numpy(f, idx, bank, valid - 1, valid))
    for row, own in zip(got, idx):
        assert sorted(row) == sorted(set(range(valid)) - {own})


@pytest.mark.parametrize("k,num_valid_rows", [(0, None), (-1, None), (10, None), (11, None), (7, 7)])
def test_nearest_neighbours_reject_k_outside_bank(k, num_valid_rows):
    with pytest.raises(ValueError, match="k="):
        memory_bank.nearest_neighbours(jnp.ones((2, 4)), jnp.arange(2), jnp.ones((10, 4)), k=k,
                                       num_valid_rows=num_valid_rows)


@pytest.mark.parametrize("features,index", [(np.ones((2, 5)), np.arange(2)), (np.ones((2, 4)), np.arange(3))])
def test_nearest_neighbours_reject_mismatched_shapes(features, index):
    with pytest.raises(ValueError, match="features|index"):
        memory_bank.nearest_neighbours(features, index, jnp.ones((10, 4)), k=2)


def test_approx_method_agrees_with_exact_on_cpu_and_unknown_method_raises():
    # lax.approx_max_k is exact off TPU.
    f, idx, bank = integer_problem(seed=3)
    got = memory_bank.nearest_neighbours(f, idx, bank, k=4, method="approx")
    np.testing.assert_array_equal(got, neighbours_numpy(f, idx, bank, 4))
    with pytest.raises(ValueError, match="method"):
        memory_bank.nearest_neighbours(f, idx, bank, k=4, method="faiss")


@pytest.mark.parametrize("log_alpha,index", [(np.ones((2, 5)), np.arange(2)),
                                             (np.ones((2, 4)), np.arange(3))])
def test_positive_log_prob_rejects_mismatched_shapes(log_alpha, index):
    with pytest.raises(ValueError, match="log_alpha|index"):
        memory_bank.positive_log_prob(jnp.asarray(log_alpha), jnp.asarray(index), None, jnp.ones((10, 4)),
                                      temperature=T)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_positive_log_prob_rejects_non_positive_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        memory_bank.positive_log_prob(jnp.ones((2, 4)), jnp.arange(2), None, jnp.ones((10, 4)),
                                      temperature=temperature)


# ----------------------------------------------------------------------------- sharded
@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < NUM_DEVICES:
        pytest.skip(f"needs {NUM_DEVICES} devices (conftest.py forces 8 virtual CPU devices)")
    return jax.make_mesh((NUM_DEVICES,), ("data",))


def put(mesh, *xs):
    return [jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data"))) for x in xs]


def per_device_copies(x):
    """The 8 device-ordered copies of an all-gathered output returned with out_specs P('data')."""
    x = np.asarray(x)
    return x.reshape(NUM_DEVICES, -1, *x.shape[1:])


def bank_problem(num_valid_rows, dim=16, batch=16, seed=0):
    rng = np.random.default_rng(seed)
    rows = memory_bank.padded_num_rows(num_valid_rows, NUM_DEVICES)
    feature_bank, gate_bank = np.zeros((2, rows, dim), np.float32)
    feature_bank[:num_valid_rows] = unit_rows(rng.normal(size=(num_valid_rows, dim)))
    gate_bank[:num_valid_rows] = unit_rows(rng.normal(size=(num_valid_rows, dim)))
    idx = rng.choice(num_valid_rows, batch, replace=False).astype(np.int32)
    f = np.abs(rng.normal(size=(batch, dim))).astype(np.float32)
    a = rng.normal(0, 0.3, (batch, dim)).astype(np.float32)
    return a, f, idx, feature_bank, gate_bank


@pytest.mark.parametrize("routing", memory_bank.KNN_ROUTINGS)
@pytest.mark.parametrize("num_valid_rows,k", [(64, 5), (61, 5), (61, 60)])
def test_sharded_neighbours_equal_single_device(mesh, num_valid_rows, k, routing):
    _, f, idx, bank, _ = bank_problem(num_valid_rows)
    fn = jax.jit(jax.shard_map(
        lambda f, i, b: memory_bank.nearest_neighbours(f, i, b, k=k, num_valid_rows=num_valid_rows,
                                                       axis_name="data", routing=routing),
        mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data")))
    expected = neighbours_numpy(f, idx, bank, k, num_valid_rows)
    np.testing.assert_array_equal(
        memory_bank.nearest_neighbours(f, idx, bank, k=k, num_valid_rows=num_valid_rows), expected)
    for copy in per_device_copies(fn(*put(mesh, f, idx, bank))):
        np.testing.assert_array_equal(copy, expected)


@pytest.mark.parametrize("routing", memory_bank.KNN_ROUTINGS)
def test_sharded_neighbours_break_ties_like_single_device(mesh, routing):
    # Duplicated rows on different shards (8 rows per shard): the lower row must win.
    f, idx, bank = integer_problem(seed=2, n_rows=64, dim=4, batch=16)
    bank[[13, 29, 50]] = bank[2]
    fn = jax.jit(jax.shard_map(lambda f, i, b: memory_bank.nearest_neighbours(f, i, b, k=7, axis_name="data",
                                                                              routing=routing),
                               mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data")))
    expected = neighbours_numpy(f, idx, bank, 7)
    for copy in per_device_copies(fn(*put(mesh, f, idx, bank))):
        np.testing.assert_array_equal(copy, expected)


@pytest.mark.parametrize("use_neighbours", [False, True])
@pytest.mark.parametrize("num_valid_rows", [64, 61])
def test_sharded_loss_and_gradient_equal_single_device(mesh, use_neighbours, num_valid_rows):
    a, f, idx, fb, gb = bank_problem(num_valid_rows)
    kwargs = dict(k=5, temperature=T, use_neighbours=use_neighbours, num_valid_rows=num_valid_rows)
    sharded = jax.jit(jax.shard_map(
        lambda *args: losses.fgc_contrastive_loss(*args, axis_name="data", **kwargs),
        mesh=mesh, in_specs=(P("data"),) * 5, out_specs=P()))
    args = put(mesh, a, f, idx, fb, gb)
    with jax.set_mesh(mesh):
        loss, grad = jax.value_and_grad(sharded)(*args)
    expected_loss, expected_grad = jax.value_and_grad(
        lambda *args: losses.fgc_contrastive_loss(*args, **kwargs))(a, f, idx, fb, gb)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)  # psum order differs
    assert np.any(np.asarray(grad) != 0)


def test_sharded_update_equals_single_device(mesh):
    num_valid_rows = 61
    a, f, idx, fb, _ = bank_problem(num_valid_rows)
    idx[-1] = num_valid_rows - 1  # a row on the last, partly padded shard
    sharded = jax.jit(jax.shard_map(
        lambda b, i, v: memory_bank.update_bank(b, i, v, momentum=0.5, axis_name="data"),
        mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data")))
    expected = update_numpy(fb, idx, f, 0.5)
    np.testing.assert_allclose(memory_bank.update_bank(jnp.asarray(fb), idx, f, momentum=0.5), expected,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sharded(*put(mesh, fb, idx, f)), expected, rtol=1e-5, atol=1e-6)


def test_sharded_bfloat16_bank_finds_the_float32_neighbours(mesh):
    # Orthonormal bank rows; each query is 3, 2, 1 times three of them: similarities are
    # 3, 2, 1 and 0 elsewhere, far apart compared with bfloat16 rounding.
    num_valid_rows, dim = 61, 64
    rng = np.random.default_rng(3)
    bank = np.zeros((64, dim), np.float32)
    bank[:num_valid_rows] = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:num_valid_rows]
    idx = rng.choice(num_valid_rows, 16, replace=False).astype(np.int32)
    targets = np.stack([rng.choice(np.setdiff1d(np.arange(num_valid_rows), [i]), 3, replace=False)
                        for i in idx])
    f = np.einsum("t,btd->bd", np.array([3.0, 2.0, 1.0]), bank[targets]).astype(np.float32)
    expected = neighbours_numpy(f, idx, bank, 3, num_valid_rows)
    np.testing.assert_array_equal(expected, targets)
    fn = jax.jit(jax.shard_map(
        lambda f, i, b: memory_bank.nearest_neighbours(f, i, b, k=3, num_valid_rows=num_valid_rows,
                                                       axis_name="data"),
        mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data")))
    bf16_bank = jnp.asarray(bank, jnp.bfloat16)
    for copy in per_device_copies(fn(*put(mesh, f, idx, bf16_bank))):
        np.testing.assert_array_equal(copy, expected)
    # Updating a bfloat16 bank keeps its dtype and stores the normalised rows.
    updated = memory_bank.update_bank(bf16_bank, idx, f, momentum=0.5)
    assert updated.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(updated, np.float32)[idx],
                               update_numpy(np.asarray(bf16_bank, np.float32), idx, f, 0.5)[idx], atol=1e-2)


@pytest.mark.needs_devices(NUM_DEVICES)
@pytest.mark.parametrize("via_all_gather", [False, True])
def test_candidates_reach_the_device_that_holds_the_example(via_all_gather):
    # Each of 8 shards proposes k=3 candidates for all 16 examples; device d must receive rows
    # 2d, 2d+1 with the shards' candidates side by side in shard order (both routes: all_to_all
    # on accelerators, all-gather on XLA:CPU).
    shards, batch, k = 8, 16, 3
    proposals = np.arange(shards * batch * k).reshape(shards, batch, k)  # [shard, example, j]
    mesh = jax.make_mesh((shards,), ("data",))
    route = jax.jit(jax.shard_map(
        lambda x: memory_bank._to_owner(x[0], "data", via_all_gather=via_all_gather),
        mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    received = np.asarray(route(jax.device_put(proposals, NamedSharding(mesh, P("data")))))
    expected = proposals.transpose(1, 0, 2).reshape(batch, shards * k)  # [example, (shard, j)]
    np.testing.assert_array_equal(received, expected)


# ----------------------------------------------------------------------------- scaling
@pytest.mark.parametrize("num_rows,dtype,shard_bytes", [
    (8192, jnp.float32, 8192 // 8 * 64 * 4),  # 262,144 bytes a device
    (1001, jnp.bfloat16, 126 * 64 * 2),  # padded to 1008 rows: 126 a device, 16,128 bytes
])
def test_each_device_holds_an_eighth_of_the_bank(mesh, num_rows, dtype, shard_bytes):
    bank = memory_bank.init_bank(jax.random.key(0), num_rows, 64, num_shards=NUM_DEVICES, dtype=dtype)
    bank = jax.device_put(bank, NamedSharding(mesh, P("data")))
    shards = bank.addressable_shards
    assert len({s.device for s in shards}) == NUM_DEVICES
    assert [s.data.nbytes for s in shards] == [shard_bytes] * NUM_DEVICES


def compiled_flops(fn, *args) -> float:
    """FLOPs that XLA's cost analysis reports for one (per-device) execution of `fn`."""
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


@pytest.mark.needs_cpu
def test_nearest_neighbour_flops_are_the_query_bank_dot_split_over_devices(mesh):
    # Dot of B queries with N rows of dimension D: 2 B N D FLOPs (one multiply, one add each);
    # the masking and top-k add ~3 (one device) and ~18 (sharded) FLOPs per score, <2% at D=512.
    batch, rows, dim, k = 16, 8192, 512, 20
    spec = functools.partial(jax.ShapeDtypeStruct, sharding=NamedSharding(mesh, P("data")))
    single = compiled_flops(lambda f, i, b: memory_bank.nearest_neighbours(f, i, b, k=k),
                            jax.ShapeDtypeStruct((batch, dim), jnp.float32),
                            jax.ShapeDtypeStruct((batch,), jnp.int32),
                            jax.ShapeDtypeStruct((rows, dim), jnp.float32))
    sharded = compiled_flops(
        jax.shard_map(lambda f, i, b: memory_bank.nearest_neighbours(f, i, b, k=k, axis_name="data"),
                      mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data")),
        spec((batch, dim), jnp.float32), spec((batch,), jnp.int32), spec((rows, dim), jnp.float32))
    dot = 2 * batch * rows * dim  # 134,217,728
    assert 1.0 <= single / dot <= 1.01  # measured 1.003
    # Each device scores the global batch against its N/8 rows.
    assert 1.0 <= sharded / (dot / NUM_DEVICES) <= 1.03  # measured 1.017
