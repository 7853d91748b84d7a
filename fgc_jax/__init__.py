"""fgc_jax: feature-gate coupling (FGC) dynamic network pruning in JAX/Flax.

What another Flax project needs to gate its own blocks and train the gates with FGC:

- `ChannelGate`: a per-example channel gate (gate network + straight-through binary
  decision) to put after a block's first convolution; `GateOutput` bundles what a block
  exposes (logits, probabilities, hard gates, pooled pre-gate feature).
- `GatedBasicBlock`, `GatedResNet`, `cifar_resnet`, `imagenet_resnet`: ready models.
- `BatchNorm`: PyTorch's BatchNorm (two-pass variance, unbiased running variance) with a
  mask for padded batches, in Flax's variable layout.
- Losses: `l0_loss`, `batch_shaping_loss`, `fgc_contrastive_loss`.
- Memory banks: `init_bank`, `update_bank`, `nearest_neighbours` (each also works on a
  row shard inside `jax.shard_map` when given `axis_name`).
- Cost accounting: `cost_model`, `dynamic_macs`.

Training, evaluation and checkpoint import live in `fgc_jax.train`, `fgc_jax.evaluation`
and `fgc_jax.torch_import`; importing the package loads none of them. The names above are
loaded on first use (PEP 562), so `import fgc_jax` (and so every `python -m fgc_jax.*`
command's first line) imports neither JAX nor Flax until one is needed.
"""
__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it.
_EXPORTS = {
    "BatchNorm": "fgc_jax.batch_norm",
    "ChannelGate": "fgc_jax.gates", "GateOutput": "fgc_jax.gates",
    "deterministic_gate": "fgc_jax.gates", "straight_through_gumbel_sigmoid": "fgc_jax.gates",
    "batch_shaping_loss": "fgc_jax.losses", "fgc_contrastive_loss": "fgc_jax.losses",
    "l0_loss": "fgc_jax.losses",
    "cost_model": "fgc_jax.macs", "dynamic_macs": "fgc_jax.macs",
    "init_bank": "fgc_jax.memory_bank", "nearest_neighbours": "fgc_jax.memory_bank",
    "update_bank": "fgc_jax.memory_bank",
    "GatedBasicBlock": "fgc_jax.models", "GatedResNet": "fgc_jax.models",
    "cifar_resnet": "fgc_jax.models", "imagenet_resnet": "fgc_jax.models",
}
__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:  # what type checkers and IDEs see
    from fgc_jax.batch_norm import BatchNorm
    from fgc_jax.gates import ChannelGate, GateOutput, deterministic_gate, straight_through_gumbel_sigmoid
    from fgc_jax.losses import batch_shaping_loss, fgc_contrastive_loss, l0_loss
    from fgc_jax.macs import cost_model, dynamic_macs
    from fgc_jax.memory_bank import init_bank, nearest_neighbours, update_bank
    from fgc_jax.models import GatedBasicBlock, GatedResNet, cifar_resnet, imagenet_resnet


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fgc_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
