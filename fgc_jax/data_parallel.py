"""The data-parallel layout of training and evaluation: one mesh axis over every device.

Batches are split along `AXIS`, memory banks are sharded by rows along it, and
parameters are replicated.
"""
from __future__ import annotations

import jax

AXIS = "data"


def make_mesh() -> jax.sharding.Mesh:
    """A one-axis mesh (`AXIS`) over all devices of all processes."""
    return jax.make_mesh((jax.device_count(),), (AXIS,))
