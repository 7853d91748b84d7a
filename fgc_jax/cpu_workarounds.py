"""XLA:CPU workarounds: the one place where a training run adapts itself to CPU devices.

Library modules (models, gates, losses, banks) hold no backend checks: each workaround is an
explicit option of theirs, off by default, that gives the same results either way. The
trainer (`fgc_jax.train`) turns them on for a mesh of CPU devices, registers JAX's unrolled
Threefry lowering for CPU (`unrolled_threefry`, a process-wide switch), and `fgc_jax.main`
restarts itself with the malloc setting only when the run will use CPU devices; GPU and TPU
runs get none of them. A user who trains our modules on CPU from their own script can pass
the same options. Each one's A/B measurement: docs/performance.md.
"""
from __future__ import annotations

import importlib.metadata
import os
from typing import TYPE_CHECKING, Any, Mapping

from fgc_jax import host_memory

if TYPE_CHECKING:  # imports nothing heavy: `fgc_jax.main` restarts before importing JAX
    import jax

# Transparent huge pages for glibc's large allocations: XLA:CPU allocates a step's
# temporaries afresh on every execution, which otherwise page-faults them in 4 KiB at a time.
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"
_ACCELERATOR_PLUGINS = ("jax-cuda", "jax-rocm", "libtpu")  # distribution-name prefixes


def on_cpu(mesh: jax.sharding.Mesh) -> bool:
    """Whether `mesh` is made of CPU devices."""
    return mesh.devices.flat[0].platform == "cpu"


def model_options(mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """`create_model` options for `mesh`: on CPU, float32 training computes each convolution's
    input into a buffer of its own (`GatedBasicBlock.materialise_conv_inputs`), so that
    XLA:CPU does not re-evaluate the element-wise chain producing it inside the transpose of
    the convolution's weight gradient."""
    return {"materialise_conv_inputs": on_cpu(mesh)}


def knn_routing(mesh: jax.sharding.Mesh) -> str:
    """`fgc_contrastive_loss(knn_routing=...)` for `mesh`: on CPU an all-gather, because an
    `all_to_all` consumer makes XLA:CPU replace the shard's top_k by a full sort."""
    return "all_gather" if on_cpu(mesh) else "all_to_all"


def batch_shaping_series_loop(mesh: jax.sharding.Mesh) -> bool:
    """`batch_shaping_loss(series_loop=...)` for `mesh`: on CPU the Beta CDF's series is summed
    in loops (the same bits, a fraction of the compile time; see `losses.beta_cdf`)."""
    return on_cpu(mesh)


def unrolled_threefry(mesh: jax.sharding.Mesh) -> None:
    """On CPU meshes, lowers Threefry-2x32 (the hash behind every `jax.random` draw) for CPU
    with JAX's unrolled rule, the one its other platforms use, as JAX does itself from
    jax-ml/jax#37872 on. Before that, its CPU rule ran the 20 rounds as a 5-iteration loop,
    which XLA:CPU compiled 6-12x slower on a 2-core AVX2 host (0.85-2.2 s per draw against
    0.15-0.17 s), and a model's initialisation draws once per parameter. The same 20 rounds, so the same bits
    (tests/test_cpu_workarounds.py). It acts on the whole process (a lowering rule is
    global) and only on programs compiled after it; CPU only."""
    if not on_cpu(mesh):
        return
    from jax._src.random import threefry2x32  # JAX's own lowering rules: private, hence the guard
    from jax.interpreters import mlir

    rule = getattr(threefry2x32, "_threefry2x32_lowering_rule", None)
    if rule is not None:
        mlir.register_lowering(threefry2x32.threefry2x32_p, rule, platform="cpu", inline=False)


def will_run_on_cpu(environ: Mapping[str, str]) -> bool:
    """Whether JAX will use CPU devices, decided without starting a backend (none may start
    before `jax.distributed.initialize`): the first entry of JAX_PLATFORMS where it is set,
    else whether no accelerator plugin (jax-cuda*, jax-rocm*, libtpu) is installed."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    names = {(dist.metadata["Name"] or "").lower().replace("_", "-")
             for dist in importlib.metadata.distributions()}
    return not any(name.startswith(prefix) for name in names for prefix in _ACCELERATOR_PLUGINS)


def restart_for_cpu(environ: Mapping[str, str] | None = None) -> None:
    """Restarts this process once with `MALLOC_TUNABLES` (`host_memory.reexec_with`) when the
    run will use CPU devices; returns at once on GPU/TPU hosts. Call it first in an entry point."""
    environ = os.environ if environ is None else environ
    if will_run_on_cpu(environ):
        host_memory.reexec_with(MALLOC_TUNABLES, environ=environ)
