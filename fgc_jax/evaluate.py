"""Evaluation: accuracy, dynamic MACs (FGC_SPEC §4), gate statistics and feature-gate alignment.

Library: `evaluate_model(model, variables, config, mesh, cost)` runs the eval-mode network
over the test split (global batches sharded over the mesh's 'data' axis, the padded last
batch masked out exactly) and returns per-test-set numbers, every one of them a mean or
percentile over examples, never over batches.

Program:

    python -m fgc_jax.evaluate --config=configs/resnet20_cifar.py --workdir=DIR [--step=N]
    python -m fgc_jax.evaluate --config=configs/resnet20_cifar.py --torch_checkpoint=model.pth \
        [--output_dir=DIR]

writes `eval_report.json`, `per_example.npz` and PNG pictures (gate density per block,
class x channel mean gates of the FGC blocks, per-example MACs histogram) to the output
directory, and prints a summary.
"""
from __future__ import annotations

import functools
import json
import os
import re
import time
from typing import Any, Mapping, Sequence

from absl import app, flags, logging
from flax import traverse_util
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from fgc_jax import alignment, checkpointing, cli, compilation, input_pipeline, macs

AXIS = "data"
ALIGNMENT_KS = (5, 10, 50)
REPORT_NAME = "eval_report.json"


class EvaluationError(RuntimeError):
    """Evaluation cannot run as asked (wrong checkpoint, missing data, ...); the message says why."""


# ----------------------------------------------------------------------------
# Evaluation over the test split.
# ----------------------------------------------------------------------------


def macs_percentiles(values: np.ndarray, percentiles: Sequence[int] = (5, 50, 95)) -> dict[str, float]:
    """{'p5', 'p50', 'p95'} of per-example MACs (NumPy's linear interpolation)."""
    quantiles = np.percentile(np.asarray(values, np.float64), percentiles)
    return {f"p{p}": float(v) for p, v in zip(percentiles, quantiles)}


def resolve_blocks(blocks: Sequence[int], num_blocks: int) -> list[int]:
    """Block indices with negative ones counted from the end (as `config.fgc.blocks`)."""
    out = []
    for b in blocks:
        if not -num_blocks <= b < num_blocks:
            raise ValueError(f"fgc.blocks names block {b}, but the model has {num_blocks} gated blocks "
                             f"(valid: {-num_blocks}..{num_blocks - 1})")
        out.append(b % num_blocks)
    return sorted(set(out))


@functools.lru_cache(maxsize=8)
def _eval_step(model, mesh: jax.sharding.Mesh, collect: bool):
    """A jitted eval forward pass returning per-example outputs, replicated on every device."""
    replicated = NamedSharding(mesh, P())

    def step(variables, batch):
        logits, gate_outputs = model.apply(variables, batch["image"], train=False)
        logits = logits.astype(jnp.float32)
        labels = batch["label"]
        _, top = jax.lax.top_k(logits, min(5, logits.shape[-1]))
        prediction = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if gate_outputs:
            density = jnp.stack([jnp.mean(o.gate.astype(jnp.float32), axis=-1) for o in gate_outputs], -1)
        else:
            density = jnp.zeros((logits.shape[0], 0), jnp.float32)
        out = {"mask": batch["mask"], "label": labels, "prediction": prediction,
               "correct1": prediction == labels, "correct5": jnp.any(top == labels[:, None], axis=-1),
               "density": density}
        if collect:
            out["feature"] = tuple(o.feature.astype(jnp.float32) for o in gate_outputs)
            out["log_alpha"] = tuple(o.log_alpha.astype(jnp.float32) for o in gate_outputs)
            out["gate"] = tuple(o.gate > 0.5 for o in gate_outputs)
        return out

    return jax.jit(step, out_shardings=replicated)


def evaluate_model(model, variables: Mapping[str, Any], config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh, cost: macs.CostModel, *, collect: bool = False
                   ) -> dict[str, Any]:
    """Evaluates `model` (eval mode) with `variables` on the test split of `config.dataset`.

    Global batches of `config.eval_batch_size` are sharded over `mesh`'s 'data' axis;
    variables are replicated. Returns (Python numbers and lists):
      num_examples, top1, top5 (fractions), mean_macs (dynamic, spec §4), dense_macs,
      gate_macs, head_macs, total_macs (= mean_macs + head_macs), pruning_ratio
      (1 - mean_macs / dense_macs), block_density (per gated block, mean fraction of
      gates on), gate_density (fraction of all gate channels on), macs_percentiles
      {p5, p50, p95} over per-example MACs, seconds.
    With `collect=True` the result also holds 'per_example': NumPy arrays over the test
    examples in order — label, prediction, correct1, correct5, macs, density
    [N, blocks], and per gated block lists feature, log_alpha (float32) and gate (bool).
    """
    start = time.perf_counter()
    step = _eval_step(model, mesh, collect)
    variables = jax.device_put({"params": variables["params"],
                                "batch_stats": variables.get("batch_stats", {})},
                               NamedSharding(mesh, P()))
    parts: list[dict[str, Any]] = []

    def fetch(out) -> None:
        out = jax.device_get(out)
        mask = np.asarray(out.pop("mask"), bool)
        parts.append(jax.tree.map(lambda x: np.asarray(x)[mask], out))

    pending = None
    for local in input_pipeline.eval_batches(config, global_batch_size=config.eval_batch_size):
        with compilation.matmul_precision(config):
            out = step(variables, input_pipeline.to_global(local, mesh, AXIS))
        if pending is not None:
            fetch(pending)  # overlaps the host transfer with the next batch's computation
        pending = out
    if pending is not None:
        fetch(pending)
    if not parts:
        raise EvaluationError(f"the {config.dataset} test split yielded no batches")
    per = jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts)

    num = len(per["label"])
    if num == 0:
        raise EvaluationError(f"the {config.dataset} test split holds no examples")
    density = per["density"].astype(np.float64)
    if density.shape[1] != cost.num_blocks:
        raise ValueError(f"the model has {density.shape[1]} gated blocks but the cost model "
                         f"{cost.num_blocks}; build both from the same model")
    example_macs = (macs.macs_from_density(cost, density) if cost.num_blocks
                    else np.full(num, float(cost.dense_macs)))
    mean_macs = float(np.mean(example_macs))
    channels = np.array([layer.out_shape[-1] for layer in cost.layers if layer.kind == "conv1"
                         and layer.block is not None], np.float64)
    report: dict[str, Any] = {
        "num_examples": int(num),
        "top1": float(np.mean(per["correct1"])),
        "top5": float(np.mean(per["correct5"])),
        "mean_macs": mean_macs,
        "dense_macs": int(cost.dense_macs),
        "gate_macs": int(cost.gate_macs),
        "head_macs": int(cost.head_macs),
        "total_macs": mean_macs + cost.head_macs,
        "pruning_ratio": macs.pruning_ratio(cost, mean_macs),
        "gate_density": float(density.mean(0) @ channels / channels.sum()) if cost.num_blocks else 1.0,
        "block_density": [float(d) for d in density.mean(axis=0)],
        "macs_percentiles": macs_percentiles(example_macs),
        "seconds": time.perf_counter() - start,
    }
    if collect:
        per["macs"] = example_macs
        per["feature"], per["log_alpha"], per["gate"] = (list(per[k]) for k in ("feature", "log_alpha", "gate"))
        report["per_example"] = per
    return report


# ----------------------------------------------------------------------------
# Loading checkpoints, with errors that name the checkpoint's architecture.
# ----------------------------------------------------------------------------


def _describe(num_blocks: int, gated: bool, stem_kernel: int | None, num_classes: int | None) -> str:
    family = "ImageNet" if stem_kernel == 7 else "CIFAR"
    depth = 2 * num_blocks + 2  # BasicBlock ResNets: 2 convs a block + stem + classifier
    text = f"{'gated' if gated else 'ungated'} {family} ResNet-{depth} ({num_blocks} blocks"
    return text + (f", {num_classes} classes)" if num_classes else ")")


def describe_flax_params(params: Mapping[str, Any]) -> str:
    """A guess at the architecture of a Flax params tree of ours, e.g. 'gated CIFAR ResNet-32 (...)'."""
    blocks = [k for k in params if re.fullmatch(r"layer\d+_\d+", str(k))]
    gated = any("gate" in params[k] for k in blocks)
    stem = params.get("conv1", {}).get("kernel")
    head = params.get("linear", {}).get("kernel")
    return _describe(len(blocks), gated, None if stem is None else int(np.shape(stem)[0]),
                     None if head is None else int(np.shape(head)[-1]))


def describe_torch_state_dict(state_dict: Mapping[str, Any]) -> str:
    """A guess at the architecture of a PyTorch (reference / torchvision) ResNet state_dict."""
    keys = [k.removeprefix("module.") for k in state_dict]
    blocks = {m.group(1) for k in keys if (m := re.fullmatch(r"(layer\d+\.\d+)\.conv1\.weight", k))}
    gated = any(".gate." in k for k in keys)
    stem = next((v for k, v in state_dict.items() if k.removeprefix("module.") == "conv1.weight"), None)
    head = next((v for k, v in state_dict.items()
                 if k.removeprefix("module.") in ("linear.weight", "fc.weight")), None)
    return _describe(len(blocks), gated, None if stem is None else int(tuple(stem.shape)[-1]),
                     None if head is None else int(tuple(head.shape)[0]))


def check_variables(variables: Mapping[str, Any], template: Mapping[str, Any], source: str,
                    expected: str) -> None:
    """Raises EvaluationError naming both architectures if the trees or shapes differ."""
    got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(dict(variables)).items()}
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(template)).items()}
    if got == want:
        return
    missing = sorted("/".join(map(str, k)) for k in want.keys() - got.keys())
    extra = sorted("/".join(map(str, k)) for k in got.keys() - want.keys())
    shapes = sorted(f"{'/'.join(map(str, k))}: {got[k]} vs {want[k]}"
                    for k in want.keys() & got.keys() if got[k] != want[k])
    detail = "; ".join(f"{title} {items[:3]}{' ...' if len(items) > 3 else ''}"
                       for title, items in (("missing", missing), ("unexpected", extra),
                                            ("shape (checkpoint vs model)", shapes)) if items)
    raise EvaluationError(
        f"{source} seems to hold a {describe_flax_params(variables.get('params', {}))}, but the "
        f"config builds a {expected}; pass the config it was trained with. ({detail})")


def load_variables(config: ml_collections.ConfigDict, template: Mapping[str, Any], *,
                   workdir: str = "", step: int | None = None, torch_checkpoint: str = ""
                   ) -> tuple[dict[str, Any], str]:
    """Variables from our checkpoint (`workdir`, `step`) or a PyTorch `.pth`; returns (variables, source)."""
    expected = macs.model_name(config)
    if torch_checkpoint:
        from fgc_jax import torch_import  # pylint: disable=import-outside-toplevel

        if not os.path.isfile(torch_checkpoint):
            raise EvaluationError(f"--torch_checkpoint={torch_checkpoint} is not a file")
        try:
            variables = torch_import.load_torch_checkpoint(torch_checkpoint, template)
        except ValueError as e:
            try:
                seems = describe_torch_state_dict(torch_import.read_torch_state_dict(torch_checkpoint))
            except Exception:  # pylint: disable=broad-except
                seems = "model that could not be identified"
            lines = str(e).splitlines()
            detail = "\n".join(lines[:6] + ([f"  ... and {len(lines) - 6} more"] if len(lines) > 6 else []))
            raise EvaluationError(
                f"{torch_checkpoint} seems to hold a {seems}, but the config builds a {expected}; "
                f"pass the matching --config (e.g. --config.model.depth=...).\n{detail}") from e
        return variables, os.path.abspath(torch_checkpoint)

    variables, restored_step = checkpointing.restore_model_variables(workdir, step)
    source = f"{os.path.abspath(os.path.join(workdir, 'checkpoints'))} step {restored_step}"
    check_variables(variables, template, source, expected)
    return variables, source


# ----------------------------------------------------------------------------
# The program.
# ----------------------------------------------------------------------------


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
    mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
    if config.eval_batch_size % jax.device_count():
        raise EvaluationError(f"config.eval_batch_size={config.eval_batch_size} is not a multiple of "
                              f"the {jax.device_count()} devices")
    logging.info("Evaluating %s from %s on %d %s test examples", macs.model_name(config), source,
                 info.num_test, config.dataset)
    report = evaluate_model(model, variables, config, mesh, cost, collect=True)
    per = report.pop("per_example")
    fgc_blocks = resolve_blocks(config.fgc.blocks, cost.num_blocks) if cost.num_blocks else []

    os.makedirs(output_dir, exist_ok=True)
    pictures = []
    if cost.num_blocks:
        keep = _subset(report["num_examples"], alignment_max_examples)
        report["alignment"] = alignment.alignment_report(
            [f[keep] for f in per["feature"]], [_sigmoid(a[keep]) for a in per["log_alpha"]],
            per["label"][keep],
            ALIGNMENT_KS, fgc_blocks)
        pictures.append(plots.block_density(
            report["block_density"], os.path.join(output_dir, "block_density.png"), fgc_blocks,
            f"{macs.model_name(config)}: gate density per block"))
        for b in fgc_blocks:
            pictures.append(plots.class_channel_heatmap(
                per["gate"][b], per["label"], info.num_classes,
                os.path.join(output_dir, f"class_channel_gates_block{b}.png"),
                f"block {b} (FGC): mean gate per class and channel"))
    pictures.append(plots.macs_histogram(per["macs"], cost.dense_macs,
                                         os.path.join(output_dir, "macs_histogram.png"),
                                         f"{macs.model_name(config)}: per-example MACs"))
    report.update({"model": macs.model_name(config), "source": source, "fgc_blocks": fgc_blocks,
                   "cost": cost.summary(), "pictures": [os.path.basename(p) for p in pictures]})
    if jax.process_index() == 0:
        with open(os.path.join(output_dir, REPORT_NAME), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        arrays = {k: per[k] for k in ("label", "prediction", "correct1", "correct5", "macs", "density")}
        for b in range(cost.num_blocks):
            arrays[f"log_alpha_{b}"] = per["log_alpha"][b]
            arrays[f"feature_{b}"] = per["feature"][b]
        np.savez_compressed(os.path.join(output_dir, "per_example.npz"), **arrays)
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
            output_dir = os.path.join(f.workdir, "eval")
        else:
            output_dir = "eval_" + os.path.splitext(os.path.basename(f.torch_checkpoint))[0]
    report = run_evaluation(f.config, output_dir, workdir=f.workdir, step=f.step,
                            torch_checkpoint=f.torch_checkpoint,
                            alignment_max_examples=f.alignment_max_examples)
    print(format_summary(report))
    print(f"report and pictures in {os.path.abspath(output_dir)}: {REPORT_NAME}, "
          + ", ".join(report["pictures"]))


if __name__ == "__main__":
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("workdir", "", "Training workdir whose checkpoint to evaluate.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("torch_checkpoint", "", "A PyTorch .pth of the reference instead of --workdir.")
    flags.DEFINE_string("output_dir", "", "Where to write the report and pictures "
                        "(default: WORKDIR/eval or ./eval_<checkpoint name>).")
    flags.DEFINE_integer("alignment_max_examples", 10000,
                         "Alignment uses at most this many evenly spaced test examples (0: all).")
    flags.mark_flags_as_required(["config"])
    cli.run(main, user_errors=(EvaluationError,))
