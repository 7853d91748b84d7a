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
and `fgc_jax.torch_import`; importing the package loads none of them.
"""
__version__ = "0.1.0"

from fgc_jax.batch_norm import BatchNorm
from fgc_jax.gates import ChannelGate, GateOutput, deterministic_gate, straight_through_gumbel_sigmoid
from fgc_jax.losses import batch_shaping_loss, fgc_contrastive_loss, l0_loss
from fgc_jax.macs import cost_model, dynamic_macs
from fgc_jax.memory_bank import init_bank, nearest_neighbours, update_bank
from fgc_jax.models import GatedBasicBlock, GatedResNet, cifar_resnet, imagenet_resnet

__all__ = [
    "__version__", "BatchNorm", "ChannelGate", "GateOutput", "GatedBasicBlock", "GatedResNet",
    "batch_shaping_loss", "cifar_resnet", "cost_model", "deterministic_gate", "dynamic_macs", "fgc_contrastive_loss", "imagenet_resnet",
    "init_bank", "l0_loss", "nearest_neighbours", "straight_through_gumbel_sigmoid", "update_bank",
]
