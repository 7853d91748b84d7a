"""Prints the cost accounting (MACs, parameters; FGC_SPEC §4) of the network a config builds.

    python -m fgc_jax.cost --config=configs/resnet20_cifar.py          # per-layer table
    python -m fgc_jax.cost --config=configs/resnet20_cifar.py --json   # one JSON object
    python -m fgc_jax.cost --config=configs/resnet18_imagenet.py --plan --devices=8,32,64,256

`--plan` compiles the real train step on each device count (virtual CPU devices; this
command restarts itself with as many as the largest count) and prints each device's memory
and FLOPs, and which accelerators hold it (`fgc_jax.plan`). Flags only; the accounting is
`fgc_jax.macs` and `fgc_jax.plan`.
"""
if __name__ == "__main__":  # before the heavy imports: a Ctrl-C during them is one line too
    from fgc_jax import preemption
    preemption.print_interrupts_in_one_line()

import dataclasses
import json
import os
import re
import sys
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

from fgc_jax import cli, config_check, input_pipeline, plan
from fgc_jax.macs import cost_model, format_table
from fgc_jax.models import create_model
from fgc_jax.models.description import model_name

config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
flags.DEFINE_bool("plan", False, "Compile the train step on each of --devices and print memory and "
                  "FLOPs per device (fgc_jax.plan).")
flags.DEFINE_list("devices", ["8"], "--plan: device counts.")
flags.DEFINE_list("bank_dtypes", ["float32", "bfloat16"], "--plan: config.fgc.bank_dtype values.")
flags.DEFINE_integer("rows", None, "--plan: training rows (default: the dataset's standard train split).")
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
flags.mark_flags_as_required(["config"])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = flags.FLAGS.config
    if flags.FLAGS.plan:
        _plan(config)
        return
    shape, num_classes = input_pipeline.input_spec(config)  # no data needed
    cost = cost_model(create_model(config.model, num_classes), shape)
    if flags.FLAGS.json:
        out = {"model": model_name(config), **cost.summary(),
               "layers": [dataclasses.asdict(layer) for layer in cost.layers]}
        print(json.dumps(out))
    else:
        print(format_table(cost, f"{model_name(config)}, input {'x'.join(map(str, cost.input_shape))}"))


def _restart_with_cpu_devices(count: int) -> None:
    """Re-executes this command on `count` virtual CPU devices unless it already runs on them
    (XLA reads the count only when its CPU backend starts, which has not happened yet)."""
    xla_flags = os.environ.get("XLA_FLAGS", "")
    match = re.search(_DEVICE_COUNT_FLAG + r"=(\d+)", xla_flags)
    if os.environ.get("JAX_PLATFORMS") == "cpu" and match and int(match.group(1)) >= count:
        return
    xla_flags = re.sub(_DEVICE_COUNT_FLAG + r"=\d+", "", xla_flags)
    environ = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"{xla_flags} {_DEVICE_COUNT_FLAG}={count}".strip()}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), environ)


def _plan(config) -> None:
    try:
        devices = [int(n) for n in flags.FLAGS.devices]
    except ValueError as e:
        raise ValueError(f"--devices={','.join(flags.FLAGS.devices)}: expected device counts such as "
                         "8,32,64,256") from e
    if not devices or min(devices) < 1:
        raise ValueError(f"--devices={','.join(flags.FLAGS.devices)}: each count must be at least 1")
    if flags.FLAGS.rows is not None and flags.FLAGS.rows < 1:
        raise ValueError(f"--rows={flags.FLAGS.rows}: must be at least 1")
    # Every check that needs no compilation, before the restart.
    info = input_pipeline.nominal_info(config, flags.FLAGS.rows)
    for n in devices:
        config_check.check_against_data(config, info, n)
    _restart_with_cpu_devices(max(devices))
    plans = plan.plan(config, devices, flags.FLAGS.bank_dtypes, flags.FLAGS.rows)
    if flags.FLAGS.json:
        print(json.dumps({"model": model_name(config), "global_batch": config.batch_size,
                          "plans": [p.as_dict() for p in plans]}))
    else:
        print(plan.format_plan(plans, f"{model_name(config)}, global batch {config.batch_size} "
                                      f"({config.batch_size}/devices per device), {info.num_train:,} "
                                      "bank rows"))


if __name__ == "__main__":
    cli.run(main)
