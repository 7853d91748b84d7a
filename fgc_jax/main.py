"""Trains FGC: `python -m fgc_jax.main --config=configs/resnet56_cifar.py --workdir=DIR`.

Flags only; the work is `train.train_and_evaluate`. Config fields can be overridden with
`--config.field=value` (e.g. `--config.fgc.k=100`); unknown fields are rejected. Errors the
user can fix print one `error: ...` line and exit with status 2 (`fgc_jax.cli`).
"""
from fgc_jax import cpu_workarounds, preemption

# Before anything expensive: from here on SIGTERM and Ctrl-C stop the run cleanly instead of killing it.
preemption.print_interrupts_in_one_line()
_PREEMPTION = preemption.PreemptionFlag()
if __name__ == "__main__" and not _PREEMPTION.raised_here():  # a SIGTERM'd run is not restarted
    # On CPU hosts only (fgc_jax/cpu_workarounds.py), before the imports below: the restarted
    # process would otherwise import JAX, Flax and the trainer a second time.
    cpu_workarounds.restart_for_cpu()

# pylint: disable=wrong-import-position
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import jax  # noqa: E402

from fgc_jax import cli, console, distributed, host_memory, train  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for checkpoints, metrics and logs; "
                    "a run resumes from the latest checkpoint found there.")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 in a multi-process run "
                    "(default: $JAX_COORDINATOR_ADDRESS, else JAX's cluster detection: Cloud TPU, "
                    "SLURM, Open MPI).")
flags.DEFINE_integer("num_processes", 0, "Processes in a multi-process run (default: $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", -1, "This process's rank (default: $JAX_PROCESS_ID).")
flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for the coordinator before failing.")
flags.DEFINE_enum("cpu_collectives", "", ["", "gloo", "mpi"],
                  "Cross-process collectives for CPU devices (multi-process runs on CPU).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _PREEMPTION.raised_here():
        logging.warning("SIGTERM before the run started: nothing to do")
        return
    if note := host_memory.restart_note():
        logging.info("%s", note)
    # Every process's start-up lines show; once the process index is known, INFO only on process 0.
    console_filter = console.install(process_index=0)
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           FLAGS.distributed_timeout, FLAGS.cpu_collectives)
    console_filter.process_index = jax.process_index()
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir, preemption=_PREEMPTION)


if __name__ == "__main__":
    # Processes that cannot be joined (wrong address, mismatched counts) are set-up errors too.
    cli.run(main, user_errors=(distributed.DistributedStartupError,))
