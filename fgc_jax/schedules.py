"""The two-stage FGC schedule of spec §3, as pure functions of the epoch.

Stage 1 (BAS, epochs [0, bas.epochs)): cross-entropy plus batch shaping with a linearly
decaying weight. Stage 2 (epochs [bas.epochs, num_epochs)): L0 with a linear ramp, and
the FGC loss, first with instance positives (warm-up), then with k-NN positives.
"""
from __future__ import annotations

import enum

import jax.numpy as jnp
import ml_collections
import optax

Array = jnp.ndarray


class Phase(enum.Enum):
    """What the train step computes; each phase compiles its own step."""

    BAS = "bas"  # batch shaping, no memory banks
    SPARSITY = "sparsity"  # stage 2 without FGC (kappa = 0): the BAS baseline
    FGC_INSTANCE = "fgc_instance"  # FGC warm-up: each example is its own only positive
    FGC_NEIGHBOURS = "fgc_neighbours"  # FGC with k-NN positives

    @property
    def uses_banks(self) -> bool:
        return self in (Phase.FGC_INSTANCE, Phase.FGC_NEIGHBOURS)


def phase(config: ml_collections.ConfigDict, epoch: int) -> Phase:
    """The phase of (integer) epoch `epoch`."""
    if not config.model.gated:
        return Phase.SPARSITY  # the dense baseline: cross-entropy alone, all gate weights unused
    if epoch < config.bas.epochs:
        return Phase.BAS
    if config.fgc.kappa == 0:
        return Phase.SPARSITY
    if epoch < config.bas.epochs + config.fgc.warmup_epochs:
        return Phase.FGC_INSTANCE
    return Phase.FGC_NEIGHBOURS


def loss_weights(config: ml_collections.ConfigDict, epoch: Array) -> dict[str, Array]:
    """`zeta` (batch shaping), `rho` (L0) and `kappa` (FGC) at integer epoch `epoch` (traceable)."""
    epoch = jnp.asarray(epoch, jnp.float32)
    bas_epochs = config.bas.epochs
    in_bas = epoch < bas_epochs
    zeta = jnp.where(in_bas, config.bas.zeta * (bas_epochs - epoch) / max(bas_epochs, 1), 0.0)
    ramp = jnp.clip((epoch - bas_epochs) / max(config.sparsity.ramp_epochs, 1), 0.0, 1.0)
    rho = jnp.where(in_bas, 0.0, config.sparsity.rho_max * ramp)
    kappa = jnp.where(in_bas, 0.0, config.fgc.kappa)
    return {"zeta": zeta, "rho": rho, "kappa": kappa}


def learning_rate(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Step-wise lr: `learning_rate`, times `lr_decay` at each epoch of `lr_milestones`."""
    boundaries = {int(m) * steps_per_epoch: config.optimizer.lr_decay
                  for m in config.optimizer.lr_milestones}
    return optax.piecewise_constant_schedule(config.optimizer.learning_rate, boundaries)
