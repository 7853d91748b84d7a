"""Numerics of the compiled train and eval steps of a run.

`config.matmul_precision` is the precision of float32 matrix products and convolutions in
those steps (`jax.default_matmul_precision`, applied while they are traced). The default,
'highest', computes them in float32 on every backend, as the reference does; XLA's own
'default' uses TF32 on recent NVIDIA GPUs and bfloat16 passes on TPUs, which is faster
and moves results beyond the reference's float32 error.
"""
from __future__ import annotations

from typing import ContextManager

import jax
import ml_collections


MATMUL_PRECISIONS = ("highest", "float32", "high", "tensorfloat32", "bfloat16_3x", "default", "bfloat16")


def matmul_precision(config: ml_collections.ConfigDict) -> ContextManager[None]:
    """Context under which this run's steps are traced (and so compiled)."""
    return jax.default_matmul_precision(config.matmul_precision)
