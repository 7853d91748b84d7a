"""Inference that skips the channels a gate turns off, and the statically slimmed network.

The masked evaluation model (`GatedResNet(train=False)`) computes every channel of a gated
block's first convolution and multiplies the gated-off ones by zero, so it saves nothing.
The programs here compute only what the gates keep:

- `skipping_program`: in every gated block the gate runs first (its input is the block
  input, FGC_SPEC §1); then conv1 computes only the active output channels and conv2
  reads only those input channels. Active channels are moved to the front (a stable
  `argsort`), their count is rounded up to one of a few static widths ("buckets"), the
  weights of the first `width` channels are gathered and `lax.switch` picks the branch
  compiled for that width. For a batch, the active set is the union over its examples;
  each example's own gates still zero the channels it turned off, so every example's
  result is the masked model's.
- `slimmed_program`: channels off for every example of a calibration set are removed from
  the weights altogether: a smaller dense network with no gates at all.

Both fold every BatchNorm into the convolution before it (in float64, rounded once to
float32), which changes the rounding of the logits by float32 noise, not their value.
The gate networks are computed exactly as the model computes them. Programs are pure
functions `program(params, images) -> (logits, gates)` over a params pytree; `bind`
closes them over their params and `export_program` serialises one with `jax.export`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from fgc_jax import storage

Array = jax.Array
Params = dict[str, Any]

BN_EPSILON = 1e-5  # fgc_jax.batch_norm.BatchNorm's (PyTorch's) default
DEFAULT_BUCKETS = 8  # static widths per gated block: C/8, 2C/8, ..., C (and 0)
EXPORT_FILE = "program.jax_exported"
EXPORT_META = "program.json"


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Static shape facts of one BasicBlock: its width, stride and shortcut."""

    name: str  # e.g. 'layer2_0'
    planes: int
    stride: int
    shortcut: str  # 'identity' | 'A' (subsample + zero-pad) | 'B' (1x1 conv + BN)
    gated: bool


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What a program needs to know about a `GatedResNet` beyond its weights."""

    stem: str  # 'cifar' | 'imagenet'
    blocks: tuple[BlockSpec, ...]

    @classmethod
    def of(cls, model: Any) -> "Architecture":
        """Reads stem, stage sizes/planes and shortcut off a `fgc_jax.models.GatedResNet`."""
        blocks = []
        in_planes = model.stage_planes[0] if model.stem == "cifar" else 64
        for stage, (num, planes) in enumerate(zip(model.stage_sizes, model.stage_planes)):
            for j in range(num):
                stride = 2 if stage > 0 and j == 0 else 1
                changes = stride != 1 or in_planes != planes
                blocks.append(BlockSpec(f"layer{stage + 1}_{j}", planes, stride,
                                        model.shortcut if changes else "identity", model.gated))
                in_planes = planes
        return cls(model.stem, tuple(blocks))


# --- BatchNorm folding (float64, rounded once) ----------------------------------------------


def _fold(kernel: Any, params: Mapping[str, Any], stats: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """`conv(x, k)` then eval BatchNorm == `conv(x, k * s) + b`: returns (k * s, b) in float32."""
    inv = np.asarray(params["scale"], np.float64) / np.sqrt(np.asarray(stats["var"], np.float64) + BN_EPSILON)
    bias = np.asarray(params["bias"], np.float64) - np.asarray(stats["mean"], np.float64) * inv
    return (np.asarray(kernel, np.float64) * inv).astype(np.float32), bias.astype(np.float32)


def fold_variables(arch: Architecture, variables: Mapping[str, Any]) -> Params:
    """The program params of a gated (or dense) ResNet's variables, BatchNorm folded.

    Per block: `w1`, `w2` [kh, kw, C_in, C_out] (HWIO: inside `lax.switch`'s branches
    XLA:CPU runs other kernel layouts through a generic convolution several times slower),
    `b1`, `b2`, optional `wd`/`bd` (1x1 shortcut) and the gate network's variables as the
    model holds them (`gate`).
    """
    p, s = variables["params"], variables["batch_stats"]
    out: Params = {}
    k, b = _fold(p["conv1"]["kernel"], p["bn1"], s["bn1"])
    out["stem"] = {"w": k, "b": b}
    for blk in arch.blocks:
        pb, sb = p[blk.name], s[blk.name]
        w1, b1 = _fold(pb["conv1"]["kernel"], pb["bn1"], sb["bn1"])
        w2, b2 = _fold(pb["conv2"]["kernel"], pb["bn2"], sb["bn2"])
        block: Params = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
        if blk.shortcut == "B":
            block["wd"], block["bd"] = _fold(pb["downsample_conv"]["kernel"], pb["downsample_bn"],
                                             sb["downsample_bn"])
        if blk.gated:
            mlp, mlp_stats = pb["gate"]["mlp"], sb["gate"]["mlp"]
            block["gate"] = {"fc1": np.asarray(mlp["fc1"]["kernel"], np.float32),
                             "bn_scale": np.asarray(mlp["bn"]["scale"], np.float32),
                             "bn_bias": np.asarray(mlp["bn"]["bias"], np.float32),
                             "bn_mean": np.asarray(mlp_stats["bn"]["mean"], np.float32),
                             "bn_var": np.asarray(mlp_stats["bn"]["var"], np.float32),
                             "fc2": np.asarray(mlp["fc2"]["kernel"], np.float32),
                             "fc2_bias": np.asarray(mlp["fc2"]["bias"], np.float32)}
        out[blk.name] = block
    out["head"] = {"w": np.asarray(p["linear"]["kernel"], np.float32),
                   "b": np.asarray(p["linear"]["bias"], np.float32)}
    return out


# --- The pieces of a forward pass ----------------------------------------------------------


def _conv(x: Array, w: Array, stride: int) -> Array:
    pad = (w.shape[0] - 1) // 2  # symmetric, as PyTorch (and the model)
    return lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def gate_logits(x: Array, g: Mapping[str, Array]) -> Array:
    """The gate network on a block input, as `fgc_jax.gates.GateNetwork` computes it (eval)."""
    h = jnp.mean(x, axis=(1, 2)) @ g["fc1"]
    h = (h - g["bn_mean"]) * (lax.rsqrt(g["bn_var"] + BN_EPSILON) * g["bn_scale"]) + g["bn_bias"]
    return jnp.maximum(h, 0.0) @ g["fc2"] + g["fc2_bias"]


def _stem(arch: Architecture, p: Params, x: Array) -> Array:
    x = _conv(x, p["stem"]["w"], 1 if arch.stem == "cifar" else 2) + p["stem"]["b"]
    x = jnp.maximum(x, 0.0)
    if arch.stem == "imagenet":
        x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                              ((0, 0), (1, 1), (1, 1), (0, 0)))
    return x


def _residual(blk: BlockSpec, p: Params, x: Array) -> Array:
    if blk.shortcut == "A":
        pad = blk.planes // 4
        return jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (pad, pad)))
    if blk.shortcut == "B":
        return _conv(x, p["wd"], blk.stride) + p["bd"]
    return x


def _two_convs(blk: BlockSpec, x: Array, w1: Array, b1: Array, w2: Array, b2: Array,
               mask: Array | None) -> Array:
    """conv1 (+folded BN, ReLU, optional per-example 0/1 `mask`) then conv2 (+folded BN)."""
    if w1.shape[-1] == 0:  # no channel at all: conv2 of zeros is its bias
        out_hw = ((x.shape[1] - 1) // blk.stride + 1, (x.shape[2] - 1) // blk.stride + 1)  # 3x3, pad 1
        return jnp.broadcast_to(b2, (x.shape[0], *out_hw, b2.shape[0]))
    h = jnp.maximum(_conv(x, w1, blk.stride) + b1, 0.0)
    if mask is not None:
        h = h * mask[:, None, None, :]
    return _conv(h, w2, 1) + b2


def bucket_widths(channels: int, buckets: int) -> tuple[int, ...]:
    """0 and the static widths ceil(C * j / buckets), j = 1..buckets, ascending."""
    return tuple(sorted({0, *(math.ceil(channels * j / buckets) for j in range(1, buckets + 1))}))


def _skipping_block(blk: BlockSpec, p: Params, x: Array, widths: tuple[int, ...]
                    ) -> tuple[Array, Array]:
    gate = (gate_logits(x, p["gate"]) > 0).astype(x.dtype)  # [B, C], as deterministic_gate
    active = jnp.any(gate > 0, axis=0)
    order = jnp.argsort(~active, stable=True)  # active channels first
    bucket = jnp.searchsorted(jnp.asarray(widths), jnp.sum(active), side="left")

    def branch(width: int) -> Callable[[Array], Array]:
        def run(x: Array) -> Array:
            if width == blk.planes:  # every channel: no gather, the gates mask in place
                return _two_convs(blk, x, p["w1"], p["b1"], p["w2"], p["b2"], gate)
            idx = order[:width]
            return _two_convs(blk, x, jnp.take(p["w1"], idx, axis=3), p["b1"][idx],
                              jnp.take(p["w2"], idx, axis=2), p["b2"], jnp.take(gate, idx, axis=1))
        return run

    h = lax.switch(bucket, [branch(w) for w in widths], x)
    return jnp.maximum(h + _residual(blk, p, x), 0.0), gate


def _head(p: Params, x: Array) -> Array:
    return jnp.mean(x, axis=(1, 2)) @ p["head"]["w"] + p["head"]["b"]


def skipping_program(arch: Architecture, buckets: int = DEFAULT_BUCKETS
                     ) -> Callable[[Params, Array], tuple[Array, tuple[Array, ...]]]:
    """`program(params, images) -> (logits, gates)` computing only the active channels.

    `params`: `fold_variables`'s. `gates`: one [batch, C] 0/1 float32 array per gated
    block, the masked model's `GateOutput.gate`. `buckets`: static widths per block
    (more: closer to the active count, more code to compile).
    """
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")

    def program(params: Params, images: Array) -> tuple[Array, tuple[Array, ...]]:
        x = _stem(arch, params, images.astype(jnp.float32))
        gates = []
        for blk in arch.blocks:
            p = params[blk.name]
            if blk.gated:
                x, gate = _skipping_block(blk, p, x, bucket_widths(blk.planes, buckets))
                gates.append(gate)
            else:
                h = _two_convs(blk, x, p["w1"], p["b1"], p["w2"], p["b2"], None)
                x = jnp.maximum(h + _residual(blk, p, x), 0.0)
        return _head(params, x), tuple(gates)

    return program


def dense_program(arch: Architecture) -> Callable[[Params, Array], tuple[Array, tuple[Array, ...]]]:
    """`program(params, images) -> (logits, ())`: every block's convs at the params' widths, no gates.

    With `slim_params`' params it is the slimmed network; with `fold_variables`' params of
    an ungated model, the dense network with BatchNorm folded.
    """
    def program(params: Params, images: Array) -> tuple[Array, tuple[Array, ...]]:
        x = _stem(arch, params, images.astype(jnp.float32))
        for blk in arch.blocks:
            p = params[blk.name]
            h = _two_convs(blk, x, p["w1"], p["b1"], p["w2"], p["b2"], None)
            x = jnp.maximum(h + _residual(blk, p, x), 0.0)
        return _head(params, x), ()

    return program


# --- Static slimming -------------------------------------------------------------------------


def ever_active(program: Callable, params: Params, batches: Any) -> list[np.ndarray]:
    """Per gated block, a [C] bool: the channel's gate was on for some example of `batches`.

    `batches` yields (images, mask) pairs; masked-out (padding) rows are ignored.
    """
    run = jax.jit(program)
    seen: list[np.ndarray] | None = None
    for images, mask in batches:
        _, gates = run(params, images)
        keep = np.asarray(mask, bool)
        on = [np.any(np.asarray(g)[keep] > 0, axis=0) for g in gates]
        seen = on if seen is None else [a | b for a, b in zip(seen, on)]
    if seen is None:
        raise ValueError("the calibration set is empty")
    return seen


def slim_params(arch: Architecture, params: Params, keep: Sequence[np.ndarray]) -> Params:
    """`params` with, in each gated block, only the channels `keep` marks (gate networks dropped)."""
    gated = [blk for blk in arch.blocks if blk.gated]
    if len(keep) != len(gated):
        raise ValueError(f"{len(keep)} keep masks for {len(gated)} gated blocks")
    out = dict(params)
    for blk, k in zip(gated, keep):
        p = dict(params[blk.name])
        idx = np.flatnonzero(np.asarray(k))
        p["w1"], p["b1"], p["w2"] = (np.asarray(p["w1"])[..., idx], np.asarray(p["b1"])[idx],
                                     np.asarray(p["w2"])[:, :, idx])
        p.pop("gate")
        out[blk.name] = p
    return out


# --- Export ------------------------------------------------------------------------------------


def export_program(program: Callable, params: Params, input_shape: Sequence[int], directory: str,
                   dtype: Any = jnp.float32) -> str:
    """Serialises `images -> (logits, gates)` for `input_shape` (NHWC) with `jax.export`.

    The params are baked in as constants; the StableHLO module goes to `directory/
    program.jax_exported`, a description of its input to `program.json`. Reload with
    `load_exported` (or `jax.export.deserialize` alone: no fgc_jax needed). Returns the path.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 4:
        raise ValueError(f"input_shape must be NHWC, got {shape}")
    consts = jax.tree.map(jnp.asarray, params)
    exported = jax.export.export(jax.jit(lambda images: program(consts, images)))(
        jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))
    out = storage.path(directory)
    out.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(out / EXPORT_FILE, bytes(exported.serialize()))
    storage.write_text(out / EXPORT_META, json.dumps(
        {"input_shape": list(shape), "dtype": jnp.dtype(dtype).name,
         "outputs": "(logits [batch, classes], tuple of [batch, C_b] 0/1 gates per gated block)"}, indent=2))
    return os.fspath(out / EXPORT_FILE)


def load_exported(directory: str) -> Callable[[Any], Any]:
    """The exported program as a function of images; a wrong shape or dtype is a ValueError naming both."""
    exported = jax.export.deserialize(bytearray((storage.path(directory) / EXPORT_FILE).read_bytes()))
    (expected,) = exported.in_avals

    def call(images: Any) -> Any:
        shape, dtype = tuple(np.shape(images)), jnp.result_type(images)
        if shape != tuple(expected.shape) or dtype != expected.dtype:
            raise ValueError(
                f"the exported program was built for {expected.dtype.name}{list(expected.shape)} images "
                f"(batch, height, width, channels), got {jnp.dtype(dtype).name}{list(shape)}; export it "
                "again for this batch size, image size or dtype")
        return exported.call(images)

    return call


def bind(program: Callable, params: Params) -> Callable[[Array], Any]:
    """`jit(images -> program(params, images))` with `params` on the device once."""
    device_params = jax.tree.map(jnp.asarray, params)
    jitted = jax.jit(program)
    return functools.partial(jitted, device_params)
