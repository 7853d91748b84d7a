"""Channel gates: the gate network and straight-through binary gates (FGC_SPEC §1).

A gate decides, from a block's input, which output channels of the block's first
convolution to compute. During training the decision is a hard 0/1 sample whose
gradient is that of a Gumbel-sigmoid relaxation (straight-through estimator); at
evaluation it is the deterministic `sigmoid(logit) > 0.5`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from fgc_jax.batch_norm import BatchNorm

Array = jax.Array

GATE_RNG = "gate"  # the Flax RNG stream from which training-time gate noise is drawn
DEFAULT_TAU = 2.0 / 3.0

# PyTorch's default initialisation as used by the reference (spec §1).
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def torch_bias_init(fan_in: int) -> Callable[..., Array]:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default bias initialisation."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


@jax.custom_jvp
def _step_with_sigmoid_grad(y: Array) -> Array:
    """Heaviside step 1[y > 0] in the forward pass, d sigmoid(y)/dy in the backward pass."""
    return (y > 0).astype(y.dtype)


@_step_with_sigmoid_grad.defjvp
def _step_with_sigmoid_grad_jvp(primals, tangents):
    (y,), (dy,) = primals, tangents
    s = jax.nn.sigmoid(y)
    return _step_with_sigmoid_grad(y), s * (1.0 - s) * dy


def _uniform_noise(rng: Array, shape: tuple[int, ...], dtype: Any, axis_name: str | None) -> Array:
    """U(0, 1) draws; with `axis_name`, this device's rows of one draw for the global batch.

    Drawing for the global batch makes the noise of an example depend on its position in
    the global batch only, so a run gives the same gates on any number of devices.
    """
    draw = functools.partial(jax.random.uniform, dtype=dtype, minval=1e-12, maxval=1.0)
    if axis_name is None:
        return draw(rng, shape)
    local = shape[0]
    noise = draw(rng, (local * jax.lax.axis_size(axis_name),) + tuple(shape[1:]))
    return jax.lax.dynamic_slice_in_dim(noise, jax.lax.axis_index(axis_name) * local, local)


def straight_through_gumbel_sigmoid(log_alpha: Array, rng: Array, tau: float = DEFAULT_TAU,
                                    axis_name: str | None = None) -> Array:
    """Hard Gumbel-sigmoid sample in {0, 1} with gradient `s(1-s)/tau`, `s = sigmoid(y)`.

    `y = (log_alpha + log u - log(1-u)) / tau` with `u ~ U(0, 1)`; the forward value is
    exactly `1[y > 0]`. Inside `shard_map`, pass the batch axis as `axis_name` so the
    draws do not depend on how the batch is split (`rng` must be the same on every device).
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    u = _uniform_noise(rng, log_alpha.shape, log_alpha.dtype, axis_name)
    logistic = jnp.log(u) - jnp.log1p(-u)
    return _step_with_sigmoid_grad((log_alpha + logistic) / tau)


def deterministic_gate(log_alpha: Array) -> Array:
    """Evaluation gate `1[sigmoid(log_alpha) > 0.5]`, i.e. `1[log_alpha > 0]`."""
    return (log_alpha > 0).astype(log_alpha.dtype)


@flax.struct.dataclass
class GateOutput:
    """What a gated block exposes for losses and cost accounting; all arrays are [batch, channels].

    log_alpha: gate logits (the FGC loss and the gate bank use these).
    prob: `sigmoid(log_alpha)` (L0 and batch-shaping losses use these).
    gate: the hard 0/1 gates that multiplied the channels.
    feature: global-average-pooled pre-gate activation, gradient stopped (feature bank).
    """

    log_alpha: Array
    prob: Array
    gate: Array
    feature: Array


class GateNetwork(nn.Module):
    """Gate logits from a block input: GAP -> dense(16, no bias) -> BN -> ReLU -> dense(+bias).

    The two dense layers are the reference's 1x1 convolutions on the pooled input.
    `batch_norm_axis_name`: mesh axis over which BN statistics are averaged in training.
    """

    features: int
    hidden: int = 16
    batch_norm_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool, mask: Array | None = None) -> Array:
        """Gate logits [batch, features] in float32; `mask` [batch] marks real examples (BN)."""
        pooled = jnp.mean(x, axis=(1, 2))
        h = nn.Dense(self.hidden, use_bias=False, kernel_init=kaiming_normal, dtype=self.dtype,
                     name="fc1")(pooled)
        h = BatchNorm(use_running_average=not train,
                      axis_name=self.batch_norm_axis_name if train else None,
                      dtype=self.dtype, name="bn")(h, mask)
        h = nn.relu(h)
        log_alpha = nn.Dense(self.features, kernel_init=kaiming_normal,
                             bias_init=torch_bias_init(self.hidden), dtype=self.dtype,
                             name="fc2")(h)
        return log_alpha.astype(jnp.float32)


class ChannelGate(nn.Module):
    """Gate network plus the binary decision: returns hard gates and their probabilities.

    Training draws Gumbel noise from the `'gate'` RNG stream, so `apply` needs
    `rngs={'gate': key}` when `train=True`. Under `shard_map`, `data_axis_name` names the
    batch axis (noise drawn for the global batch) and `sync_batch_norm` averages the gate
    BN statistics over it.
    """

    features: int
    hidden: int = 16
    tau: float = DEFAULT_TAU
    data_axis_name: str | None = None
    sync_batch_norm: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool, mask: Array | None = None) -> tuple[Array, Array, Array]:
        """Returns `(log_alpha, prob, gate)`, each [batch, features] in float32.

        `mask` [batch] marks the real examples of a padded batch: padding does not enter
        the gate network's BatchNorm statistics.
        """
        bn_axis = self.data_axis_name if self.sync_batch_norm else None
        log_alpha = GateNetwork(self.features, self.hidden, bn_axis, self.dtype, name="mlp")(
            x, train, mask)
        if train:
            gate = straight_through_gumbel_sigmoid(log_alpha, self.make_rng(GATE_RNG), self.tau,
                                                   self.data_axis_name)
        else:
            gate = deterministic_gate(log_alpha)
        return log_alpha, jax.nn.sigmoid(log_alpha), gate
