"""Import PyTorch FGC/BAS (and torchvision-style ResNet) checkpoints into Flax variables.

The reference implementation is PyTorch; its released checkpoints (e.g. the BAS-stage
ResNet-20) hold a `state_dict` whose names our modules mirror: `layer1.0.conv1.weight`
is `params/layer1_0/conv1/kernel`. Conversion is driven by a template of our variables,
so every model leaf must be found, no checkpoint tensor may be left over, and every
shape must agree; anything else is reported at once. torch is an optional dependency
(`pip install -e .[torch]`) needed only to read `.pth` files.

A `.pth` is a pickle, and unpickling can run any code the file names. Files are opened with
PyTorch's weights-only loader (tensors, numbers, strings, plain containers, and the
`_HARMLESS_GLOBALS` below); one that names anything else is refused
(`UnsafeCheckpointError`) unless the caller opts in with `trust_pickled_code=True`.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
from typing import Any, Mapping

from absl import logging
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

SUFFIXES = (".pth", ".pt")  # file names read as PyTorch checkpoints (e.g. in config.init_from)
# Module renames between our names and the PyTorch ones (after `_` -> `.` in `layerX_Y`).
_MODULE_TO_TORCH = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
# The classifier is `linear` in the CIFAR reference and `fc` in torchvision ResNets.
_CLASSIFIER_ALIASES = {"linear": ("linear", "fc")}
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_IGNORED_SUFFIXES = ("num_batches_tracked",)
_DATA_PARALLEL_PREFIX = "module."
# A reference FGC-stage state_dict also holds each FGC block's memory banks (spec §6).
_BANK_SUFFIXES = {".gate.feat_mb.memory": "feature", ".gate.gate_mb.memory": "gate",
                  ".gate.gate_mb.params": "params"}
# Data-only objects training scripts pickle beside the weights (the reference's argparse
# arguments), let through PyTorch's own allowlist (`torch.serialization.safe_globals`):
# unpickling one only fills its `__dict__`, with values the weights-only loader vets in turn.
_HARMLESS_GLOBALS = (argparse.Namespace,)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A `.pth` whose pickle names code outside PyTorch's weights-only allowlist; it was not
    unpickled, as that would run the code."""


def split_reference_banks(state_dict: Mapping[str, np.ndarray]
                          ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """Separates the memory banks of a reference FGC-stage state_dict from the model's tensors.

    Returns `(model_state_dict, banks)`, `banks` keyed by block (`'layer3.1'`) with entries
    `feature` [N, C], `gate` [N, C] and `params` ([temperature, momentum]). A BAS-stage
    state_dict has no banks.
    """
    model, banks = {}, {}
    for key, value in state_dict.items():
        name = key.removeprefix(_DATA_PARALLEL_PREFIX)
        suffix = next((s for s in _BANK_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            model[key] = value
        else:
            banks.setdefault(name.removesuffix(suffix), {})[_BANK_SUFFIXES[suffix]] = np.asarray(value)
    for block, entries in banks.items():
        if not {"feature", "gate"} <= entries.keys():
            raise ValueError(f"the reference banks of {block} are incomplete: found only {sorted(entries)}")
    return model, banks


def block_number(torch_block: str, stage_sizes: tuple[int, ...]) -> int:
    """Our 0-based gated-block index of a reference block name such as `'layer3.1'`."""
    stage, index = torch_block.removeprefix("layer").split(".")
    stage, index = int(stage) - 1, int(index)
    if not (0 <= stage < len(stage_sizes) and 0 <= index < stage_sizes[stage]):
        raise ValueError(f"{torch_block} is not a block of a network with stages of {stage_sizes} blocks")
    return sum(stage_sizes[:stage]) + index


def _torch_module_name(module_path: tuple[str, ...]) -> str:
    parts = []
    for name in module_path:
        if name.startswith("layer") and "_" in name:
            name = name.replace("_", ".", 1)  # layer1_0 -> layer1.0
        parts.append(_MODULE_TO_TORCH.get(name, name))
    return ".".join(parts)


def _torch_shapes(leaf: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """PyTorch shapes that convert to a Flax leaf of `shape`; the first is the canonical one."""
    if leaf != "kernel":
        return (shape,)
    if len(shape) == 4:  # conv: Flax HWIO <- PyTorch OIHW
        h, w, i, o = shape
        return ((o, i, h, w),)
    if len(shape) == 2:  # dense: Flax (in, out) <- nn.Linear (out, in) or 1x1 nn.Conv2d
        i, o = shape
        return ((o, i), (o, i, 1, 1))
    raise ValueError(f"cannot map a kernel of rank {len(shape)} (shape {shape})")


def _to_flax(leaf: str, value: np.ndarray, rank: int) -> np.ndarray:
    """A PyTorch tensor already known to fit (`_torch_shapes`) in Flax layout of `rank`."""
    if leaf != "kernel":
        return value
    if rank == 4:
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    return value.reshape(value.shape[:2]).T  # (out, in[, 1, 1]) -> (in, out)


def torch_state_dict_to_flax(state_dict: Mapping[str, np.ndarray],
                             variables: Mapping[str, Any]) -> dict[str, Any]:
    """Fills `variables`' structure ({'params', 'batch_stats'}) from a PyTorch state_dict.

    `state_dict` maps PyTorch names to NumPy arrays (a `module.` prefix is stripped,
    `num_batches_tracked` and the memory banks of an FGC-stage checkpoint ignored). `variables` is only a template: shapes and dtypes are
    read from it (arrays or `jax.ShapeDtypeStruct`s). Raises ValueError listing every
    missing, unexpected or mis-shaped key.
    """
    unused = {}
    for key, value in split_reference_banks(state_dict)[0].items():
        key = key.removeprefix(_DATA_PARALLEL_PREFIX)
        if not key.endswith(_IGNORED_SUFFIXES):
            unused[key] = np.asarray(value)

    converted, missing, wrong_shape = {}, [], []
    for path, template in traverse_util.flatten_dict(dict(variables)).items():
        collection, *module_path, leaf = path
        if (collection, leaf) not in _LEAF_TO_TORCH:
            raise ValueError(f"no PyTorch counterpart for variable {'/'.join(path)}")
        module = _torch_module_name(tuple(module_path))
        candidates = [f"{alias}.{_LEAF_TO_TORCH[collection, leaf]}"
                      for alias in _CLASSIFIER_ALIASES.get(module, (module,))]
        key = next((c for c in candidates if c in unused), candidates[0])
        shape = tuple(template.shape)
        expected = _torch_shapes(leaf, shape)
        if key not in unused:
            missing.append(f"{key} (expected shape {expected[0]})")
            continue
        value = unused.pop(key)
        if value.shape not in expected:
            wrong_shape.append(f"{key}: expected {' or '.join(map(str, expected))}, "
                               f"found {value.shape}")
            continue
        converted[path] = jnp.asarray(_to_flax(leaf, value, len(shape)), dtype=template.dtype)

    unexpected = [f"{key} (found shape {value.shape})" for key, value in unused.items()]
    if missing or unexpected or wrong_shape:
        problems = [("missing from the checkpoint", missing),
                    ("unexpected in the checkpoint", unexpected), ("wrong shape", wrong_shape)]
        lines = [f"  {title}: {item}" for title, items in problems for item in items]
        raise ValueError("PyTorch state_dict does not match the model:\n" + "\n".join(lines))
    return traverse_util.unflatten_dict(converted)


def read_torch_state_dict(path: str | os.PathLike, *, trust_pickled_code: bool = False
                          ) -> dict[str, np.ndarray]:
    """The state_dict of a PyTorch `.pth` file (raw, or under a 'state_dict' entry) as NumPy."""
    return read_torch_checkpoint(path, trust_pickled_code=trust_pickled_code)[0]


def _refused_globals(torch: Any, path: str, error: Exception) -> str:
    """The globals of `path` outside the weights-only allowlist, for the error message."""
    try:  # all of them, read off the pickle without running it (zip-format files only)
        with torch.serialization.safe_globals(list(_HARMLESS_GLOBALS)):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # pylint: disable=broad-except
        names = []
    names = names or re.findall(r"GLOBAL ([\w.]+)", str(error))  # the first one, as torch names it
    if names:
        return ", ".join(sorted(set(names)))
    return next((line.strip() for line in str(error).splitlines() if "WeightsUnpickler" in line),
                "an object PyTorch's weights-only loader does not allow")


def read_torch_checkpoint(path: str | os.PathLike, *, trust_pickled_code: bool = False
                          ) -> tuple[dict[str, np.ndarray], int | None]:
    """`(state_dict as NumPy, epoch)` of a `.pth`; epoch: the reference's 'epoch' entry (epochs
    trained), None where the file has none.

    Raises `UnsafeCheckpointError`, running nothing, if the file names code PyTorch's
    weights-only loader refuses. `trust_pickled_code=True` unpickles such a file in full
    (`torch.load(weights_only=False)`), which runs that code, and logs a warning saying so:
    only for a file whose source you trust.
    """
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError("reading PyTorch checkpoints needs torch: pip install -e .[torch]") from e

    path = os.fspath(path)
    try:
        with torch.serialization.safe_globals(list(_HARMLESS_GLOBALS)):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refused_globals(torch, path, e)
        if not trust_pickled_code:
            raise UnsafeCheckpointError(
                f"{path} names code outside PyTorch's weights-only allowlist ({refused}); "
                "unpickling it would run that code, so it was refused. Only if you trust the "
                "file's source: rerun with --config.trust_pickled_code=True (in Python: "
                "trust_pickled_code=True)") from e
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        logging.warning("%s was unpickled in full (trust_pickled_code): the code it names (%s) "
                        "was run", path, refused)
    epoch = None
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        epoch = checkpoint.get("epoch")
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state_dict")

    def to_numpy(value: Any) -> np.ndarray:
        if not isinstance(value, torch.Tensor):
            return np.asarray(value)
        value = value.detach().cpu()
        # NumPy has no bfloat16: floats go through float32 (the template decides the dtype).
        return (value.float() if value.is_floating_point() else value).numpy()

    return {key: to_numpy(value) for key, value in checkpoint.items()}, (
        None if epoch is None else int(epoch))


def load_torch_checkpoint(path: str | os.PathLike, variables: Mapping[str, Any], *,
                          trust_pickled_code: bool = False) -> dict[str, Any]:
    """Reads a PyTorch `.pth` file (a state_dict, or a dict with a 'state_dict' entry) into Flax.

    See `torch_state_dict_to_flax` for the mapping and the template `variables`, and
    `read_torch_checkpoint` for `trust_pickled_code`.
    """
    return torch_state_dict_to_flax(read_torch_state_dict(path, trust_pickled_code=trust_pickled_code),
                                    variables)
