"""One validation of every config field, before any data access, workdir write or compilation.

`check_fields(config)` needs nothing but the config: types and ranges of every field in
`configs/resnet20_cifar.py` (which all configs derive from), unknown fields, the model the
config describes, a missing `init_from`, and an `init_from` `.pth` that names code to run
(`torch_import.UnsafeCheckpointError`). `check_against_data(config, info, num_devices)`
adds what depends on the dataset's size and the device count. Both raise `ConfigError`
(a ValueError) naming the field; the command-line tools print it as one `error:` line.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

import ml_collections

from fgc_jax import compilation, input_pipeline, memory_bank, storage, torch_import
from fgc_jax.models import COMPUTE_DTYPES, create_model, resolve_blocks


class ConfigError(ValueError):
    """A config field that cannot run; the message names it and says what is allowed."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and v >= low), f"an integer >= {low}"


def _number(low: float, high: float = math.inf, *, open_low: bool = False,
            open_high: bool = False) -> tuple[Callable[[Any], bool], str]:
    def ok(v):
        return (_is_number(v) and (v > low if open_low else v >= low)
                and (v < high if open_high else v <= high))
    span = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    return ok, f"a finite number in {span}"


def _choice(*options: Any) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), f"one of {options}"


_BOOL = ((lambda v: isinstance(v, bool)), "True or False")
_STR = ((lambda v: isinstance(v, str)), "a string")

# Every field of configs/resnet20_cifar.py: (test, what is allowed). tests/test_reliability.py
# checks that this table and that config name the same fields.
FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": _int(0),
    "dataset": _choice(*sorted(input_pipeline._SPECS)),  # pylint: disable=protected-access
    "data.source": _choice("tfds", "cifar_bin", "sklearn", "imagenet_folder"),
    "data.dir": _STR,
    "data.download_url": _STR,
    "data.download_sha256": ((lambda v: isinstance(v, str) and re.fullmatch(r"([0-9a-fA-F]{64})?", v) is not None),
                             "'' or a SHA-256 of 64 hex digits"),
    "data.manual_dir": _STR,
    "data.image_size": _int(1),
    "data.prefetch": _int(0),
    "model.arch": _choice("cifar_resnet", "imagenet_resnet"),
    "model.depth": _int(1),
    "model.gated": _BOOL,
    "model.gate_hidden": _int(1),
    "model.tau": _number(0, open_low=True),
    "compute_dtype": _choice(*COMPUTE_DTYPES),
    "sync_batch_norm": _BOOL,
    "matmul_precision": _choice(*compilation.MATMUL_PRECISIONS),
    "batch_size": _int(1),
    "eval_batch_size": _int(1),
    "num_epochs": _int(1),
    "optimizer.learning_rate": _number(0, open_low=True),
    "optimizer.momentum": _number(0, 1, open_high=True),
    "optimizer.nesterov": _BOOL,
    "optimizer.weight_decay": _number(0),
    "optimizer.lr_milestones": ((lambda v: isinstance(v, (tuple, list)) and all(_is_int(m) and m > 0 for m in v)
                                 and list(v) == sorted(v)), "increasing positive epochs"),
    "optimizer.lr_decay": _number(0, open_low=True),
    "bas.epochs": _int(0),
    "bas.zeta": _number(0),
    "bas.alpha": _number(0, open_low=True),
    "bas.beta": _number(0, open_low=True),
    "sparsity.rho_max": _number(0),
    "sparsity.ramp_epochs": _int(0),
    "fgc.kappa": _number(0),
    "fgc.blocks": ((lambda v: isinstance(v, (tuple, list)) and all(_is_int(b) for b in v)),
                   "a tuple of block indices"),
    "fgc.k": _int(1),
    "fgc.temperature": _number(0, open_low=True),
    "fgc.momentum": _number(0, 1, open_high=True),
    "fgc.warmup_epochs": _int(0),
    "fgc.bank_dtype": _choice(*COMPUTE_DTYPES),
    "fgc.knn_method": _choice(*memory_bank.KNN_METHODS),
    "init_from": _STR,
    "trust_pickled_code": _BOOL,
    "checkpoint_every_steps": _int(1),
    "keep_checkpoints": _int(1),
    "checkpoint_fallback": _BOOL,
    "log_every_steps": _int(1),
    "eval_every_epochs": _int(1),
    "profile_steps": ((lambda v: isinstance(v, (tuple, list)) and (
        len(v) == 0 or (len(v) == 2 and all(_is_int(s) for s in v) and 0 <= v[0] < v[1]))),
                      "() or two integers (start, stop) with 0 <= start < stop"),
}


def _flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        name = prefix + key
        if isinstance(value, ml_collections.ConfigDict) and name not in FIELDS:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def check_fields(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` on the first field that is unknown, missing or out of range."""
    values = _flatten(config)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}; every field is listed, with a comment, "
                          "in configs/resnet20_cifar.py")
    missing = sorted(set(FIELDS) - set(values))
    if missing:
        raise ConfigError(f"config lacks field(s) {missing}; derive the config from "
                          "configs/resnet20_cifar.py")
    for name, (ok, allowed) in FIELDS.items():
        if not ok(values[name]):
            raise ConfigError(f"config.{name}={values[name]!r} is invalid: it must be {allowed}")
    if config.bas.epochs > config.num_epochs:
        raise ConfigError(f"bas.epochs={config.bas.epochs} must lie in [0, num_epochs={config.num_epochs}]")
    try:
        input_pipeline.input_spec(config)
        model = create_model(config.model, 10, compute_dtype=config.compute_dtype)
        if config.model.gated:
            resolve_blocks(config.fgc.blocks, sum(model.stage_sizes))
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if config.init_from:
        storage.check_usable(config.init_from, "config.init_from")
        if storage.is_remote(config.init_from) and config.init_from.endswith(torch_import.SUFFIXES):
            raise ConfigError(f"config.init_from={config.init_from}: a PyTorch checkpoint is read "
                              "from a local file; copy it here first (gcloud storage cp)")
        if not storage.path(config.init_from).exists():
            raise FileNotFoundError(f"config.init_from={config.init_from} does not exist (expected "
                                    "a workdir of a BAS-stage run or a PyTorch .pth)")
        if config.init_from.endswith(torch_import.SUFFIXES) and not config.trust_pickled_code:
            torch_import.read_torch_checkpoint(config.init_from)  # refuses a pickle naming code, running none
    for field in ("data.dir", "data.manual_dir"):
        location = values[field]
        if location and storage.is_remote(location):
            if config.data.source != "tfds":
                raise ConfigError(
                    f"config.{field}={location}: config.data.source={config.data.source!r} reads local "
                    "files; copy them to a local disk (gcloud storage cp -r), or prepare them as tfds "
                    "array_record, copy that to Cloud Storage and use config.data.source='tfds'")
            storage.check_usable(location, f"config.{field}")


def check_against_data(config: ml_collections.ConfigDict, info: input_pipeline.DatasetInfo,
                       num_devices: int) -> None:
    """The checks that need the dataset's size and the device count."""
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    check(config.batch_size % num_devices == 0,
          f"batch_size={config.batch_size} is not divisible by the {num_devices} devices; use a multiple "
          f"of {num_devices}")
    check(config.eval_batch_size % num_devices == 0,
          f"eval_batch_size={config.eval_batch_size} is not divisible by the {num_devices} devices")
    check(config.batch_size <= info.num_train,
          f"batch_size={config.batch_size} exceeds the {info.num_train} training examples")
    check(config.fgc.k < info.num_train,
          f"fgc.k={config.fgc.k} must satisfy 0 < k < the {info.num_train} training examples (bank rows)")
