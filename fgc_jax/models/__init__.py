"""Gated ResNets and the factory that builds one from `config.model`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import jax.numpy as jnp

from fgc_jax.models.resnet import (CIFAR_DEPTHS, IMAGENET_STAGE_SIZES, GatedBasicBlock,
                                   GatedResNet, cifar_resnet, imagenet_resnet)

if TYPE_CHECKING:
    import ml_collections

ARCHITECTURES = {"cifar_resnet": cifar_resnet, "imagenet_resnet": imagenet_resnet}
COMPUTE_DTYPES = ("float32", "bfloat16")  # activations; parameters stay float32


def create_model(model_config: ml_collections.ConfigDict, num_classes: int, *,
                 compute_dtype: str = "float32", data_axis_name: str | None = None,
                 sync_batch_norm: bool = True, materialise_conv_inputs: bool = False) -> GatedResNet:
    """Builds the network that `config.model` names (arch, depth, gated, gate_hidden, tau).

    `data_axis_name`: the mesh axis of the batch when the model runs inside `shard_map`;
    `materialise_conv_inputs`: see `GatedBasicBlock` (an XLA:CPU speed-up).
    """
    if model_config.arch not in ARCHITECTURES:
        raise ValueError(f"model.arch={model_config.arch!r} is unknown; choose one of {tuple(ARCHITECTURES)}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype!r} is unknown; choose one of {tuple(COMPUTE_DTYPES)}")
    if model_config.tau <= 0:
        raise ValueError(f"model.tau must be positive, got {model_config.tau}")
    kwargs: dict[str, Any] = dict(gated=model_config.gated, gate_hidden=model_config.gate_hidden,
                                  tau=model_config.tau, data_axis_name=data_axis_name,
                                  sync_batch_norm=sync_batch_norm,
                                  dtype=jnp.dtype(compute_dtype),
                                  materialise_conv_inputs=materialise_conv_inputs)
    return ARCHITECTURES[model_config.arch](model_config.depth, num_classes, **kwargs)


def resolve_blocks(blocks: Sequence[int], num_blocks: int) -> list[int]:
    """Block indices with negative ones counted from the end (as `config.fgc.blocks`)."""
    out = []
    for b in blocks:
        if not -num_blocks <= b < num_blocks:
            raise ValueError(f"fgc.blocks names block {b}, but the model has {num_blocks} gated blocks "
                             f"(valid: {-num_blocks}..{num_blocks - 1})")
        out.append(b % num_blocks)
    return sorted(set(out))


__all__ = ["ARCHITECTURES", "CIFAR_DEPTHS", "IMAGENET_STAGE_SIZES", "GatedBasicBlock", "GatedResNet",
           "cifar_resnet", "create_model", "imagenet_resnet", "resolve_blocks"]
