"""Numerics and XLA compiler options for the compiled train and eval steps of a run.

`config.matmul_precision` is the precision of float32 matrix products and convolutions in
those steps (`jax.default_matmul_precision`, applied while they are traced). The default,
'highest', computes them in float32 on every backend, as the reference does; XLA's own
'default' uses TF32 on recent NVIDIA GPUs and bfloat16 passes on TPUs, which is faster
and moves results beyond the reference's float32 error.

`config.cpu_compiler_options` holds XLA debug options (name -> value, as `XLA_FLAGS` would
set them) that apply to this run's own `jax.jit` steps when the backend is CPU, and to
nothing on GPU/TPU. They tune XLA:CPU without touching the process-wide `XLA_FLAGS`, so a
library user's other computations keep XLA's defaults. An option that the installed
jaxlib does not know fails at the first compilation with XLA's message naming it.
"""
from __future__ import annotations

from typing import Any, ContextManager

import jax
import ml_collections


def compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """The options to pass to `jax.jit(..., compiler_options=...)`; None means XLA's defaults."""
    if jax.default_backend() != "cpu":
        return None
    options = {name: value for name, value in (config.get("cpu_compiler_options", None) or {}).items()
               if value != ""}  # '' keeps XLA's default
    return options or None


MATMUL_PRECISIONS = ("highest", "float32", "high", "tensorfloat32", "bfloat16_3x", "default", "bfloat16")


def matmul_precision(config: ml_collections.ConfigDict) -> ContextManager[None]:
    """Context under which this run's steps are traced (and so compiled)."""
    return jax.default_matmul_precision(config.matmul_precision)
