"""BatchNorm as the reference's PyTorch BatchNorm computes it, for padded, sharded batches.

Flax's `nn.BatchNorm` differs from PyTorch's in two ways that matter for FGC (spec §1):
its running variance is the biased batch variance (PyTorch stores `n/(n-1)` times it;
evaluation gates flip without it), and by default it computes the variance as
`E[x^2] - E[x]^2`, which loses float32 accuracy in the gradients of large batches. This
module keeps Flax's variable layout (`params/{scale,bias}`, `batch_stats/{mean,var}`), so
checkpoints and imports are unchanged, and computes:

- a two-pass variance in float32, `mean((x - mean)^2)`, whatever the compute dtype;
- running averages `momentum * running + (1 - momentum) * batch`, with the unbiased
  batch variance;
- statistics over the examples whose `mask` is True only, so a batch padded to a static
  shape normalises exactly like the smaller batch it holds;
- with `axis_name`, statistics over the global batch of a `shard_map` axis.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


class BatchNorm(nn.Module):
    """Batch normalisation over all axes but the last (features); see the module docstring.

    use_running_average: normalise with the running statistics (evaluation) instead of the
      batch's, and leave them unchanged.
    momentum, epsilon: PyTorch's defaults (its momentum 0.1 is our 0.9).
    axis_name: mesh axis whose devices' batches form one batch (inside `shard_map`).
    dtype: the output's dtype (statistics are always float32).
    """

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """Normalises `x` [batch, ..., features]; `mask` [batch] marks the real examples."""
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

        if self.use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            mean, var, count = self._batch_statistics(x.astype(jnp.float32), mask)
            if not self.is_initializing():
                # A batch of padding alone (possible per device without `axis_name`) leaves them.
                keep = jnp.where(count > 0, self.momentum, 1.0)
                unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
                running_mean.value = keep * running_mean.value + (1 - keep) * mean
                running_var.value = keep * running_var.value + (1 - keep) * unbiased
        y = (x.astype(jnp.float32) - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype)

    def _batch_statistics(self, x: Array, mask: Array | None) -> tuple[Array, Array, Array]:
        """Mean, biased variance (two passes) and the number of values per feature."""
        axes = tuple(range(x.ndim - 1))
        values_per_example = x[0].size // x.shape[-1]
        if mask is None:
            weight = None
            count = jnp.asarray(float(x.shape[0] * values_per_example), jnp.float32)
        else:
            weight = mask.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
            count = jnp.sum(weight) * values_per_example

        def global_sum(v: Array) -> Array:
            v = jnp.sum(v if weight is None else v * weight, axis=axes)
            return v if self.axis_name is None else lax.psum(v, self.axis_name)

        if self.axis_name is not None:
            count = lax.psum(count, self.axis_name)
        denominator = jnp.maximum(count, 1.0)
        mean = global_sum(x) / denominator
        var = global_sum(jnp.square(x - mean)) / denominator
        return mean, var, count
