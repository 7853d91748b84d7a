"""Gated ResNets: CIFAR ResNet-(6n+2) with option-A shortcuts, ImageNet ResNet-18/34 (spec §1).

Layout is NHWC. Module names mirror the reference PyTorch state_dict (`conv1`, `bn1`,
`layer1_0/conv1`, `layer1_0/gate/mlp/fc1`, `linear`, ...) so checkpoints map one to one.
Every model returns `(logits, gate_outputs)` where `gate_outputs` holds one
`GateOutput` per block, in network order (empty for the ungated dense baseline).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgc_jax.batch_norm import BatchNorm
from fgc_jax.gates import DEFAULT_TAU, ChannelGate, GateOutput, kaiming_normal, torch_bias_init

Array = jax.Array

CIFAR_DEPTHS = (20, 32, 44, 56, 110)  # the published ones; any 6n+2 (n >= 1) builds
IMAGENET_STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def _batch_norm(train: bool, axis_name: str | None, dtype: Any, name: str) -> BatchNorm:
    # PyTorch BatchNorm: eps 1e-5, running = 0.9 * running + 0.1 * unbiased batch statistics.
    return BatchNorm(use_running_average=not train, axis_name=axis_name if train else None,
                     dtype=dtype, name=name)


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    # Symmetric padding as in PyTorch (Flax 'SAME' pads asymmetrically for stride 2).
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, kernel_init=kaiming_normal, dtype=dtype, name=name)


@jax.custom_vjp
def _materialise(x: Array) -> Array:
    """Identity (exact for finite values) that XLA computes into a buffer of its own.

    `x @ I` over the channels: a dot is never fused into its consumers, so the backward
    pass reads `x` from memory instead of recomputing it. Without it, XLA:CPU fuses the
    element-wise chain that produces a convolution's input (BN/ReLU/residual adds reaching
    back over the previous blocks for a block input; BN, ReLU and the gate's noise, logits
    and step for the gated input of conv2) into the [N,H,W,C] -> [C,H,W,N] transpose that
    the convolution's weight gradient needs, and evaluates that chain in transposed,
    cache-hostile order. The gradient passes through unchanged.
    """
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    return jnp.einsum("...c,cd->...d", x, eye, precision=jax.lax.Precision.HIGHEST)


_materialise.defvjp(lambda x: (_materialise(x), None), lambda _, g: (g,))


class GatedBasicBlock(nn.Module):
    """ResNet BasicBlock whose first conv's output channels are switched by a `ChannelGate`.

    shortcut: 'A' (CIFAR: subsample by 2 and zero-pad channels) or 'B' (1x1 conv + BN),
    used only when the shape changes. With `gated=False` it is the plain BasicBlock.
    data_axis_name: the batch's mesh axis when run inside `shard_map` (gate noise is drawn
    for the global batch; with `sync_batch_norm`, BN statistics are global too).
    materialise_conv_inputs: in float32 training, compute each convolution's input into a
    buffer of its own (an exact identity; a speed-up on XLA:CPU only, where the trainer turns
    it on: `fgc_jax/cpu_workarounds.py`). Results are the same either way.
    Returns `(output, GateOutput or None)`.
    """

    planes: int
    stride: int = 1
    shortcut: str = "A"
    gated: bool = True
    gate_hidden: int = 16
    tau: float = DEFAULT_TAU
    data_axis_name: str | None = None
    sync_batch_norm: bool = True
    dtype: Any = jnp.float32
    materialise_conv_inputs: bool = False

    @nn.compact
    def __call__(self, x: Array, train: bool, mask: Array | None = None
                 ) -> tuple[Array, GateOutput | None]:
        """`mask` [batch] marks the real examples of a padded batch (BatchNorm statistics)."""
        # bfloat16 compute does not need it: XLA:CPU does not duplicate the f32 -> bf16
        # converts that end such chains.
        materialise = self.materialise_conv_inputs and train and x.dtype == jnp.float32
        if materialise:
            x = _materialise(x)
        bn_axis = self.data_axis_name if self.sync_batch_norm else None
        bn = functools.partial(_batch_norm, train, bn_axis, self.dtype)
        h = nn.relu(bn("bn1")(_conv(self.planes, 3, self.stride, self.dtype, "conv1")(x), mask))
        info = None
        if self.gated:
            log_alpha, prob, gate = ChannelGate(
                features=self.planes, hidden=self.gate_hidden, tau=self.tau,
                data_axis_name=self.data_axis_name, sync_batch_norm=self.sync_batch_norm,
                dtype=self.dtype, name="gate")(x, train, mask)
            feature = jax.lax.stop_gradient(jnp.mean(h.astype(jnp.float32), axis=(1, 2)))
            info = GateOutput(log_alpha=log_alpha, prob=prob, gate=gate, feature=feature)
            h = h * gate[:, None, None, :].astype(h.dtype)
            if materialise:
                h = _materialise(h)
        h = bn("bn2")(_conv(self.planes, 3, 1, self.dtype, "conv2")(h), mask)

        residual = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            if self.shortcut == "A":
                pad = self.planes // 4
                residual = jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (pad, pad)))
            else:
                residual = bn("downsample_bn")(
                    _conv(self.planes, 1, self.stride, self.dtype, "downsample_conv")(x), mask)
        return nn.relu(h + residual.astype(h.dtype)), info


class GatedResNet(nn.Module):
    """A ResNet of gated BasicBlocks; see `cifar_resnet` and `imagenet_resnet` for the presets.

    stem: 'cifar' (3x3 conv, stride 1) or 'imagenet' (7x7 conv stride 2 + 3x3 max-pool).
    data_axis_name / sync_batch_norm / materialise_conv_inputs: as in `GatedBasicBlock`.
    """

    stage_sizes: Sequence[int]
    stage_planes: Sequence[int]
    num_classes: int
    stem: str = "cifar"
    shortcut: str = "A"
    gated: bool = True
    gate_hidden: int = 16
    tau: float = DEFAULT_TAU
    data_axis_name: str | None = None
    sync_batch_norm: bool = True
    dtype: Any = jnp.float32
    materialise_conv_inputs: bool = False

    @nn.compact
    def __call__(self, x: Array, train: bool, mask: Array | None = None
                 ) -> tuple[Array, tuple[GateOutput, ...]]:
        """Logits and one `GateOutput` per gated block for images `x` [batch, H, W, C].

        `mask` [batch] (training only) marks the real examples of a batch padded to a
        static shape: BatchNorm statistics are those of the real examples alone.
        """
        x = x.astype(self.dtype)
        if self.stem == "cifar":
            x = _conv(self.stage_planes[0], 3, 1, self.dtype, "conv1")(x)
        else:
            x = _conv(64, 7, 2, self.dtype, "conv1")(x)
        bn_axis = self.data_axis_name if self.sync_batch_norm else None
        x = nn.relu(_batch_norm(train, bn_axis, self.dtype, "bn1")(x, mask))
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        gate_outputs = []
        for stage, (num_blocks, planes) in enumerate(zip(self.stage_sizes, self.stage_planes)):
            for j in range(num_blocks):
                stride = 2 if stage > 0 and j == 0 else 1
                x, info = GatedBasicBlock(
                    planes=planes, stride=stride, shortcut=self.shortcut, gated=self.gated,
                    gate_hidden=self.gate_hidden, tau=self.tau, data_axis_name=self.data_axis_name,
                    sync_batch_norm=self.sync_batch_norm, dtype=self.dtype,
                    materialise_conv_inputs=self.materialise_conv_inputs,
                    name=f"layer{stage + 1}_{j}")(x, train, mask)
                if info is not None:
                    gate_outputs.append(info)

        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        logits = nn.Dense(self.num_classes, kernel_init=kaiming_normal,
                          bias_init=torch_bias_init(x.shape[-1]), name="linear")(x)
        return logits, tuple(gate_outputs)


def cifar_resnet(depth: int, num_classes: int = 10, **kwargs: Any) -> GatedResNet:
    """Gated CIFAR ResNet-`depth` (6n+2): stages of n blocks with 16/32/64 planes, option-A shortcut."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"model.depth={depth} is not a CIFAR ResNet depth (6n+2, n >= 1), "
                         f"e.g. one of {CIFAR_DEPTHS}")
    n = (depth - 2) // 6
    return GatedResNet(stage_sizes=(n, n, n), stage_planes=(16, 32, 64), num_classes=num_classes,
                       stem="cifar", shortcut="A", **kwargs)


def imagenet_resnet(depth: int, num_classes: int = 1000, **kwargs: Any) -> GatedResNet:
    """Gated ImageNet ResNet-18/34: 7x7 stem + max-pool, 64..512 planes, 1x1-conv shortcut."""
    if depth not in IMAGENET_STAGE_SIZES:
        raise ValueError(f"model.depth={depth} is not an ImageNet BasicBlock ResNet depth; "
                         f"choose one of {tuple(IMAGENET_STAGE_SIZES)}")
    return GatedResNet(stage_sizes=IMAGENET_STAGE_SIZES[depth], stage_planes=(64, 128, 256, 512),
                       num_classes=num_classes, stem="imagenet", shortcut="B", **kwargs)
