"""The sharded train step: 1 device and 8 devices agree, and each phase does what it says."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import resnet20_cifar
from fgc_jax import input_pipeline, schedules
from fgc_jax.schedules import Phase
from fgc_jax.train import Trainer

NUM_TRAIN = 96
BATCH = 16


def tiny_config(**overrides):
    config = resnet20_cifar.get_config()
    config.model.depth = 8
    config.batch_size = BATCH
    config.eval_batch_size = BATCH
    config.fgc.k = 5
    config.bas.epochs = 1
    config.fgc.warmup_epochs = 1
    config.num_epochs = 4
    config.update_from_flattened_dict(overrides)
    return config


INFO = input_pipeline.DatasetInfo(name="synthetic", num_train=NUM_TRAIN, num_test=16, num_classes=10,
                                  image_shape=(8, 8, 3))


def synthetic_batches(num_steps, pad_last=True):
    """Random batches; with `pad_last`, the last one is an epoch's last batch: 11 examples
    padded to 16."""
    rng = np.random.default_rng(0)
    for step in range(num_steps):
        num_real = 11 if pad_last and step == num_steps - 1 else BATCH
        mask = np.arange(BATCH) < num_real
        yield {"image": np.where(mask[:, None, None, None], rng.normal(size=(BATCH, 8, 8, 3)), 0.0
                                 ).astype(np.float32),
               "label": np.where(mask, rng.integers(0, 10, BATCH), 0).astype(np.int32),
               "index": np.where(mask, rng.permutation(NUM_TRAIN)[:BATCH], -1).astype(np.int32),
               "mask": mask}


def run_steps(config, num_devices, phases, pad_last=True, with_mask=True):
    mesh = jax.make_mesh((num_devices,), ("data",), devices=jax.devices()[:num_devices])
    trainer = Trainer(config, INFO, mesh, steps_per_epoch=NUM_TRAIN // BATCH)
    state = trainer.create_state(seed=0)
    sharding = NamedSharding(mesh, P("data"))
    history = []
    for phase, batch in zip(phases, synthetic_batches(len(phases), pad_last)):
        batch = {k: jax.device_put(v, sharding) for k, v in batch.items() if with_mask or k != "mask"}
        state, metrics = trainer.train_step(state, batch, phase)
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


def assert_trees_close(a, b, atol):
    flat_a, tree_a = jax.tree.flatten_with_path(a)
    flat_b, _ = jax.tree.flatten_with_path(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), (_, y) in zip(flat_a, flat_b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape:  # banks are padded to a multiple of the device count
            rows = min(x.shape[0], y.shape[0])
            x, y = x[:rows], y[:rows]
        np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


PHASES = [Phase.BAS, Phase.BAS, Phase.FGC_INSTANCE, Phase.FGC_NEIGHBOURS, Phase.FGC_NEIGHBOURS]


@pytest.mark.slow
@pytest.mark.needs_devices(8)
@pytest.mark.parametrize("sync_batch_norm", [True, False])
def test_one_and_eight_devices_agree(sync_batch_norm):
    """Same global batches through every phase -> same losses, params, BN stats, banks.

    The last batch is padded (11 of 16 examples, padding on 3 of the 8 devices): masking does not
    depend on how the batch is split.

    With `sync_batch_norm=False` each device normalises with its own 2-example statistics,
    so there the two runs must differ (while staying finite): the switch really switches.
    """
    config = tiny_config(sync_batch_norm=sync_batch_norm)
    phases = PHASES if sync_batch_norm else PHASES[:2]
    one, history_one = run_steps(config, 1, phases)
    eight, history_eight = run_steps(config, 8, phases)
    if not sync_batch_norm:
        assert np.isfinite([h["loss"] for h in history_eight]).all()
        assert not np.allclose(history_one[-1]["loss"], history_eight[-1]["loss"], atol=1e-4)
        return
    for h1, h8 in zip(history_one, history_eight):
        assert set(h1) == set(h8)
        for name in h1:
            np.testing.assert_allclose(h8[name], h1[name], atol=2e-5, rtol=1e-5, err_msg=name)
    assert_trees_close(one.params, eight.params, atol=2e-5)
    assert_trees_close(one.batch_stats, eight.batch_stats, atol=2e-5)
    assert_trees_close(one.banks, eight.banks, atol=2e-5)
    assert "fgc" in history_one[-1] and "batch_shaping" in history_one[0]


@pytest.mark.needs_devices(8)
def test_a_batch_without_mask_is_all_real():
    """Library callers may leave out `mask`: on a sharded batch that trains as an all-True mask."""
    config = tiny_config()
    phases = [Phase.BAS, Phase.FGC_NEIGHBOURS]
    masked, history_masked = run_steps(config, 8, phases, pad_last=False)
    unmasked, history_unmasked = run_steps(config, 8, phases, pad_last=False, with_mask=False)
    for h1, h2 in zip(history_masked, history_unmasked):
        for name in h1:
            np.testing.assert_allclose(h2[name], h1[name], atol=1e-6, rtol=1e-6, err_msg=name)
    assert_trees_close(masked.params, unmasked.params, atol=1e-6)
    assert_trees_close(masked.banks, unmasked.banks, atol=1e-6)


def test_weights_follow_the_spec_schedule():
    config = resnet20_cifar.get_config()
    for epoch, zeta, rho, kappa in [(0, 0.75, 0.0, 0.0), (50, 0.375, 0.0, 0.0), (99, 0.0075, 0.0, 0.0),
                                    (100, 0.0, 0.0, 0.003), (200, 0.0, 0.2, 0.003),
                                    (300, 0.0, 0.4, 0.003), (499, 0.0, 0.4, 0.003)]:
        w = schedules.loss_weights(config, jnp.asarray(epoch))
        np.testing.assert_allclose([w["zeta"], w["rho"], w["kappa"]], [zeta, rho, kappa], atol=1e-7)
    assert schedules.phase(config, 99) == Phase.BAS
    assert schedules.phase(config, 100) == Phase.FGC_INSTANCE
    assert schedules.phase(config, 119) == Phase.FGC_INSTANCE
    assert schedules.phase(config, 120) == Phase.FGC_NEIGHBOURS
    lr = schedules.learning_rate(config, steps_per_epoch=10)
    np.testing.assert_allclose([lr(2999), lr(3000), lr(3750), lr(4500)], [0.1, 0.01, 0.001, 0.0001],
                               rtol=1e-6)
