"""FGC training: the train state, the data-parallel train step, and the loop (spec §2-§3).

The step is one per-device program (`jax.shard_map` over the mesh axis 'data') under
`jax.jit`: each device runs the model on its slice of the global batch; batch shaping
sees the global batch; the memory banks are sharded by rows over the devices; the loss
is the global-batch loss, and its gradient is taken outside the shard_map, so JAX's
transpose of the collectives yields exactly the single-device gradient.
"""
from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Callable, Mapping

import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fgc_jax import (checkpointing, compilation, config_check, console, cpu_workarounds, data_parallel,
                     evaluation, input_pipeline, losses, macs, memory_bank, schedules, storage,
                     torch_import, workdir_lock)
from fgc_jax import variables as variables_lib
from fgc_jax.data_parallel import AXIS
from fgc_jax.metric_writers import MetricWriter
from fgc_jax.models import create_model, resolve_blocks
from fgc_jax.models.description import model_name
from fgc_jax.preemption import PreemptionFlag
from fgc_jax.schedules import Phase

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue bit for bit; a pytree of arrays.

    banks: {f'block_{i}': {'feature': [rows, C], 'gate': [rows, C]}} for each FGC block,
      rows sharded over the devices. rng: key data of the run's base PRNG key; the gate
      noise of step s is drawn from fold_in(key, s), so the data position (the step)
      fixes all randomness.
    """

    step: Array
    params: Any
    batch_stats: Any
    opt_state: Any
    banks: dict[str, dict[str, Array]]
    rng: Array


# ----------------------------------------------------------------------------------------
# Set-up.


def validate_config(config: ml_collections.ConfigDict, info: input_pipeline.DatasetInfo,
                    num_devices: int) -> None:
    """Fails fast, before any compilation, on settings that cannot run (`fgc_jax.config_check`)."""
    config_check.check_fields(config)
    config_check.check_against_data(config, info, num_devices)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Nesterov SGD with L2 weight decay on the backbone only (never on gate networks).

    The learning rate is a hyperparameter in the optimizer state (`optax.inject_hyperparams`)
    that the train step sets from the run's absolute step, so a run started mid-schedule
    (`init_from`) follows the same epochs as one that trained from scratch.
    """
    def backbone_mask(params):
        flat = flax.traverse_util.flatten_dict(params)
        return flax.traverse_util.unflatten_dict({k: "gate" not in k for k in flat})

    def sgd_with_l2(learning_rate):
        return optax.chain(
            optax.add_decayed_weights(config.optimizer.weight_decay, mask=backbone_mask),
            optax.sgd(learning_rate, momentum=config.optimizer.momentum,
                      nesterov=config.optimizer.nesterov))

    return optax.inject_hyperparams(sgd_with_l2)(learning_rate=config.optimizer.learning_rate)


def state_shardings(abstract_state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
    """Banks sharded by rows over the data axis, everything else replicated."""
    replicated, by_rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    shardings = jax.tree.map(lambda _: replicated, abstract_state)
    return shardings.replace(banks=jax.tree.map(lambda _: by_rows, abstract_state.banks))


# ----------------------------------------------------------------------------------------
# The train step.


class Trainer:
    """Builds the model, state and per-phase compiled train steps of one configuration."""

    def __init__(self, config: ml_collections.ConfigDict, info: input_pipeline.DatasetInfo,
                 mesh: jax.sharding.Mesh, steps_per_epoch: int):
        validate_config(config, info, mesh.size)
        cpu_workarounds.unrolled_threefry(mesh)
        self.config, self.info, self.mesh = config, info, mesh
        self.steps_per_epoch = steps_per_epoch
        self.model = create_model(config.model, info.num_classes, compute_dtype=config.compute_dtype,
                                  data_axis_name=AXIS, sync_batch_norm=config.sync_batch_norm,
                                  **cpu_workarounds.model_options(mesh))
        self.eval_model = self.model.clone(data_axis_name=None)  # runs outside shard_map
        self.tx = create_optimizer(config)
        self.num_blocks = sum(self.model.stage_sizes) if config.model.gated else 0
        self.fgc_blocks = resolve_blocks(config.fgc.blocks, self.num_blocks) if self.num_blocks else []
        self.bank_rows = memory_bank.padded_num_rows(info.num_train, mesh.size)
        abstract = jax.eval_shape(self._init_state, jax.random.key_data(jax.random.key(0)))
        self.shardings = state_shardings(abstract, mesh)
        # The state's shapes, dtypes and shardings: a checkpoint restores into it directly,
        # without a state (banks included) built first only to be replaced.
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, self.shardings)
        self.batch_sharding = NamedSharding(mesh, P(AXIS))
        self._steps: dict[Phase, Callable] = {}

    def block_widths(self) -> list[int]:
        """Output channels of each gated block, in network order."""
        return [planes for n, planes in zip(self.model.stage_sizes, self.model.stage_planes)
                for _ in range(n)]

    def banks_from_reference(self, reference: Mapping[str, Mapping[str, np.ndarray]], source: str
                             ) -> dict[str, dict[str, Array]]:
        """Our banks from a reference checkpoint's (`torch_import.split_reference_banks`).

        Raises ValueError naming both sides if its FGC blocks differ from `config.fgc.blocks`
        or its rows from the training set's size.
        """
        by_block = {torch_import.block_number(name, tuple(self.model.stage_sizes)): banks
                    for name, banks in reference.items()}
        if sorted(by_block) != self.fgc_blocks:
            raise ValueError(
                f"{source} holds memory banks for blocks {sorted(by_block)} ({sorted(reference)}), but "
                f"config.fgc.blocks={tuple(self.config.fgc.blocks)} names blocks {self.fgc_blocks}; set "
                f"--config.fgc.blocks to the checkpoint's blocks")
        widths, dtype = self.block_widths(), jnp.dtype(self.config.fgc.bank_dtype)
        banks = {}
        for b, reference_banks in by_block.items():
            banks[f"block_{b}"] = {}
            for kind in ("feature", "gate"):
                bank = reference_banks[kind]
                if bank.shape != (self.info.num_train, widths[b]):
                    raise ValueError(
                        f"{source}: the {kind} bank of block {b} is {bank.shape}, but the configured "
                        f"dataset ({self.info.name}, {self.info.num_train} training examples) and "
                        f"model need [{self.info.num_train}, {widths[b]}]; train on the dataset the "
                        f"checkpoint was trained on")
                padded = np.zeros((self.bank_rows, widths[b]), np.float32)
                padded[: self.info.num_train] = bank
                banks[f"block_{b}"][kind] = jnp.asarray(padded, dtype)
        return banks

    def _init_state(self, rng_data: Array) -> TrainState:
        rng = jax.random.wrap_key_data(rng_data)
        params_rng, gate_rng, bank_rng, run_rng = jax.random.split(rng, 4)
        dummy = jnp.zeros((1,) + tuple(self.info.image_shape), jnp.float32)
        variables = self.eval_model.init({"params": params_rng, "gate": gate_rng}, dummy, train=False)
        widths = self.block_widths()
        banks = {}
        for i, b in enumerate(self.fgc_blocks):
            feature_rng, gate_bank_rng = jax.random.split(jax.random.fold_in(bank_rng, i))
            make = functools.partial(memory_bank.init_bank, num_rows=self.info.num_train, dim=widths[b],
                                     num_shards=self.mesh.size,
                                     dtype=jnp.dtype(self.config.fgc.bank_dtype))
            banks[f"block_{b}"] = {"feature": make(feature_rng), "gate": make(gate_bank_rng)}
        return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                          batch_stats=variables["batch_stats"],
                          opt_state=self.tx.init(variables["params"]), banks=banks,
                          rng=jax.random.key_data(run_rng))

    def create_state(self, seed: int) -> TrainState:
        """A fresh state, created directly with its shardings."""
        init = jax.jit(self._init_state, out_shardings=self.shardings)
        return init(jax.random.key_data(jax.random.key(seed)))

    def train_step(self, state: TrainState, batch: Mapping[str, Array], phase: Phase
                   ) -> tuple[TrainState, dict[str, Array]]:
        """One optimisation step on a global batch (`image`, `label`, `index`, optional `mask`:
        False on the padding of a batch padded to the static batch size)."""
        with compilation.matmul_precision(self.config):
            return self.step_function(phase)(state, batch)

    def step_function(self, phase: Phase) -> Callable:
        """The jitted train step of `phase` (the state donated); trace it under
        `compilation.matmul_precision(config)`, as `train_step` does."""
        if phase not in self._steps:
            self._steps[phase] = jax.jit(functools.partial(self._train_step, phase=phase),
                                         in_shardings=(self.shardings, self.batch_sharding),
                                         out_shardings=(self.shardings, None), donate_argnums=0)
        return self._steps[phase]

    def _per_device_loss(self, params, batch_stats, banks, batch, rng, weights, phase: Phase):
        """This device's share of the loss; see the module docstring.

        Every term and metric is a mean over the real (`mask`) examples of the global
        batch. Returns that loss without batch shaping, each block's gate probabilities
        (for batch shaping over the global batch, outside the shard_map), and the new BN
        statistics, banks and metrics.
        """
        config, mask = self.config, batch["mask"]
        (logits, gates), updates = self.model.apply(
            {"params": params, "batch_stats": batch_stats}, batch["image"], train=True, mask=mask,
            rngs={"gate": rng}, mutable=["batch_stats"])
        new_batch_stats = updates["batch_stats"]
        if not config.sync_batch_norm:
            new_batch_stats = lax.pmean(new_batch_stats, AXIS)

        weight = mask.astype(jnp.float32)
        count = lax.psum(jnp.sum(weight), AXIS)

        def batch_mean(per_example: Array) -> Array:
            return lax.psum(jnp.sum(per_example.astype(jnp.float32) * weight), AXIS) / count

        terms = {"cross_entropy": batch_mean(optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["label"]))}
        metrics = {"accuracy": batch_mean(jnp.argmax(logits, -1) == batch["label"])}
        new_banks = banks
        if gates:
            terms["l0"] = losses.l0_loss([g.prob for g in gates], mask, axis_name=AXIS)
            # Pooled, as the reference logs it: on gates / all gate entries of all blocks.
            width = sum(g.gate.shape[1] for g in gates)
            metrics["gate_density"] = batch_mean(sum(jnp.sum(g.gate, axis=1) for g in gates) / width)
            if phase.uses_banks:
                terms["fgc"], new_banks = self._fgc_terms(gates, batch["index"], mask, banks, phase)
        total = (terms["cross_entropy"] + weights["rho"] * terms.get("l0", 0.0)
                 + weights["kappa"] * terms.get("fgc", 0.0))
        metrics.update(terms)
        probs = tuple(g.prob for g in gates) if phase == Phase.BAS else ()
        return total, probs, (new_batch_stats, new_banks, metrics)

    def _fgc_terms(self, gates, index, mask, banks, phase: Phase):
        fgc = self.config.fgc
        total, new_banks = 0.0, {}
        for b in self.fgc_blocks:
            g, bank = gates[b], banks[f"block_{b}"]
            total += losses.fgc_contrastive_loss(
                g.log_alpha, g.feature, index, bank["feature"], bank["gate"], k=fgc.k,
                temperature=fgc.temperature, use_neighbours=phase == Phase.FGC_NEIGHBOURS,
                num_valid_rows=self.info.num_train, axis_name=AXIS, knn_method=fgc.knn_method,
                knn_routing=cpu_workarounds.knn_routing(self.mesh), mask=mask)
            # Padding carries index -1, which no shard holds: its rows are not updated.
            update = functools.partial(memory_bank.update_bank, index=index, momentum=fgc.momentum,
                                       axis_name=AXIS)
            new_banks[f"block_{b}"] = {"feature": update(bank["feature"], values=g.feature),
                                       "gate": update(bank["gate"], values=g.log_alpha)}
        return total, new_banks

    def _train_step(self, state: TrainState, batch, phase: Phase):
        if "mask" not in batch:  # an unpadded batch: every example is real
            batch = dict(batch, mask=jnp.ones_like(batch["label"], bool))  # keeps its sharding
        epoch = state.step // self.steps_per_epoch
        weights = schedules.loss_weights(self.config, epoch)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        per_device = jax.shard_map(
            functools.partial(self._per_device_loss, phase=phase), mesh=self.mesh,
            in_specs=(P(), P(), P(AXIS), P(AXIS), P(), P()),
            out_specs=(P(), P(AXIS), (P(), P(AXIS), P())))

        def loss_fn(params):
            total, probs, aux = per_device(params, state.batch_stats, state.banks, batch, rng, weights)
            if probs:  # batch shaping: a loss of the global batch's distribution of each gate
                replicated = NamedSharding(self.mesh, P())
                mask = jax.reshard(batch["mask"], replicated)
                series_loop = cpu_workarounds.batch_shaping_series_loop(self.mesh)
                shaping = sum(losses.batch_shaping_loss(jax.reshard(p, replicated), self.config.bas.alpha,
                                                        self.config.bas.beta, mask, series_loop=series_loop)
                              for p in probs)
                total = total + weights["zeta"] * shaping
                aux[2]["batch_shaping"] = shaping
            return total, aux

        (loss, (batch_stats, banks, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        # The lr is a function of the absolute step (spec §3), whatever the optimizer's own count.
        learning_rate = schedules.learning_rate(self.config, self.steps_per_epoch)(state.step)
        opt_state = state.opt_state._replace(
            hyperparams=dict(state.opt_state.hyperparams, learning_rate=learning_rate))
        updates, opt_state = self.tx.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                       param_norm=optax.tree.norm(params), learning_rate=learning_rate, **weights)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state, banks=banks)
        return new_state, metrics


# ----------------------------------------------------------------------------------------
# The loop.


def initialise_from(source: str, trainer: Trainer, state: TrainState) -> TrainState:
    """`state` with the model (and banks) of an earlier run, at the epoch where that run stopped.

    `source`: one of our BAS-stage workdirs or a reference `.pth`. A BAS-stage source starts
    the FGC stage at epoch `bas.epochs`; a reference FGC-stage `.pth` brings its memory banks
    and continues at its epoch. The optimizer's momentum starts from zero.
    """
    config = trainer.config
    template = {"params": state.params, "batch_stats": state.batch_stats}
    epoch, banks = config.bas.epochs, state.banks
    if source.endswith(torch_import.SUFFIXES):
        state_dict, trained_epochs = torch_import.read_torch_checkpoint(
            source, trust_pickled_code=config.trust_pickled_code)
        variables = variables_lib.torch_variables(config, template, state_dict, source)
        reference_banks = torch_import.split_reference_banks(state_dict)[1]
        if reference_banks:
            banks = trainer.banks_from_reference(reference_banks, source)
            epoch = trained_epochs if trained_epochs is not None else epoch
    else:
        variables, _ = variables_lib.load_variables(config, template, workdir=source)
    return jax.device_put(state.replace(
        step=jnp.asarray(epoch * trainer.steps_per_epoch, jnp.int32), params=variables["params"],
        batch_stats=variables["batch_stats"], banks=banks), trainer.shardings)


def _checkpoint_meta(config, step: int, steps_per_epoch: int, num_train: int) -> dict[str, Any]:
    return {"model": checkpointing.model_identity(config), "step": step,
            "epoch": step // steps_per_epoch, "steps_per_epoch": steps_per_epoch,
            "batch_size": config.batch_size, "seed": config.seed, "num_train": num_train}


def _check_bank_rows(manager, info: input_pipeline.DatasetInfo) -> None:
    """Stops, in one line, a resume whose newest checkpoint's banks hold one row per example of
    another training set (padding to the device count could hide it from the shapes)."""
    steps = manager.all_steps()
    if not steps:
        return
    try:
        rows = checkpointing.read_meta(manager, max(steps)).get("num_train")
    except checkpointing.CheckpointError:
        return  # an unreadable checkpoint is restore_newest_good's to report
    if rows is not None and rows != info.num_train:
        raise checkpointing.CheckpointError(
            f"checkpoint {max(steps)} in {manager.directory} holds memory banks of {rows} training "
            f"examples, but the {info.name} data configured now has {info.num_train}; point "
            f"config.data at the data it was trained on, or use another --workdir")


def _flush_metrics(pending: list[dict[str, Array]], step: int, clock: console.StepClock, batch_size: int,
                   writer: MetricWriter, last_checkpoint: int | None) -> dict[str, float]:
    """Averages the steps' metrics since the last flush, writes them, stops on NaN/inf.

    images_per_second and ms_per_step come from the clock's timed steps (left out when none
    was timed). Its lap is taken once the metrics are on the host: the steps are dispatched
    ahead, so only then has the device finished the interval's work.
    """
    host = jax.device_get(pending)
    steps, seconds = clock.lap()
    means = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    if not all(np.isfinite([m["loss"] for m in host])):
        raise FloatingPointError(
            f"non-finite loss at or before step {step} (loss {means['loss']}); training stopped. "
            f"{_keep_advice(last_checkpoint)}")
    if steps:
        means["images_per_second"] = steps * batch_size / max(seconds, 1e-9)
        means["ms_per_step"] = 1e3 * seconds / steps
    writer.write_scalars(step, means)
    pending.clear()
    return means


def _keep_advice(last_checkpoint: int | None) -> str:
    if last_checkpoint is None:
        return "No checkpoint was written; lower --config.optimizer.learning_rate or inspect the data"
    return (f"The last checkpoint (step {last_checkpoint}, all arrays finite) is kept: rerun the same "
            "command with a lower --config.optimizer.learning_rate to continue from it, or inspect the data")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       preemption: PreemptionFlag | None = None) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming from its newest checkpoint that verifies) and
    evaluates; returns the last evaluation report.

    Order: every config field is checked, then the workdir's storage (a gs:// bucket must be
    reachable), the data's labels, then the workdir is locked (process 0), and only then is
    anything written or compiled. `preemption`: the SIGTERM and Ctrl-C flag installed earlier by
    the caller (default: installed here). A Ctrl-C once training is under way saves a checkpoint
    like SIGTERM, then raises `KeyboardInterrupt` naming its step.
    """
    config_check.check_fields(config)
    storage.check_usable(workdir, "--workdir")
    own_flag = preemption is None
    preemption = preemption or PreemptionFlag()
    lock = workdir_lock.WorkdirLock(workdir)
    try:
        info = input_pipeline.dataset_info(config)
        mesh = data_parallel.make_mesh()
        config_check.check_against_data(config, info, mesh.size)
        input_pipeline.check_labels(config)
        if jax.process_index() == 0:
            lock.acquire()
        return _train(config, workdir, info, mesh, preemption)
    finally:
        lock.release()
        if own_flag:
            preemption.restore()


def _train(config: ml_collections.ConfigDict, workdir: str, info: input_pipeline.DatasetInfo,
           mesh: jax.sharding.Mesh, preemption: PreemptionFlag) -> dict[str, Any]:
    loader = input_pipeline.TrainLoader(config, global_batch_size=config.batch_size)
    steps_per_epoch = loader.steps_per_epoch
    trainer = Trainer(config, info, mesh, steps_per_epoch)
    total_steps = config.num_epochs * steps_per_epoch
    eval_model = trainer.eval_model
    cost = macs.cost_model(eval_model, info.image_shape)
    logging.info("%s", console.startup_summary(model_name(config), info, mesh, config.batch_size,
                                                steps_per_epoch, total_steps, cost))

    manager = checkpointing.create_manager(workdir, config)
    try:
        _check_bank_rows(manager, info)
        resumed = checkpointing.restore_newest_good(manager, trainer.abstract_state, config, workdir)
        if resumed is not None:
            state, _, latest = resumed
            logging.info("Resumed from checkpoint %d in %s", latest, workdir)
        else:
            state = trainer.create_state(config.seed)
            if config.init_from:
                state = initialise_from(config.init_from, trainer, state)
                logging.info("Initialised from %s; training starts at step %d (epoch %d)",
                             config.init_from, int(state.step), int(state.step) // steps_per_epoch)
        start_step = int(jax.device_get(state.step))
        if jax.process_index() == 0:  # only now: a rejected checkpoint leaves the old config.json
            storage.write_text(storage.path(workdir) / "config.json",
                               config.to_json_best_effort(indent=2))
        report = _loop(config, workdir, trainer, manager, loader, state, start_step, total_steps,
                       resumed[2] if resumed else None, cost, preemption)
    except BaseException:
        try:  # the error on its way out says what happened; one from closing would hide it
            manager.close()
        except Exception:  # pylint: disable=broad-except
            pass
        raise
    manager.close()
    return report


def _loop(config, workdir: str, trainer: Trainer, manager, loader, state: TrainState, start_step: int,
          total_steps: int, last_checkpoint: int | None, cost, preemption: PreemptionFlag
          ) -> dict[str, Any]:
    """The training loop from `start_step`; checkpoints, evaluations, metrics, preemption, profile.

    img/s and the ETA count training steps alone (`console.StepClock`): the first step of
    each phase (it compiles), the step after a checkpoint (it overlaps the save),
    evaluations and saves are not timed.
    """
    mesh, steps_per_epoch = trainer.mesh, trainer.steps_per_epoch
    writer = MetricWriter(workdir, start_step)
    pending: list[dict[str, Array]] = []
    report: dict[str, Any] = {}
    clock = console.StepClock()
    compiled: set[Phase] = set()
    saving = False  # a checkpoint's background save overlaps the next step
    evaluated = False  # the first evaluation compiles the eval step
    profile_start, profile_stop = tuple(config.profile_steps) or (-1, -1)
    tracing = False
    stopped_at = None  # the step a SIGTERM or Ctrl-C stopped the run at

    def checkpoint(step: int, metrics: Mapping[str, float] | None = None) -> None:
        nonlocal last_checkpoint
        meta = _checkpoint_meta(config, step, steps_per_epoch, trainer.info.num_train)
        try:
            checkpointing.save(manager, step, state, meta, metrics)
        except FloatingPointError as e:
            raise FloatingPointError(f"{e}. {_keep_advice(last_checkpoint)}") from e
        last_checkpoint = step

    def run_eval(step: int, write: bool = True) -> tuple[dict[str, Any], dict[str, float]]:
        nonlocal evaluated
        if not evaluated:
            logging.info("compiling the eval step ...")
        report = evaluation.evaluate_model(trainer.eval_model, {"params": state.params,
                                                              "batch_stats": state.batch_stats},
                                         config, mesh, cost)
        scalars = {k: v for k, v in report.items() if isinstance(v, (int, float))}
        scalars.update({f"block_density/{b}": d for b, d in enumerate(report["block_density"])})
        if write:
            writer.write_scalars(step, {f"eval/{k}": v for k, v in scalars.items()})
        logging.info("step %d eval: top1 %.4f, mean MACs %.4g, pruning ratio %.3f (%.1f s%s)", step,
                     report["top1"], report["mean_macs"], report["pruning_ratio"], report["seconds"],
                     "" if evaluated else ", with compiling")
        evaluated = True
        return report, scalars

    failed = True  # an error on its way out must not be hidden by one from closing the writer
    try:
        if start_step >= total_steps:
            logging.info("%s already holds the final checkpoint (step %d)", workdir, start_step)
            report, _ = run_eval(start_step, write=False)  # its metrics were written by that run
        elif preemption.raised():
            logging.warning("Stopped for preemption before training began; rerun the same command")
            failed = False
            return report
        batches = loader.batches(start_step)
        for step in range(start_step, total_steps):
            epoch = step // steps_per_epoch
            phase = schedules.phase(config, epoch)
            batch = input_pipeline.to_global(next(batches), mesh)
            if step == profile_start:
                jax.profiler.start_trace(str(storage.path(workdir) / "profile"))
                tracing = True
            timed = phase in compiled and not saving
            if phase not in compiled:
                logging.info("compiling the train step for phase %s ...", phase.value)
            began = time.perf_counter()
            with contextlib.nullcontext() if timed else clock.excluded():
                state, metrics = trainer.train_step(state, batch, phase)
                preemption.save_on_interrupt()  # there is a trained step to save from here on
                checkpointing.check_saves(manager, wait=True)  # a failed save stops the run here
                if not timed:
                    jax.block_until_ready(metrics)
            if phase not in compiled:
                logging.info("compiled and ran its first train step in %.1f s", time.perf_counter() - began)
                compiled.add(phase)
            if timed:
                clock.count()
            saving = False
            pending.append(metrics)
            done = step + 1
            if tracing and done == profile_stop:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                tracing = False
                logging.info("wrote a profile of steps %d-%d to %s", profile_start + 1, profile_stop,
                             storage.path(workdir) / "profile")
            epoch_end = done % steps_per_epoch == 0
            stop = (preemption.raised() or manager.reached_preemption(done)) and done < total_steps
            wants_checkpoint = epoch_end or done % config.checkpoint_every_steps == 0 or stop
            if pending and (done % config.log_every_steps == 0 or wants_checkpoint):
                means = _flush_metrics(pending, done, clock, loader.local_batch_size
                                       * jax.process_count(), writer, last_checkpoint)
                speed = (f"{means['images_per_second']:.1f} img/s" if "images_per_second" in means
                         else "img/s n/a")
                logging.info("step %d/%d (epoch %d) loss %.4f acc %.3f density %.3f lr %.4g, "
                             "%s, ETA %s", done, total_steps, epoch, means["loss"],
                             means["accuracy"], means.get("gate_density", 1.0),
                             means["learning_rate"], speed, clock.eta(total_steps - done))
            eval_metrics = None
            if epoch_end and ((epoch + 1) % config.eval_every_epochs == 0 or done == total_steps):
                with clock.excluded():
                    report, eval_metrics = run_eval(done)
            if wants_checkpoint:
                with clock.excluded():
                    checkpoint(done, eval_metrics)
                saving = True
            if stop:
                stopped_at = done
                if not preemption.interrupted:
                    logging.warning("Stopped for preemption at step %d; rerun the same command to resume",
                                    done)
                break
        failed = False
    finally:
        if tracing:
            jax.profiler.stop_trace()
        try:
            writer.close()
        except OSError:
            if not failed:
                raise
    checkpointing.wait(manager)
    if stopped_at is not None:
        preemption.raise_if_interrupted(stopped_at)  # Ctrl-C: once its checkpoint is on disk
    return report
