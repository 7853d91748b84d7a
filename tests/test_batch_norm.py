"""BatchNorm against PyTorch's: statistics, unbiased running variance, masks, shards, gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fgc_jax.batch_norm import BatchNorm

torch = pytest.importorskip("torch")


def torch_batch_norm(x, scale, bias, cotangent):
    """PyTorch BatchNorm2d in float64 on NHWC `x`: output, input gradient, running stats."""
    bn = torch.nn.BatchNorm2d(x.shape[-1], momentum=0.1, eps=1e-5).double()
    with torch.no_grad():
        bn.weight.copy_(torch.as_tensor(scale))
        bn.bias.copy_(torch.as_tensor(bias))
    xt = torch.as_tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64).requires_grad_()
    y = bn(xt)
    y.backward(torch.as_tensor(cotangent.transpose(0, 3, 1, 2), dtype=torch.float64))
    return (y.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1),
            bn.running_mean.numpy(), bn.running_var.numpy())


def ours(x, scale, bias, cotangent, mask=None):
    module = BatchNorm()
    variables = module.init(jax.random.key(0), x)
    params = {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}

    def forward(x):
        return module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, mask,
                            mutable=["batch_stats"])

    (y, updates), vjp = jax.vjp(forward, x)
    (grad,) = vjp((jnp.asarray(cotangent, jnp.float32), jax.tree.map(jnp.zeros_like, updates)))
    return y, grad, updates["batch_stats"]["mean"], updates["batch_stats"]["var"]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.normal(size=(64, 8, 8, 5))).astype(np.float32)  # an offset mean
    return x, rng.uniform(0.5, 1.5, 5), rng.normal(size=5), rng.normal(size=x.shape).astype(np.float32)


def test_matches_pytorch_with_the_unbiased_running_variance(data):
    x, scale, bias, cotangent = data
    want = torch_batch_norm(x, scale, bias, cotangent)
    got = ours(jnp.asarray(x), scale, bias, cotangent)
    for name, g, w in zip(("output", "input gradient", "running mean", "running var"), got, want):
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=2e-5, atol=2e-6, err_msg=name)
    biased = x.astype(np.float64).var(axis=(0, 1, 2))
    n = 64 * 8 * 8
    np.testing.assert_allclose(got[3], 0.9 + 0.1 * biased * n / (n - 1), rtol=1e-6)


def test_padding_is_invisible(data):
    """A batch of 40 padded to 64 normalises, and is differentiated, as the 40 alone."""
    x, scale, bias, cotangent = data
    mask = np.arange(64) < 40
    padded_x = np.where(mask[:, None, None, None], x, 123.0).astype(np.float32)
    want = torch_batch_norm(x[:40], scale, bias, cotangent[:40])
    y, grad, mean, var = ours(jnp.asarray(padded_x), scale, bias, cotangent * mask[:, None, None, None],
                              jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(y)[:40], want[0], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(grad)[:40], want[1], rtol=2e-5, atol=2e-6)
    assert not np.asarray(grad)[40:].any()
    np.testing.assert_allclose(mean, want[2], rtol=2e-6)
    np.testing.assert_allclose(var, want[3], rtol=2e-6)


def test_sharded_statistics_are_those_of_the_global_batch(data):
    x, scale, bias, cotangent = data
    mask = jnp.asarray(np.arange(64) < 50)  # padding on the last two of four shards
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    module = BatchNorm(axis_name="data")
    variables = BatchNorm().init(jax.random.key(0), x)

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P("data")),
                       out_specs=(P("data"), P()))
    def sharded(x, mask):
        y, updates = module.apply(variables, x, mask, mutable=["batch_stats"])
        return y, updates["batch_stats"]

    by_rows = jax.sharding.NamedSharding(mesh, P("data"))
    y, stats = jax.jit(sharded)(jax.device_put(x, by_rows), jax.device_put(mask, by_rows))
    y_one, updates = BatchNorm().apply(variables, jnp.asarray(x), mask, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y)[:50], np.asarray(y_one)[:50], rtol=1e-5, atol=1e-5)
    for name in ("mean", "var"):
        np.testing.assert_allclose(stats[name], updates["batch_stats"][name], rtol=1e-6)


def test_evaluation_uses_the_running_statistics(data):
    x = data[0]
    variables = {"params": {"scale": jnp.full(5, 2.0), "bias": jnp.full(5, 0.5)},
                 "batch_stats": {"mean": jnp.full(5, 1.0), "var": jnp.full(5, 4.0)}}
    y = BatchNorm(use_running_average=True).apply(variables, jnp.asarray(x))
    np.testing.assert_allclose(y, (x - 1.0) / np.sqrt(4.0 + 1e-5) * 2.0 + 0.5, rtol=1e-5, atol=1e-5)
