"""A run's memory and FLOPs per device on N devices, from its compiled train step (no allocation).

The real train step (`train.Trainer.step_function`, phase FGC with k-NN positives, the
costliest) is lowered from abstract shapes (`jax.ShapeDtypeStruct`s with the run's
shardings) and compiled; nothing is allocated. Per device:

- parameters, optimizer state, BN statistics and memory banks: exact, from each abstract
  state leaf's shard shape and dtype;
- arguments, outputs, temporaries (activations and workspace) and their total: the compiled
  program's `memory_analysis()`. These are XLA:CPU's figures: an accelerator's compiler
  fuses and schedules differently, so its temporaries differ;
- FLOPs per step: the compiled `cost_analysis()`, split into the model (the same step
  compiled with `config.fgc.blocks=()`: forward, backward, L0, optimizer) and the FGC terms
  (the difference: k-NN scores, contrastive loss and its backward, bank updates).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fgc_jax import compilation, input_pipeline, train
from fgc_jax.data_parallel import AXIS
from fgc_jax.schedules import Phase

GIB, GB = 2**30, 10**9
# (name, memory per device in bytes), smallest first.
ACCELERATORS: tuple[tuple[str, int], ...] = (
    ("TPU v5e", 16 * GIB), ("TPU v4", 32 * GIB), ("A100 40GB", 40 * GB), ("A100 80GB", 80 * GB),
    ("H100 80GB", 80 * GB), ("TPU v5p", 95 * GIB), ("H200", 141 * GB))


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One device's share of one train step of a run on `devices` devices (bytes, FLOPs)."""

    devices: int
    rows: int
    bank_dtype: str
    batch_per_device: int
    params_bytes: int
    optimizer_bytes: int
    batch_stats_bytes: int
    bank_bytes: int
    argument_bytes: int  # compiled: the state and the batch
    output_bytes: int  # compiled: the new state and the metrics
    aliased_bytes: int  # outputs written in place of (donated) arguments
    temp_bytes: int  # compiled: activations and workspace
    flops: float
    model_flops: float

    @property
    def total_bytes(self) -> int:
        """Arguments + outputs not aliased to them + temporaries: the step's peak."""
        return self.argument_bytes + self.output_bytes - self.aliased_bytes + self.temp_bytes

    @property
    def fgc_flops(self) -> float:
        return self.flops - self.model_flops

    def fits(self) -> list[str]:
        """The accelerators of `ACCELERATORS` whose memory holds `total_bytes`."""
        return [name for name, capacity in ACCELERATORS if self.total_bytes <= capacity]

    def as_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), total_bytes=self.total_bytes, fgc_flops=self.fgc_flops,
                    fits=self.fits())


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of `jax.ShapeDtypeStruct`s with shardings."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def _compile(config: ml_collections.ConfigDict, info: input_pipeline.DatasetInfo, mesh: jax.sharding.Mesh):
    """(trainer, compiled FGC-with-neighbours train step) of `config` on `mesh`."""
    trainer = train.Trainer(config, info, mesh, steps_per_epoch=-(-info.num_train // config.batch_size))
    b = config.batch_size
    struct = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=trainer.batch_sharding)
    batch = {"image": struct((b, *info.image_shape), jnp.float32), "label": struct((b,), jnp.int32),
             "index": struct((b,), jnp.int32), "mask": struct((b,), jnp.bool_)}
    with compilation.matmul_precision(config):
        lowered = trainer.step_function(Phase.FGC_NEIGHBOURS).lower(trainer.abstract_state, batch)
    return trainer, lowered.compile()


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    return float((analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"])


def plan(config: ml_collections.ConfigDict, devices: Sequence[int], bank_dtypes: Sequence[str],
         rows: int | None = None) -> list[StepPlan]:
    """The `StepPlan` of each (device count, bank dtype), on meshes over the first N of
    `jax.devices()`; `rows`: training rows (default: the dataset's standard train split)."""
    if not config.model.gated or not config.fgc.blocks:
        raise ValueError("the plan is of the FGC train step: set --config.model.gated=True and "
                         "--config.fgc.blocks to at least one block")
    if any(n < 1 for n in devices) or max(devices) > jax.device_count():
        raise ValueError(f"--devices={','.join(map(str, devices))}: each count must be 1.."
                         f"{jax.device_count()} (the {jax.default_backend()} devices here)")
    info = input_pipeline.nominal_info(config, rows)
    out = []
    for n in devices:
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n]), (AXIS,))
        model_only = copy.deepcopy(config)
        model_only.fgc.blocks = ()
        model_flops = _flops(_compile(model_only, info, mesh)[1])
        for dtype in bank_dtypes:
            with_banks = copy.deepcopy(config)
            with_banks.fgc.bank_dtype = dtype
            trainer, compiled = _compile(with_banks, info, mesh)
            state, memory = trainer.abstract_state, compiled.memory_analysis()
            out.append(StepPlan(
                devices=n, rows=info.num_train, bank_dtype=dtype, batch_per_device=config.batch_size // n,
                params_bytes=per_device_bytes(state.params),
                optimizer_bytes=per_device_bytes(state.opt_state),
                batch_stats_bytes=per_device_bytes(state.batch_stats),
                bank_bytes=per_device_bytes(state.banks),
                argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
                aliased_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
                flops=_flops(compiled), model_flops=model_flops))
    return out


def _fits_text(fits: list[str]) -> str:
    """`fits` in a few words: ACCELERATORS is ordered by memory, so those that fit are its tail."""
    if not fits:
        return "none listed"
    return "all listed" if len(fits) == len(ACCELERATORS) else f"{fits[0]} and larger"


def format_plan(plans: Sequence[StepPlan], title: str) -> str:
    """A Markdown table of `plans`: MiB and GFLOPs per device and step, and where each fits."""
    mib = lambda x: f"{x / 2**20:,.0f}"
    lines = [f"{title}: per device and train step (FGC with k-NN positives). Parameter, optimizer, BN "
             "and bank bytes are exact; arguments/outputs/temporaries are XLA:CPU's compiled "
             "figures (an accelerator's compiler fuses differently); total = arguments + outputs "
             "not aliased to them + temporaries. FLOPs: compiled cost analysis; model = the same "
             "step with config.fgc.blocks=(), FGC = the difference.", "",
             "| devices | batch/dev | banks | params MiB | opt MiB | BN MiB | banks MiB | args MiB "
             "| temps MiB | total MiB | model GFLOP | FGC GFLOP | FGC share | fits |",
             "|" + "---|" * 14]
    for p in plans:
        lines.append(
            f"| {p.devices} | {p.batch_per_device} | {p.bank_dtype} | {mib(p.params_bytes)} "
            f"| {mib(p.optimizer_bytes)} | {mib(p.batch_stats_bytes)} | {mib(p.bank_bytes)} "
            f"| {mib(p.argument_bytes)} | {mib(p.temp_bytes)} | {mib(p.total_bytes)} "
            f"| {p.model_flops / 1e9:,.1f} | {p.fgc_flops / 1e9:,.1f} | {p.fgc_flops / p.flops:.0%} "
            f"| {_fits_text(p.fits())} |")
    lines.append("")
    lines.append("Memory per device: " + ", ".join(f"{name} {capacity / 2**20:,.0f} MiB"
                                                   for name, capacity in ACCELERATORS) + ".")
    return "\n".join(lines)
