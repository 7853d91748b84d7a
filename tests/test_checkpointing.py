"""Checkpoint retention and restore errors, on a tiny state."""
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart
from fgc_jax import checkpointing


def test_keeps_the_latest_k_and_the_best(tmp_path):
    config = quickstart.get_config()
    config.keep_checkpoints = 2
    top1 = {10: 0.5, 20: 0.9, 30: 0.6, 40: None, 50: 0.7}
    manager = checkpointing.create_manager(str(tmp_path), config)
    for step, accuracy in top1.items():
        state = {"params": {"w": jnp.full((3,), step, jnp.float32)}, "batch_stats": {}}
        metrics = None if accuracy is None else {"top1": accuracy}
        checkpointing.save(manager, step, state, {"model": checkpointing.model_identity(config)}, metrics)
    manager.wait_until_finished()
    assert sorted(manager.all_steps()) == [20, 40, 50]  # best (0.9) + the two latest
    manager.close()

    variables, step = checkpointing.restore_model_variables(str(tmp_path))
    assert step == 50
    np.testing.assert_array_equal(variables["params"]["w"], [50, 50, 50])
    variables, _ = checkpointing.restore_model_variables(str(tmp_path), step=20)
    np.testing.assert_array_equal(variables["params"]["w"], [20, 20, 20])
    with pytest.raises(FileNotFoundError, match="available steps: \\[20, 40, 50\\]"):
        checkpointing.restore_model_variables(str(tmp_path), step=30)


def test_a_workdir_without_checkpoints_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoints"):
        checkpointing.restore_model_variables(str(tmp_path))
