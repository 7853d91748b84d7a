"""Compare evaluated runs: a table and the accuracy-vs-MACs plane.

    python -m fgc_jax.compare DIR1 DIR2 ... [--output=plane.png]

Each DIR is an output directory of `python -m fgc_jax.evaluate` (it holds
`eval_report.json`; a training workdir whose `eval/` subdirectory holds one works too).
"""
from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: a Ctrl-C during them is one line too
    from fgc_jax import preemption
    preemption.print_interrupts_in_one_line()

import json
from typing import Any, Sequence

from absl import app, flags

from fgc_jax import storage

REPORT_NAME = "eval_report.json"  # as fgc_jax.evaluate writes it


def read_report(path: str) -> dict[str, Any]:
    """The eval report in `path` (a report file, an eval output dir, or a workdir with eval/);
    a local path or a gs:// URL."""
    storage.check_usable(path, "run directory")
    given = storage.path(path)
    for candidate in (given, given / REPORT_NAME, given / "eval" / REPORT_NAME):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text(encoding="utf-8"))  # data only
            except ValueError as e:
                raise ValueError(f"{candidate} is not an eval report (JSON) of fgc_jax.evaluate: "
                                 f"{e}") from e
    raise FileNotFoundError(f"no {REPORT_NAME} in {path} (nor in {given / 'eval'}); "
                            "run `python -m fgc_jax.evaluate ... --output_dir=DIR` first")


def run_name(path: str) -> str:
    """The run's directory name: `path` without a trailing report file name or eval/."""
    given = storage.path(path)
    if given.name == REPORT_NAME:
        given = given.parent
    if given.name == "eval":
        given = given.parent
    return given.name or str(given)


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
        storage.check_usable(flags.FLAGS.output, "--output")
        from fgc_jax import plots  # pylint: disable=import-outside-toplevel

        path = plots.accuracy_macs_plane(names, [r["mean_macs"] for r in reports],
                                         [r["top1"] for r in reports], flags.FLAGS.output,
                                         dense_macs=[r["dense_macs"] for r in reports])
        print(f"accuracy-vs-MACs plane: {storage.display(path)}")


if __name__ == "__main__":
    flags.DEFINE_string("output", "accuracy_vs_macs.png", "Where to draw the plane ('' for none).")
    from fgc_jax import cli

    cli.run(main)
