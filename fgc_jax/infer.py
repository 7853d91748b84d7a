"""`python -m fgc_jax.infer`: a trained gated model's skipping and slimmed programs.

    python -m fgc_jax.infer --config=configs/resnet20_cifar.py --workdir=DIR [--step=N]
    python -m fgc_jax.infer --config=configs/resnet20_cifar.py --torch_checkpoint=model.pth \
        [--export=DIR] [--benchmark] [--calibration_split=train|test]

checks the skipping program (`fgc_jax.skipping`) against the masked evaluation model on the
first `--check_examples` test images at batch 1 (logits, gate decisions), slims the network
(channels off for every example of the calibration split removed) and reports how many
channels go and how often the slimmed network's predictions agree with the gated model's
on the test split; `--export=DIR` writes the batch-1 skipping program with `jax.export`;
`--benchmark` times the dense, masked, skipping and slimmed programs on test images
(`fgc_jax.inference_benchmark`).
"""
from __future__ import annotations

from typing import Any, Sequence

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fgc_jax import cli, input_pipeline, macs, skipping
from fgc_jax import inference_benchmark as ib
from fgc_jax.evaluation import EvaluationError
from fgc_jax.models.description import model_name
from fgc_jax.variables import load_variables


def _batches(config: ml_collections.ConfigDict, train_split: bool, batch: int):
    for b in input_pipeline.eval_batches(config, global_batch_size=batch, process_index=0,
                                         process_count=1, train_split=train_split):
        yield b["image"], b["mask"]


def run_inference(config: ml_collections.ConfigDict, *, workdir: str = "", step: int | None = None,
                  torch_checkpoint: str = "", calibration_split: str = "train", check_examples: int = 64,
                  export_dir: str = "", benchmark: bool = False, batches: Sequence[int] = (1, 8, 32),
                  rounds: int = 5) -> tuple[dict[str, Any], list[ib.Row]]:
    """Loads the model, checks, slims, optionally exports and times; returns (report, rows)."""
    from fgc_jax.models import create_model  # pylint: disable=import-outside-toplevel

    if bool(workdir) == bool(torch_checkpoint):
        raise EvaluationError("give exactly one of --workdir (our checkpoints) or --torch_checkpoint")
    if calibration_split not in ("train", "test"):
        raise EvaluationError(f"--calibration_split={calibration_split!r}: choose 'train' or 'test'")
    if not config.model.gated:
        raise EvaluationError("config.model.gated is False: an ungated network has no channels to skip")
    if config.compute_dtype != "float32":
        raise EvaluationError(f"compute_dtype={config.compute_dtype!r}: the skipping program runs float32; "
                              "pass --config.compute_dtype=float32")
    image_shape, num_classes = input_pipeline.input_spec(config)
    model = create_model(config.model, num_classes)
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False))
    variables, source = load_variables(config, template, workdir=workdir, step=step,
                                       torch_checkpoint=torch_checkpoint)
    variables = jax.tree.map(np.asarray, variables)
    try:
        input_pipeline.dataset_info(config)
    except (FileNotFoundError, ValueError) as e:
        raise EvaluationError(f"the {config.dataset} data is not available: {e}") from e

    arch = skipping.Architecture.of(model)
    params = skipping.fold_variables(arch, variables)
    program = skipping.skipping_program(arch)
    masked = jax.jit(lambda x: model.apply(variables, x, train=False))
    batch = config.eval_batch_size

    # 1. The skipping program at batch 1 against the masked model.
    run = skipping.bind(program, params)
    x, m = next(_batches(config, False, max(check_examples, 1)))
    check_images = x[m][:check_examples]
    max_diff, differing_gates, near_threshold = 0.0, 0, 0
    for x in check_images:
        logits, gates = run(x[None])
        want, outputs = masked(x[None])
        max_diff = max(max_diff, float(np.max(np.abs(np.asarray(logits) - np.asarray(want)))))
        for out, g in zip(outputs, gates):
            differing_gates += int(np.sum(np.asarray(out.gate) != np.asarray(g)))
            near_threshold += int(np.sum(np.abs(np.asarray(out.log_alpha)) < 1e-4))

    # 2. Calibration and the slimmed network.
    keep = skipping.ever_active(program, params, _batches(config, calibration_split == "train", batch))
    slimmed = skipping.slim_params(arch, params, keep)
    slim_run = jax.jit(skipping.dense_program(arch))
    agree = total = 0
    for x, m in _batches(config, False, batch):
        want, _ = masked(x)
        got, _ = slim_run(slimmed, x)
        agree += int(np.sum((np.argmax(want, -1) == np.argmax(got, -1))[m]))
        total += int(m.sum())
    channels = [int(k.size) for k in keep]
    removed = [int((~k).sum()) for k in keep]
    report = {
        "model": model_name(config), "source": source,
        "check": {"examples": len(check_images), "max_logit_difference": max_diff,
                  "differing_gates": differing_gates, "gates_within_1e-4_of_threshold": near_threshold},
        "slimmed": {"calibration_split": calibration_split, "channels_removed": removed,
                    "channels": channels, "test_examples": total,
                    "prediction_agreement": agree / max(total, 1)},
    }
    if export_dir:
        report["export"] = skipping.export_program(program, params, (1, *image_shape), export_dir)

    rows: list[ib.Row] = []
    if benchmark:
        cost = macs.cost_model(model, image_shape)
        x, m = next(_batches(config, False, max(batches)))
        images = x[m]
        programs = ib.model_programs(model, variables, keep)
        slim_bound = ib.mac_bound(cost, np.array([[1 - r / c for r, c in zip(removed, channels)]]),
                                  with_gates=False)
        for b in batches:
            x = jnp.asarray(images[:b])
            density = macs.block_density([np.asarray(o.gate) for o in masked(x)[1]])
            bound = ib.mac_bound(cost, density)
            bounds = {"dense": 1.0, "masked": bound, "skipping": bound, "slimmed": slim_bound}
            times = ib.time_interleaved({k: (lambda f=f: f(x)) for k, f in programs.items()}, rounds, 0.2)
            rows += [ib.Row(model_name(config), b, round(float(density.mean()), 2), k, t, bounds[k])
                     for k, t in times.items()]
        ib.add_speedups(rows)
    return report, rows


def format_report(report: dict[str, Any]) -> str:
    c, s = report["check"], report["slimmed"]
    lines = [
        f"{report['model']} from {report['source']}",
        f"  skipping vs masked on {c['examples']} test images at batch 1: max |logit difference| "
        f"{c['max_logit_difference']:.2e}, {c['differing_gates']} differing gate decisions "
        f"({c['gates_within_1e-4_of_threshold']} gates within 1e-4 of the threshold)",
        f"  slimmed on the {s['calibration_split']} split: {sum(s['channels_removed'])} of "
        f"{sum(s['channels'])} gated channels removed (per block "
        + " ".join(f"{r}/{n}" for r, n in zip(s["channels_removed"], s["channels"])) + ")",
        f"  slimmed vs gated predictions on {s['test_examples']} test examples: "
        f"{100 * s['prediction_agreement']:.2f}% agree",
    ]
    if "export" in report:
        lines.append(f"  batch-1 skipping program exported to {report['export']}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:
        batches = [int(b) for b in f.batches]
    except ValueError as e:
        raise app.UsageError(f"--batches must be integers, got {f.batches}") from e
    report, rows = run_inference(
        f.config, workdir=f.workdir, step=f.step, torch_checkpoint=f.torch_checkpoint,
        calibration_split=f.calibration_split, check_examples=f.check_examples, export_dir=f.export,
        benchmark=f.benchmark, batches=batches, rounds=f.rounds)
    print(format_report(report))
    if rows:
        print(ib.format_table(rows))


if __name__ == "__main__":
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("workdir", "", "Training workdir whose checkpoint to load.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("torch_checkpoint", "", "A PyTorch .pth of the reference instead of --workdir.")
    flags.DEFINE_string("export", "", "Directory to write the batch-1 skipping program to (jax.export).")
    flags.DEFINE_bool("benchmark", False, "Time the dense, masked, skipping and slimmed programs.")
    flags.DEFINE_string("calibration_split", "train", "Split whose never-active channels are slimmed away.")
    flags.DEFINE_integer("check_examples", 64, "Test images on which skipping is checked against masked.")
    flags.DEFINE_list("batches", ["1", "8", "32"], "Batch sizes for --benchmark.")
    flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds for --benchmark (median reported).")
    flags.mark_flags_as_required(["config"])
    cli.run(main, user_errors=(EvaluationError,))
