"""XLA compiler options for the compiled train and eval steps of a run.

`config.cpu_compiler_options` holds XLA debug options (name -> value, as `XLA_FLAGS` would
set them) that apply to this run's own `jax.jit` steps when the backend is CPU, and to
nothing on GPU/TPU. They tune XLA:CPU without touching the process-wide `XLA_FLAGS`, so a
library user's other computations keep XLA's defaults. An option that the installed
jaxlib does not know fails at the first compilation with XLA's message naming it.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections


def compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """The options to pass to `jax.jit(..., compiler_options=...)`; None means XLA's defaults."""
    if jax.default_backend() != "cpu":
        return None
    options = {name: value for name, value in (config.get("cpu_compiler_options", None) or {}).items()
               if value != ""}  # '' keeps XLA's default
    return options or None
