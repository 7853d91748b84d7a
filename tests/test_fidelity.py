"""The shipped configuration trains the reference FGC step for step (FGC_SPEC.md §1-§3, §6).

Oracle: an independent PyTorch step (`torch_fgc_reference.py`) in float64, from the
authors' released BAS ResNet-20, on the same cifar10-mini images with their dataset
indices, the same memory banks and the same Gumbel noise (recorded from our step as it
runs). Our float32 step in the DEFAULT configuration, through `Trainer.train_step` as
training compiles it, must agree with it as well as PyTorch's own float32 step does.

Every compared step starts from the same state on both sides: before each step the
references are set to fgc_jax's state as it stands (parameters, BN statistics, SGD
momentum, banks), so an error cannot carry over from one step to the next. The hard
decisions (a gate's 1[y > 0], an example's k nearest bank rows) are discrete: where float32
and float64 fall on either side of a tie, the two steps differ by a whole gate or
neighbour, on one host and not on another. So the references take fgc_jax's decisions,
and the decisions on which the float64 reference would have differed are counted on their
own and must be near-ties in float64: few, and each within float32 error of the boundary.
The continuous figures (losses, gradients, statistics, parameters, banks) keep tolerances
near float32 rounding.
"""
import argparse
import itertools

import jax
import numpy as np
import optax
import pytest

from configs import resnet20_cifar
from fgc_jax import gates, input_pipeline, memory_bank, torch_import, train
from fgc_jax.schedules import Phase
from fgc_jax.train import Trainer

torch = pytest.importorskip("torch")
torch_fgc_reference = pytest.importorskip("torch_fgc_reference")

NUM_BLOCKS = 9  # ResNet-20
NUM_FGC_BLOCKS = 2  # the shipped config.fgc.blocks = (-2, -1)

# A decision on which fgc_jax and the float64 reference differ must be a tie within float32
# error in float64: a gate's |y| (y = (logit + logistic noise) / tau; the gate logits of
# fgc_jax's float32 step differ from float64's by at most ~1e-5 here), or a neighbour's
# similarity gap to the k-th nearest row, relative to the feature's norm (float32 error
# ~1e-7). At most MAX_FLIPS such decisions per step and kind (of ~10^4-10^5).
GATE_TIE = 1e-3
NEIGHBOUR_TIE = 1e-5
MAX_FLIPS = 8


def relative_errors(ours: dict, reference: dict) -> dict:
    """max |ours - reference| / max |reference| per tensor."""
    return {name: float(np.max(np.abs(np.asarray(ours[name], np.float64) - reference[name]))
                        / max(np.max(np.abs(reference[name])), 1e-30)) for name in reference}


def to_torch_names(tree) -> dict:
    """Our variables flattened to the reference's state_dict names (PyTorch layouts)."""
    out = {}
    for path, value in jax.tree.flatten_with_path(tree)[0]:
        keys = [k.key for k in path]
        module = ".".join(k.replace("_", ".", 1) if k.startswith("layer") else k for k in keys[:-1])
        leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                "var": "running_var"}[keys[-1]]
        value = np.asarray(value, np.float64)
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif value.ndim == 2:
            value = value.T if module == "linear" else value.T[:, :, None, None]
        out[f"{module}.{leaf}"] = value
    return out


def recording(function, into: dict, num_slots: int, pick):
    """`function`, recording `pick(args, result)` into `into[slot]` as the compiled step runs.

    The step traces `function` once per block, in network order: the slot is the block's
    place in that order.
    """
    slots = itertools.count()

    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        slot = next(slots) % num_slots
        jax.debug.callback(lambda value: into.__setitem__(slot, jax.tree.map(np.asarray, value)),
                           pick(args, result))
        return result

    return wrapped


@pytest.fixture
def recorded(monkeypatch):
    """What our step draws and decides: every gate's uniform draws (`noise`) and (gate
    logits, hard gates) (`gate`), in block order; every FGC block's k-NN rows (`neighbours`)."""
    out = {"noise": {}, "gate": {}, "neighbours": {}}
    for kind, module, name, num_slots, pick in (
            ("noise", gates, "_uniform_noise", NUM_BLOCKS, lambda args, u: u),
            ("gate", gates, "straight_through_gumbel_sigmoid", NUM_BLOCKS, lambda args, g: (args[0], g)),
            ("neighbours", memory_bank, "nearest_neighbours", NUM_FGC_BLOCKS, lambda args, rows: rows)):
        monkeypatch.setattr(module, name, recording(getattr(module, name), out[kind], num_slots, pick))
    return out


def make_run(cifar_mini_dir, bas_checkpoint, batch_size, epoch):
    config = resnet20_cifar.get_config()  # the shipped defaults: nothing numerical is changed
    config.data.source, config.data.dir, config.batch_size = "cifar_bin", str(cifar_mini_dir), batch_size
    config.data.prefetch = 0
    info = input_pipeline.dataset_info(config)
    loader = input_pipeline.TrainLoader(config, global_batch_size=batch_size)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    trainer = Trainer(config, info, mesh, loader.steps_per_epoch)
    state = trainer.create_state(seed=0)
    variables = torch_import.load_torch_checkpoint(bas_checkpoint, {"params": state.params,
                                                                    "batch_stats": state.batch_stats})
    start = epoch * loader.steps_per_epoch
    state = jax.device_put(state.replace(step=np.int32(start), **variables), trainer.shardings)
    return trainer, state, loader.batches(start)


def references_at(trainer, state, dtypes, with_banks):
    """PyTorch reference runs (one per dtype) set to fgc_jax's `state` as it stands."""
    state = jax.device_get(state)
    num_train = trainer.info.num_train
    banks = {b: tuple(np.asarray(state.banks[f"block_{b}"][kind])[:num_train] for kind in ("feature", "gate"))
             for b in trainer.fgc_blocks} if with_banks else {}
    momentum = to_torch_names(optax.tree_utils.tree_get(state.opt_state, "trace"))
    variables = {**to_torch_names(state.params), **to_torch_names(state.batch_stats)}
    return {dtype: torch_fgc_reference.ReferenceRun(variables, banks, dtype, lr=0.1, momentum_buffers=momentum)
            for dtype in dtypes}


def padded(batch, num_real):
    """The batch with its examples from `num_real` on turned into padding."""
    batch = {k: v.copy() for k, v in batch.items()}
    batch["mask"][num_real:] = False
    batch["index"][num_real:] = -1
    batch["image"][num_real:] = 0
    batch["label"][num_real:] = 0
    return batch


def gate_flips(ours, own, y):
    """Gates decided differently by a reference (`own`, from its `y`): count and worst |y|."""
    flipped = [np.abs(yb[ob != np.asarray(gb)]) for gb, ob, yb in zip(ours, own, y)]
    return sum(f.size for f in flipped), max((float(f.max()) for f in flipped if f.size), default=0.0)


def neighbour_changes(ours, own, similarity):
    """Rows in our k-NN sets but not in a reference's own (same k): count and worst gap.

    The gap of such a row is how far its similarity falls below the reference's k-th
    nearest row, relative to the query's largest similarity (0 for an exact tie).
    """
    count, worst = 0, 0.0
    for b in ours:
        for row, (mine, theirs) in enumerate(zip(ours[b], own[b])):
            extra = np.setdiff1d(mine, theirs)
            if extra.size:
                kth = similarity[b][row, theirs].min()
                gap = (kth - similarity[b][row, extra]).max() / np.abs(similarity[b][row]).max()
                count, worst = count + extra.size, max(worst, float(gap))
    return count, worst


# phase, epoch, batch size, real examples of each step's batch, and the tolerance on the
# relative error (max |ours - float64| / max |float64| per tensor) of the gradients and BN
# statistics: (worst tensor, median tensor). From the same state and with the same hard
# decisions, fgc_jax's float32 step stays near float32 rounding: FGC steps 1e-4 / 2e-6, the
# BAS step 4e-4 / 4e-5 (the Beta pdf of batch shaping, infinite at 0 and 1, amplifies
# rounding; PyTorch float32: 7e-4 / 3e-5). PyTorch's own float32 step is printed beside it.
# The opt-in XLA:CPU option `LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT` measured 1.8e-2 / 2.4e-6 and
# 5.0e-2 / 4.5e-3 on the two fgc_64_padded steps: these tolerances catch it.
CASES = {
    # FGC stage with k-NN positives at epoch 150: rho 0.1, kappa 0.003, lr 0.1.
    "fgc_256": (Phase.FGC_NEIGHBOURS, 150, 256, [256, 256], (3e-4, 1e-5)),
    # A full batch, then an epoch's last batch of 50 examples padded to 64.
    "fgc_64_padded": (Phase.FGC_NEIGHBOURS, 150, 64, [64, 50], (3e-4, 1e-5)),
    # BAS stage at epoch 0 (zeta 0.75): batch shaping over a padded batch's 50 examples.
    "bas_64_padded": (Phase.BAS, 0, 64, [50], (1.5e-3, 1.5e-4)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_default_step_matches_the_reference_step(case, cifar_mini_dir, bas_checkpoint, recorded):
    phase, epoch, batch_size, real_counts, (worst_tolerance, median_tolerance) = CASES[case]
    trainer, state, batches = make_run(cifar_mini_dir, bas_checkpoint, batch_size, epoch)
    fgc = phase != Phase.BAS
    weights = {"rho": 0.1, "zeta": 0.0, "kappa": 0.003} if fgc else {"rho": 0.0, "zeta": 0.75, "kappa": 0.0}
    dtypes = (torch.float64, torch.float32)

    for step, num_real in enumerate(real_counts):
        batch = padded(next(batches), num_real)
        references = references_at(trainer, state, dtypes, with_banks=fgc)  # the same start on both sides
        state, metrics = trainer.train_step(state, input_pipeline.to_global(batch, trainer.mesh), phase)
        metrics = jax.device_get(metrics)
        noise = [recorded["noise"][b][:num_real] for b in range(NUM_BLOCKS)]
        our_logits = [recorded["gate"][b][0][:num_real] for b in range(NUM_BLOCKS)]
        our_gates = [recorded["gate"][b][1][:num_real] for b in range(NUM_BLOCKS)]
        our_neighbours = {b: recorded["neighbours"][i][:num_real] for i, b in enumerate(trainer.fgc_blocks)} \
            if fgc else None
        real = {k: v[:num_real] for k, v in batch.items()}
        outputs = {dtype: run.step(real["image"].transpose(0, 3, 1, 2), real["label"], real["index"], noise,
                                   use_neighbours=True, gates=our_gates, neighbours=our_neighbours, **weights)
                   for dtype, run in references.items()}

        # The hard decisions: ours imposed on both references; where float64 would have
        # decided otherwise, a near-tie. The gate logits themselves are continuous.
        decisions = outputs[torch.float64][1]
        tau = trainer.config.model.tau
        logit_error = max(float(np.max(np.abs(ours - theirs))) for ours, theirs in zip(our_logits, decisions["logit"]))
        print(f"{case} step {step}: gate logits |fgc_jax - float64| worst {logit_error:.1e}")
        assert logit_error / tau <= GATE_TIE / 10  # so a gate can flip only where |y| is this small
        for dtype, (_, own) in outputs.items():
            flips, worst_y = gate_flips(our_gates, own["gate"], decisions["y"])
            changes, worst_gap = neighbour_changes(our_neighbours, own["neighbours"], decisions["similarity"]) \
                if fgc else (0, 0.0)
            print(f"{case} step {step}: decided otherwise by {'PyTorch float32' if dtype == torch.float32 else 'float64'}"
                  f": {flips} gates (worst |y| {worst_y:.1e}), {changes} neighbours (worst gap {worst_gap:.1e})")
            if dtype == torch.float64:
                assert flips <= MAX_FLIPS and worst_y <= GATE_TIE, (flips, worst_y)
                assert changes <= MAX_FLIPS and worst_gap <= NEIGHBOUR_TIE, (changes, worst_gap)

        # Every loss term, the loss and the pooled gate density (spec §6).
        want = outputs[torch.float64][0]
        names = ["cross_entropy", "l0", "loss", "gate_density"] + (["fgc"] if fgc else ["batch_shaping"])
        for name in names:
            np.testing.assert_allclose(metrics[name], want[name], rtol=2e-6, atol=1e-7,
                                       err_msg=f"{case} step {step}: {name}")

        # Gradients (the SGD momentum buffers: gradient + L2, plus the same start's buffer
        # after step 0), parameters, BN running statistics (the unbiased variance, spec §1), banks.
        trace = optax.tree_utils.tree_get(state.opt_state, "trace")
        ours = {**to_torch_names(trace), **to_torch_names(state.batch_stats)}
        ours_params = to_torch_names(state.params)
        ref = {dtype: {**run.momentum_buffers(),
                       **{k: v for k, v in run.state().items() if k.endswith(("running_mean", "running_var"))}}
               for dtype, run in references.items()}
        ref_params = {dtype: {k: v for k, v in run.state().items() if k in ours_params}
                      for dtype, run in references.items()}
        for what, mine, theirs in (("gradients and BN statistics", ours, ref),
                                   ("parameters", ours_params, ref_params)):
            err = relative_errors(mine, theirs[torch.float64])
            torch_err = relative_errors(theirs[torch.float32], theirs[torch.float64])
            ours_worst, ours_median = max(err.values()), float(np.median(list(err.values())))
            theirs_worst, theirs_median = max(torch_err.values()), float(np.median(list(torch_err.values())))
            print(f"{case} step {step} {what}: fgc_jax float32 worst {ours_worst:.2e} median {ours_median:.2e}"
                  f"; PyTorch float32 worst {theirs_worst:.2e} median {theirs_median:.2e}")
            scale = 10.0 if what == "parameters" else 1.0  # parameters move by lr * gradient
            assert ours_worst <= worst_tolerance / scale, (what, max(err, key=err.get))
            assert ours_median <= median_tolerance / scale, what
        for b, (feature_bank, gate_bank) in references[torch.float64].banks.items():
            for kind, bank in (("feature", feature_bank), ("gate", gate_bank)):
                np.testing.assert_allclose(np.asarray(state.banks[f"block_{b}"][kind])[:trainer.info.num_train],
                                           bank.numpy(), atol=2e-6, err_msg=f"{case}: {kind} bank {b}")

    if case == "fgc_64_padded":
        # Evaluation after training, from the same state: the running statistics decide the
        # deterministic gates 1[logit > 0]; float64 may differ only at a near-tie.
        images = next(batches)["image"][:64]
        logits, gate_outputs = trainer.eval_model.apply(
            {"params": state.params, "batch_stats": state.batch_stats}, images, train=False)
        reference = references_at(trainer, state, (torch.float64,), with_banks=False)[torch.float64]
        our_gates = [np.asarray(o.gate) for o in gate_outputs]
        want_logits, own_gates, gate_logits = reference.evaluate(images.transpose(0, 3, 1, 2), gates=our_gates)
        flips, worst_logit = gate_flips(our_gates, own_gates, gate_logits)
        print(f"{case} evaluation: {flips} gates decided otherwise by float64 (worst |logit| {worst_logit:.1e})")
        assert flips <= MAX_FLIPS and worst_logit <= GATE_TIE, (flips, worst_logit)
        np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=1e-4)


def fgc_stage_trainer(cifar_mini_dir, batch_size=32):
    config = resnet20_cifar.get_config()
    config.data.source, config.data.dir, config.batch_size = "cifar_bin", str(cifar_mini_dir), batch_size
    config.data.prefetch = 0
    loader = input_pipeline.TrainLoader(config, global_batch_size=batch_size)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    return Trainer(config, loader.info, mesh, loader.steps_per_epoch), loader


@pytest.mark.slow
def test_init_from_applies_the_absolute_epoch_learning_rate(cifar_mini_dir, bas_checkpoint):
    """Epochs are absolute (spec §3): from a BAS .pth, the lr drops at 300, 375 and 450.

    The lr is read off an actual update: after `init_from` the momentum is zero, so a gate
    parameter (no weight decay) moves by `-lr (1 + momentum) g`, g being the new momentum.
    Each step starts from the initialised state moved to the epoch, optimizer untouched,
    as a run that trained on from `init_from` holds it.
    """
    trainer, loader = fgc_stage_trainer(cifar_mini_dir)
    initial = jax.device_get(train.initialise_from(str(bas_checkpoint), trainer, trainer.create_state(seed=0)))
    assert int(initial.step) == 100 * loader.steps_per_epoch  # the FGC stage starts at epoch 100
    start_params = initial.params
    batch = input_pipeline.to_global(next(loader.batches()), trainer.mesh)
    for epoch, expected in ((299, 0.1), (300, 0.01), (375, 0.001), (450, 0.0001)):
        state = jax.device_put(initial.replace(step=np.int32(epoch * loader.steps_per_epoch)), trainer.shardings)
        state, metrics = trainer.train_step(state, batch, Phase.FGC_NEIGHBOURS)
        moved = np.asarray(state.params["layer3_2"]["gate"]["mlp"]["fc2"]["kernel"], np.float64) - \
            start_params["layer3_2"]["gate"]["mlp"]["fc2"]["kernel"]
        gradient = np.asarray(optax.tree_utils.tree_get(state.opt_state, "trace")["layer3_2"]["gate"]["mlp"]["fc2"]["kernel"],
                              np.float64)
        direction = (1 + trainer.config.optimizer.momentum) * gradient
        applied = -np.sum(moved * direction) / np.sum(direction ** 2)
        np.testing.assert_allclose(applied, expected, rtol=1e-3, err_msg=f"epoch {epoch}")
        np.testing.assert_allclose(metrics["learning_rate"], expected, rtol=1e-6)


def reference_fgc_checkpoint(bas_checkpoint, path, blocks=("layer3.1", "layer3.2"), rows=5085, epoch=250):
    """The released BAS .pth turned into an FGC-stage one: banks as the reference saves them (spec §6),
    and the script's arguments beside them (an argparse.Namespace, as training scripts often save)."""
    checkpoint = torch.load(bas_checkpoint, map_location="cpu", weights_only=True)
    rng = np.random.default_rng(0)
    banks = {}
    for block in blocks:
        for name in ("feat_mb", "gate_mb"):
            bank = rng.normal(size=(rows, 64))
            banks[f"{block}.gate.{name}.memory"] = torch.as_tensor(bank / np.linalg.norm(bank, axis=1, keepdims=True),
                                                                   dtype=torch.float32)
        banks[f"{block}.gate.gate_mb.params"] = torch.tensor([0.07, 0.5])
    checkpoint["state_dict"] = {**checkpoint["state_dict"], **banks}
    checkpoint["epoch"] = epoch
    checkpoint["args"] = argparse.Namespace(arch="resnet20", lr=0.1, epochs=500, fgc_blocks=list(blocks))
    torch.save(checkpoint, path)
    return banks


def test_reference_fgc_checkpoint_brings_its_banks_and_epoch(cifar_mini_dir, bas_checkpoint, tmp_path):
    path = tmp_path / "fgc_epoch250.pth"
    banks = reference_fgc_checkpoint(bas_checkpoint, path)
    trainer, loader = fgc_stage_trainer(cifar_mini_dir)
    state = train.initialise_from(str(path), trainer, trainer.create_state(seed=0))
    assert int(state.step) == 250 * loader.steps_per_epoch
    for block, ours in (("layer3.1", "block_7"), ("layer3.2", "block_8")):
        for name, kind in (("feat_mb", "feature"), ("gate_mb", "gate")):
            np.testing.assert_array_equal(np.asarray(state.banks[ours][kind])[:5085],
                                          banks[f"{block}.gate.{name}.memory"].numpy())
    # The model itself is the released one: the banks are not taken for model tensors.
    released = torch_import.load_torch_checkpoint(bas_checkpoint, {"params": state.params,
                                                                   "batch_stats": state.batch_stats})
    for a, b in zip(jax.tree.leaves(released), jax.tree.leaves({"params": state.params,
                                                                "batch_stats": state.batch_stats})):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("blocks, rows, message", [
    (("layer3.1", "layer3.2"), 5000, r"\(5000, 64\).*5085 training examples"),
    (("layer3.0", "layer3.1"), 5085, r"blocks \[6, 7\].*names blocks \[7, 8\]"),
])
def test_reference_banks_that_do_not_fit_are_refused(cifar_mini_dir, bas_checkpoint, tmp_path, blocks, rows,
                                                     message):
    path = tmp_path / "foreign.pth"
    reference_fgc_checkpoint(bas_checkpoint, path, blocks=blocks, rows=rows)
    trainer, _ = fgc_stage_trainer(cifar_mini_dir)
    with pytest.raises(ValueError, match=message):
        train.initialise_from(str(path), trainer, trainer.create_state(seed=0))
