"""Human-readable names of our models: from a config, or guessed from a checkpoint's variables.

Error messages about mismatched checkpoints name both sides with these.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

if TYPE_CHECKING:
    import ml_collections


def model_name(config: ml_collections.ConfigDict) -> str:
    """E.g. 'gated CIFAR ResNet-20 on cifar10'."""
    gated = "gated " if config.model.gated else ""
    family = "CIFAR" if config.model.arch == "cifar_resnet" else "ImageNet"
    return f"{gated}{family} ResNet-{config.model.depth} on {config.dataset}"


def _describe(num_blocks: int, gated: bool, stem_kernel: int | None, num_classes: int | None) -> str:
    family = "ImageNet" if stem_kernel == 7 else "CIFAR"
    depth = 2 * num_blocks + 2  # BasicBlock ResNets: 2 convs a block + stem + classifier
    text = f"{'gated' if gated else 'ungated'} {family} ResNet-{depth} ({num_blocks} blocks"
    return text + (f", {num_classes} classes)" if num_classes else ")")


def describe_flax_params(params: Mapping[str, Any]) -> str:
    """A guess at the architecture of a Flax params tree of ours, e.g. 'gated CIFAR ResNet-32 (...)'."""
    blocks = [k for k in params if re.fullmatch(r"layer\d+_\d+", str(k))]
    gated = any("gate" in params[k] for k in blocks)
    stem = params.get("conv1", {}).get("kernel")
    head = params.get("linear", {}).get("kernel")
    return _describe(len(blocks), gated, None if stem is None else int(np.shape(stem)[0]),
                     None if head is None else int(np.shape(head)[-1]))


def describe_torch_state_dict(state_dict: Mapping[str, Any]) -> str:
    """A guess at the architecture of a PyTorch (reference / torchvision) ResNet state_dict."""
    keys = [k.removeprefix("module.") for k in state_dict]
    blocks = {m.group(1) for k in keys if (m := re.fullmatch(r"(layer\d+\.\d+)\.conv1\.weight", k))}
    gated = any(".gate." in k for k in keys)
    stem = next((v for k, v in state_dict.items() if k.removeprefix("module.") == "conv1.weight"), None)
    head = next((v for k, v in state_dict.items()
                 if k.removeprefix("module.") in ("linear.weight", "fc.weight")), None)
    return _describe(len(blocks), gated, None if stem is None else int(tuple(stem.shape)[-1]),
                     None if head is None else int(tuple(head.shape)[0]))
