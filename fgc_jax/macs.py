"""Cost accounting of gated ResNets (FGC_SPEC §4): dense MACs, gate MACs, dynamic MACs.

The layer list is read off the Flax model itself: one abstract (`jax.eval_shape`)
eval-mode initialisation under `flax.linen.intercept_methods` records every `nn.Conv`
and `nn.Dense` call with its module path and shapes, so the accounting cannot drift
from the architecture. Layers are classified as

  stem      convolutions outside any block (counted densely)
  conv1/2   the two convolutions of a block (scaled by the block's gate density d_b
            when the block is gated)
  shortcut  other convolutions inside a block (ImageNet 1x1 downsample: counted densely)
  gate      dense layers inside a `ChannelGate` (counted, never gated)
  head      any other dense layer (the classifier; reported, not counted)

Spec §4: dense MACs = stem + every block conv (+ shortcut convs); the dynamic cost of
one example is `dense - sum_b block_b + gates + sum_b d_b * block_b`, with `d_b` the
fraction of block b's gates that are on; pruning ratio = `1 - mean MACs / dense MACs`.

The command-line table: `python -m fgc_jax.cost --config=configs/resnet20_cifar.py [--json]`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from flax import nnx, traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgc_jax.gates import ChannelGate

COUNTED_KINDS = ("stem", "conv1", "conv2", "shortcut", "conv")  # in dense_macs


@dataclasses.dataclass(frozen=True)
class Layer:
    """One convolution or dense layer of the model, per example (batch dimension dropped)."""

    name: str  # module path, e.g. 'layer1_0/conv1'
    kind: str  # 'stem' | 'conv1' | 'conv2' | 'shortcut' | 'conv' | 'gate' | 'head'
    block: int | None  # index of the gated block it belongs to (conv1/conv2/gate), else None
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel: tuple[int, ...]  # spatial kernel size; () for dense layers
    macs: int
    params: int  # kernel (+ bias) of this layer


@dataclasses.dataclass(frozen=True, eq=False)
class CostModel:
    """MAC and parameter counts of one model at one input size (all per example).

    dense_macs: stem + all block convs (+ shortcut convs); no gates, no head.
    gate_macs: the gate networks' dense layers. head_macs: the final dense layer(s).
    params / gate_params: parameter counts (BatchNorm scale/offset included, running
    statistics not); gate_params is everything under a `ChannelGate`.
    block_macs: int64 [num_blocks], conv1 + conv2 MACs of each gated block, in the order
    of the model's `GateOutput`s.
    """

    layers: tuple[Layer, ...]
    dense_macs: int
    gate_macs: int
    head_macs: int
    params: int
    gate_params: int
    block_macs: np.ndarray
    input_shape: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.block_macs)

    @property
    def backbone_params(self) -> int:
        return self.params - self.gate_params

    @property
    def static_macs(self) -> int:
        """MACs every example pays whatever its gates: ungated convs + gate layers."""
        return self.dense_macs - int(self.block_macs.sum()) + self.gate_macs

    @property
    def stem_macs(self) -> int:
        return sum(layer.macs for layer in self.layers if layer.kind == "stem")

    def summary(self) -> dict[str, Any]:
        """The totals as plain Python numbers (what `--json` prints, without the layers)."""
        return {"input_shape": list(self.input_shape), "dense_macs": self.dense_macs,
                "gate_macs": self.gate_macs, "head_macs": self.head_macs,
                "stem_macs": self.stem_macs, "params": self.params,
                "gate_params": self.gate_params, "backbone_params": self.backbone_params,
                "num_gated_blocks": self.num_blocks,
                "block_macs": [int(m) for m in self.block_macs]}


def _path(module: nn.Module) -> tuple[str, ...]:
    return tuple(str(p) for p in module.path)


def _macs_and_params(module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
                     ) -> tuple[int, int, tuple[int, ...]]:
    if isinstance(module, nn.Conv):
        kernel = tuple(int(k) for k in module.kernel_size)
        groups = int(module.feature_group_count)
        c_in, c_out = in_shape[-1], out_shape[-1]
        weights = c_in // groups * c_out * math.prod(kernel)
        macs = weights * math.prod(out_shape[1:-1])
        return macs, weights + (c_out if module.use_bias else 0), kernel
    c_in, c_out = in_shape[-1], out_shape[-1]
    macs = c_in * c_out * math.prod(out_shape[1:-1])  # extra leading dims, if any
    return macs, c_in * c_out + (c_out if module.use_bias else 0), ()


def _linen_module(model: nn.Module | nnx.Module) -> nn.Module:
    """The Linen module to trace: `model` itself, or the module an `nnx.bridge.ToNNX` wraps."""
    if isinstance(model, nnx.bridge.ToNNX):
        return model.to_nnx__module
    if isinstance(model, nn.Module):
        return model
    raise TypeError(f"cost_model traces Linen modules; got {type(model).__name__}. Wrap the Linen model "
                    "in flax.nnx.bridge.ToNNX inside your NNX model and pass that wrapper, or pass the "
                    "Linen module itself.")


def cost_model(model: nn.Module | nnx.Module, input_shape: Sequence[int]) -> CostModel:
    """Traces `model` (abstractly, nothing is computed) and counts its MACs and parameters.

    `model`: a Linen module, or an `nnx.bridge.ToNNX` wrapper of one (its Linen module is
    counted). `input_shape`: one example's HWC shape (a leading batch dimension is accepted
    and ignored). `model(x, train=False)` must return `(logits, gate_outputs)`.
    """
    model = _linen_module(model)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4:
        raise ValueError(f"input_shape must be HWC or NHWC, got {tuple(input_shape)}")
    calls: list[tuple[nn.Module, tuple[int, ...], tuple[int, ...]]] = []
    gate_paths: list[tuple[str, ...]] = []

    def interceptor(f, args, kwargs, context):
        if context.method_name != "__call__":
            return f(*args, **kwargs)
        module = context.module
        if isinstance(module, ChannelGate):
            gate_paths.append(_path(module))
        out = f(*args, **kwargs)
        if isinstance(module, (nn.Conv, nn.Dense)):
            calls.append((module, tuple(args[0].shape), tuple(out.shape)))
        return out

    def init(x):
        with nn.intercept_methods(interceptor):
            return model.init({"params": jax.random.key(0)}, x, train=False)

    variables = jax.eval_shape(init, jax.ShapeDtypeStruct(shape, jnp.float32))
    # Flax may run a module's __call__ more than once (e.g. shape inference); keep the first.
    seen, unique = set(), []
    for module, s_in, s_out in calls:
        if _path(module) not in seen:
            seen.add(_path(module))
            unique.append((module, s_in, s_out))
    gate_paths = list(dict.fromkeys(gate_paths))
    block_paths = [p[:-1] for p in gate_paths]  # gated blocks, in GateOutput order
    block_of = {p: b for b, p in enumerate(block_paths)}

    layers = []
    for module, s_in, s_out in unique:
        path = _path(module)
        macs, params, kernel = _macs_and_params(module, s_in, s_out)
        in_gate = any(path[:len(g)] == g for g in gate_paths)
        parent = path[:-1]
        block = None
        if isinstance(module, nn.Dense):
            kind = "gate" if in_gate else "head"
            if in_gate:
                block = next(b for b, g in enumerate(gate_paths) if path[:len(g)] == g)
        elif in_gate:
            raise ValueError(f"convolution {'/'.join(path)} inside a gate network is not accounted for")
        elif len(parent) == 0:
            kind = "stem"
        elif path[-1] in ("conv1", "conv2"):
            kind = path[-1]
            block = block_of.get(parent)
        else:
            kind = "shortcut" if len(parent) == 1 else "conv"
        layers.append(Layer("/".join(path), kind, block, s_in[1:], s_out[1:], kernel, macs, params))

    block_macs = np.zeros(len(block_paths), np.int64)
    for layer in layers:
        if layer.kind in ("conv1", "conv2") and layer.block is not None:
            block_macs[layer.block] += layer.macs
    for b, p in enumerate(block_paths):
        if block_macs[b] == 0:
            raise ValueError(f"gated block {'/'.join(p)} has no conv1/conv2 to gate")
    block_macs.flags.writeable = False

    def count(tree) -> int:
        return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))

    flat = traverse_util.flatten_dict(variables.get("params", {}))
    params = count(list(flat.values()))
    gate_params = count([v for k, v in flat.items()
                         if any(tuple(k[:len(g)]) == g for g in gate_paths)])
    return CostModel(
        layers=tuple(layers),
        dense_macs=sum(layer.macs for layer in layers if layer.kind in COUNTED_KINDS),
        gate_macs=sum(layer.macs for layer in layers if layer.kind == "gate"),
        head_macs=sum(layer.macs for layer in layers if layer.kind == "head"),
        params=params, gate_params=gate_params, block_macs=block_macs,
        input_shape=shape[1:])


def block_density(gates: Sequence[Any]) -> Any:
    """[batch, num_blocks]: the fraction of each block's gates that are on, per example.

    `gates`: one [batch, channels] array of hard 0/1 gates per gated block (e.g.
    `GateOutput.gate`). NumPy inputs give a float64 NumPy result, otherwise jnp float32.
    """
    if not gates:
        raise ValueError("no gates given")
    if all(isinstance(g, np.ndarray) for g in gates):
        return np.stack([np.mean(np.asarray(g, np.float64), axis=-1) for g in gates], axis=-1)
    return jnp.stack([jnp.mean(jnp.asarray(g, jnp.float32), axis=-1) for g in gates], axis=-1)


def macs_from_density(cost: CostModel, density: Any) -> Any:
    """Per-example MACs from block densities [batch, num_blocks] (NumPy in, float64 out)."""
    if density.shape[-1] != cost.num_blocks:
        raise ValueError(f"densities for {density.shape[-1]} blocks, but the model has "
                         f"{cost.num_blocks} gated blocks")
    if isinstance(density, np.ndarray):
        return cost.static_macs + np.sum(density * cost.block_macs.astype(np.float64), axis=-1)
    # Elementwise product and sum rather than a matmul: no reduced-precision matmul passes.
    return cost.static_macs + jnp.sum(density * jnp.asarray(cost.block_macs, jnp.float32), axis=-1)


def dynamic_macs(cost: CostModel, gates: Sequence[Any]) -> Any:
    """Per-example MACs [batch] (spec §4) from each gated block's hard gates [batch, C_b].

    `dense - sum_b block_b + gate_macs + sum_b d_b * block_b`. Works under `jit`
    (jnp float32, relative error ~1e-7); NumPy gates give an exact float64 result.
    An ungated model (no blocks) costs `dense_macs` for every example: pass `gates=()`
    with a batch size through `static_cost` instead.
    """
    if len(gates) != cost.num_blocks:
        raise ValueError(f"{len(gates)} gate arrays for a model with {cost.num_blocks} gated blocks")
    return macs_from_density(cost, block_density(gates))


def pruning_ratio(cost: CostModel, mean_macs: float) -> float:
    """`1 - mean_macs / dense_macs` (spec §4; gate MACs are in mean_macs, not in dense)."""
    return 1.0 - float(mean_macs) / cost.dense_macs


def format_table(cost: CostModel, title: str = "") -> str:
    """A per-layer table (name, kind, block, in/out shape, kernel, MACs, params) and totals."""
    rows = [("layer", "kind", "block", "input", "output", "kernel", "MACs", "params")]
    for layer in cost.layers:
        rows.append((layer.name, layer.kind, "" if layer.block is None else str(layer.block),
                     "x".join(map(str, layer.in_shape)), "x".join(map(str, layer.out_shape)),
                     "x".join(map(str, layer.kernel)) or "-", f"{layer.macs:,}", f"{layer.params:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {6, 7}
    lines = [title] if title else []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if n == 0:
            lines.append("-" * len(lines[-1]))
    total = cost.dense_macs + cost.gate_macs
    lines += [
        "",
        f"dense MACs (stem + block convs{' + shortcuts' if any(l.kind == 'shortcut' for l in cost.layers) else ''}):"
        f" {cost.dense_macs:,}",
        f"gate MACs:        {cost.gate_macs:,}",
        f"head MACs:        {cost.head_macs:,} (final dense; not counted)",
        f"dense + gates:    {total:,}  (all gates on)",
        f"static MACs:      {cost.static_macs:,}  (all gates off: ungated convs + gate layers)",
        f"params:           {cost.params:,}  (backbone {cost.backbone_params:,} + gates {cost.gate_params:,})",
        f"gated blocks:     {cost.num_blocks}",
    ]
    return "\n".join(lines)
