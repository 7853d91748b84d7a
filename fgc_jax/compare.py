"""Compare evaluated runs: a table and the accuracy-vs-MACs plane.

    python -m fgc_jax.compare DIR1 DIR2 ... [--output=plane.png]

Each DIR is an output directory of `python -m fgc_jax.evaluate` (it holds
`eval_report.json`; a training workdir whose `eval/` subdirectory holds one works too).
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import app, flags

REPORT_NAME = "eval_report.json"  # as fgc_jax.evaluate writes it


def read_report(path: str) -> dict[str, Any]:
    """The eval report in `path` (a report file, an eval output dir, or a workdir with eval/)."""
    for candidate in (path, os.path.join(path, REPORT_NAME), os.path.join(path, "eval", REPORT_NAME)):
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as f:
                try:
                    return json.load(f)  # data only: JSON builds dicts, lists, strings and numbers
                except ValueError as e:
                    raise ValueError(f"{candidate} is not an eval report (JSON) of fgc_jax.evaluate: "
                                     f"{e}") from e
    raise FileNotFoundError(f"no {REPORT_NAME} in {path} (nor in {os.path.join(path, 'eval')}); "
                            "run `python -m fgc_jax.evaluate ... --output_dir=DIR` first")


def run_name(path: str) -> str:
    path = os.path.normpath(path)
    if os.path.basename(path) in (REPORT_NAME,):
        path = os.path.dirname(path)
    if os.path.basename(path) == "eval":
        path = os.path.dirname(path)
    return os.path.basename(path) or path


def format_table(names: Sequence[str], reports: Sequence[dict[str, Any]]) -> str:
    rows = [("run", "model", "top1 %", "MACs (M)", "dense (M)", "pruning %", "examples")]
    for name, r in zip(names, reports):
        rows.append((name, r.get("model", "?"), f"{100 * r['top1']:.2f}", f"{r['mean_macs'] / 1e6:.3f}",
                     f"{r['dense_macs'] / 1e6:.3f}", f"{100 * r['pruning_ratio']:.2f}",
                     str(r["num_examples"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    dirs = argv[1:]
    if not dirs:
        raise app.UsageError("give one or more evaluation output directories")
    reports = [read_report(d) for d in dirs]
    names = [run_name(d) for d in dirs]
    print(format_table(names, reports))
    if flags.FLAGS.output:
        from fgc_jax import plots  # pylint: disable=import-outside-toplevel

        path = plots.accuracy_macs_plane(names, [r["mean_macs"] for r in reports],
                                         [r["top1"] for r in reports], flags.FLAGS.output,
                                         dense_macs=[r["dense_macs"] for r in reports])
        print(f"accuracy-vs-MACs plane: {os.path.abspath(path)}")


if __name__ == "__main__":
    flags.DEFINE_string("output", "accuracy_vs_macs.png", "Where to draw the plane ('' for none).")
    from fgc_jax import cli

    cli.run(main)
