"""Multi-process start-up with JAX's own distributed runtime.

A run is multi-process when the flags name a coordinator, when the environment says so
(`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`), or when JAX's cluster
detection recognises a multi-host Cloud TPU slice or a SLURM job with several tasks.
Otherwise nothing is initialised and the run uses the local devices alone.
"""
from __future__ import annotations

import os

import jax
from absl import logging

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _detected_cluster() -> bool:
    """Whether JAX's cluster detection sees a multi-process job (TPU pod, SLURM, Open MPI)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    return os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               timeout_seconds: int = 300, cpu_collectives: str = "") -> None:
    """Calls `jax.distributed.initialize` when the run spans several processes.

    Explicit arguments win over the environment, which wins over cluster detection. The
    coordinator is waited for at most `timeout_seconds`, then the start fails with a
    message instead of hanging. `cpu_collectives='gloo'` enables cross-process
    collectives on CPU devices (tests on one machine).
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR, "")
    num_processes = num_processes or int(os.environ.get(ENV_NUM_PROCESSES, "0"))
    if process_id < 0:
        process_id = int(os.environ.get(ENV_PROCESS_ID, "-1"))
    explicit = bool(coordinator_address)
    if not explicit and not _detected_cluster():
        return
    if explicit and (num_processes < 1 or not 0 <= process_id < num_processes):
        raise ValueError(f"a multi-process run needs num_processes >= 1 and 0 <= process_id < "
                         f"num_processes; got num_processes={num_processes}, process_id={process_id} "
                         f"(flags --num_processes/--process_id or ${ENV_NUM_PROCESSES}/${ENV_PROCESS_ID})")
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs = dict(initialization_timeout=timeout_seconds)
    if explicit:
        kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # the runtime raises several types for an unreachable coordinator
        raise RuntimeError(
            f"could not join the distributed run (coordinator {coordinator_address or 'auto-detected'}, "
            f"process {process_id} of {num_processes}) within {timeout_seconds}s: {e}. Check that the "
            "coordinator process is running and its address and port are reachable from this host") from e
    logging.info("Process %d of %d; %d local and %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
