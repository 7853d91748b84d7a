"""`python -m fgc_jax.evaluate`: evaluate a checkpoint and write its report and pictures.

    python -m fgc_jax.evaluate --config=configs/resnet20_cifar.py --workdir=DIR [--step=N]
    python -m fgc_jax.evaluate --config=configs/resnet20_cifar.py --torch_checkpoint=model.pth \
        [--output_dir=DIR]

writes `eval_report.json`, `per_example.npz` and PNG pictures (gate density per block,
class x channel mean gates of the FGC blocks, per-example MACs histogram) to the output
directory, and prints a summary. The evaluation itself is `fgc_jax.evaluation`.
"""
from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: a Ctrl-C during them is one line too
    from fgc_jax import preemption
    preemption.print_interrupts_in_one_line()

import json
from typing import Any, Mapping, Sequence

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fgc_jax import alignment, cli, data_parallel, input_pipeline, macs, storage
from fgc_jax.evaluation import EvaluationError, evaluate_model
from fgc_jax.models import resolve_blocks
from fgc_jax.models.description import model_name
from fgc_jax.variables import load_variables

ALIGNMENT_KS = (5, 10, 50)
REPORT_NAME = "eval_report.json"


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _subset(n: int, limit: int) -> np.ndarray:
    """At most `limit` evenly spaced example positions out of n (all if limit <= 0)."""
    if limit <= 0 or n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def run_evaluation(config: ml_collections.ConfigDict, output_dir: str, *, workdir: str = "",
                   step: int | None = None, torch_checkpoint: str = "",
                   alignment_max_examples: int = 10000) -> dict[str, Any]:
    """Loads a checkpoint, evaluates it, writes report, per-example arrays and pictures; returns the report."""
    from fgc_jax import plots  # pylint: disable=import-outside-toplevel
    from fgc_jax.models import create_model  # pylint: disable=import-outside-toplevel

    if bool(workdir) == bool(torch_checkpoint):
        raise EvaluationError("give exactly one of --workdir (our checkpoints) or --torch_checkpoint")
    image_shape, num_classes = input_pipeline.input_spec(config)  # static: checkpoint errors come first
    model = create_model(config.model, num_classes, compute_dtype=config.compute_dtype)
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)),
                                                 train=False))
    variables, source = load_variables(config, template, workdir=workdir, step=step,
                                       torch_checkpoint=torch_checkpoint)
    try:
        info = input_pipeline.dataset_info(config)
    except (FileNotFoundError, ValueError) as e:
        raise EvaluationError(f"the {config.dataset} test data is not available: {e}") from e
    if (tuple(info.image_shape), info.num_classes) != (tuple(image_shape), num_classes):
        raise EvaluationError(f"the data gives {info.image_shape} images of {info.num_classes} classes, "
                              f"the model expects {image_shape} and {num_classes}")
    cost = macs.cost_model(model, image_shape)
    mesh = data_parallel.make_mesh()
    if config.eval_batch_size % jax.device_count():
        raise EvaluationError(f"config.eval_batch_size={config.eval_batch_size} is not a multiple of "
                              f"the {jax.device_count()} devices")
    logging.info("Evaluating %s from %s on %d %s test examples", model_name(config), source,
                 info.num_test, config.dataset)
    report = evaluate_model(model, variables, config, mesh, cost, collect=True)
    per = report.pop("per_example")
    fgc_blocks = resolve_blocks(config.fgc.blocks, cost.num_blocks) if cost.num_blocks else []

    out = storage.path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / REPORT_NAME
    if jax.process_index() == 0 and report_path.exists():
        report_path.unlink()  # until the new one is whole: none of the files below is trusted
    pictures = []
    if cost.num_blocks:
        keep = _subset(report["num_examples"], alignment_max_examples)
        report["alignment"] = alignment.alignment_report(
            [f[keep] for f in per["feature"]], [_sigmoid(a[keep]) for a in per["log_alpha"]],
            per["label"][keep],
            ALIGNMENT_KS, fgc_blocks)
        pictures.append(plots.block_density(
            report["block_density"], str(out / "block_density.png"), fgc_blocks,
            f"{model_name(config)}: gate density per block"))
        for b in fgc_blocks:
            pictures.append(plots.class_channel_heatmap(
                per["gate"][b], per["label"], info.num_classes,
                str(out / f"class_channel_gates_block{b}.png"),
                f"block {b} (FGC): mean gate per class and channel"))
    pictures.append(plots.macs_histogram(per["macs"], cost.dense_macs,
                                         str(out / "macs_histogram.png"),
                                         f"{model_name(config)}: per-example MACs"))
    report.update({"model": model_name(config), "source": source, "fgc_blocks": fgc_blocks,
                   "cost": cost.summary(), "pictures": [storage.path(p).name for p in pictures]})
    if jax.process_index() == 0:
        arrays = {k: per[k] for k in ("label", "prediction", "correct1", "correct5", "macs", "density")}
        for b in range(cost.num_blocks):
            arrays[f"log_alpha_{b}"] = per["log_alpha"][b]
            arrays[f"feature_{b}"] = per["feature"][b]
        storage.write_with(out / "per_example.npz", lambda f: np.savez_compressed(f, **arrays))
        # The report last, and whole (storage writes replace a file whole): an evaluation stopped
        # part-way (Ctrl-C, a kill) leaves none, so `compare` never reads half an evaluation.
        storage.write_text(report_path, json.dumps(report, indent=2))
    return report


def format_summary(report: Mapping[str, Any]) -> str:
    """A few lines: accuracy, MACs, pruning ratio, densities and alignment."""
    p = report["macs_percentiles"]
    lines = [
        f"{report.get('model', 'model')} from {report.get('source', '?')}",
        f"  examples       {report['num_examples']}",
        f"  top-1 / top-5  {100 * report['top1']:.2f}% / {100 * report['top5']:.2f}%",
        f"  mean MACs      {report['mean_macs'] / 1e6:.3f}M of {report['dense_macs'] / 1e6:.3f}M dense "
        f"(+{report['head_macs']:,} head = {report['total_macs'] / 1e6:.3f}M)",
        f"  pruning ratio  {100 * report['pruning_ratio']:.2f}%",
        f"  MACs p5/p50/p95 {p['p5'] / 1e6:.3f}M / {p['p50'] / 1e6:.3f}M / {p['p95'] / 1e6:.3f}M",
        "  block density  " + " ".join(f"{d:.2f}" for d in report["block_density"]),
    ]
    if "alignment" in report:
        al = report["alignment"]
        ks = al["ks"]
        lines.append(f"  feature-gate kNN overlap on {al['num_examples']} examples (chance "
                     + ", ".join(f"@{k} {al['chance_overlap'][str(k)]:.3f}" for k in ks) + "):")
        for blk in al["blocks"]:
            lines.append(f"    block {blk['block']}{' (FGC)' if blk['fgc'] else '      '} "
                         + " ".join(f"@{k} {blk['overlap'][str(k)]:.3f}" for k in ks)
                         + f"  class consistency@{al['consistency_k']} gate "
                         f"{blk['class_consistency_gate']:.3f} feature {blk['class_consistency_feature']:.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    output_dir = f.output_dir
    if not output_dir:
        if f.workdir:
            output_dir = str(storage.path(f.workdir) / "eval")
        else:
            output_dir = "eval_" + storage.path(f.torch_checkpoint).stem
    for location, role in ((f.workdir, "--workdir"), (output_dir, "--output_dir")):
        if location:
            storage.check_usable(location, role)
    report = run_evaluation(f.config, output_dir, workdir=f.workdir, step=f.step,
                            torch_checkpoint=f.torch_checkpoint,
                            alignment_max_examples=f.alignment_max_examples)
    print(format_summary(report))
    print(f"report and pictures in {storage.display(output_dir)}: {REPORT_NAME}, "
          + ", ".join(report["pictures"]))


if __name__ == "__main__":
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("workdir", "", "Training workdir whose checkpoint to evaluate.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("torch_checkpoint", "", "A PyTorch .pth of the reference instead of --workdir "
                        "(one whose pickle names code is refused unless --config.trust_pickled_code=True).")
    flags.DEFINE_string("output_dir", "", "Where to write the report and pictures "
                        "(default: WORKDIR/eval or ./eval_<checkpoint name>).")
    flags.DEFINE_integer("alignment_max_examples", 10000,
                         "Alignment uses at most this many evenly spaced test examples (0: all).")
    flags.mark_flags_as_required(["config"])
    cli.run(main, user_errors=(EvaluationError,))
