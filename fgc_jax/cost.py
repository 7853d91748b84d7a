"""Prints the cost accounting (MACs, parameters; FGC_SPEC §4) of the network a config builds.

    python -m fgc_jax.cost --config=configs/resnet20_cifar.py          # per-layer table
    python -m fgc_jax.cost --config=configs/resnet20_cifar.py --json   # one JSON object

Flags only; the accounting is `fgc_jax.macs`.
"""
if __name__ == "__main__":  # before the heavy imports: a Ctrl-C during them is one line too
    from fgc_jax import preemption
    preemption.print_interrupts_in_one_line()

import dataclasses
import json
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

from fgc_jax import cli, input_pipeline
from fgc_jax.macs import cost_model, format_table
from fgc_jax.models import create_model
from fgc_jax.models.description import model_name

config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
flags.mark_flags_as_required(["config"])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = flags.FLAGS.config
    shape, num_classes = input_pipeline.input_spec(config)  # no data needed
    cost = cost_model(create_model(config.model, num_classes), shape)
    if flags.FLAGS.json:
        out = {"model": model_name(config), **cost.summary(),
               "layers": [dataclasses.asdict(layer) for layer in cost.layers]}
        print(json.dumps(out))
    else:
        print(format_table(cost, f"{model_name(config)}, input {'x'.join(map(str, cost.input_shape))}"))


if __name__ == "__main__":
    cli.run(main)
