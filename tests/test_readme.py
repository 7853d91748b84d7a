"""The README's code runs as written and prints the figures the README shows.

Blocks that need hardware or hours (full training runs, TPU/SLURM launches) are covered
elsewhere: the quickstart and the test command run in tests/test_training.py and CI, the
launch scripts in tests/test_launch.py and tests/test_scale_out.py.
"""
import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def section(title: str) -> str:
    """The README's text from heading `title` to the next heading of the same level."""
    text = README.read_text()
    level = "#" * (len(title) - len(title.lstrip("#")))
    body = text.split(title + "\n", 1)[1]
    return re.split(rf"\n{level} ", body, maxsplit=1)[0]


def code_blocks(text: str, language: str = "") -> list[str]:
    """The fenced blocks of `text` opened with ```language (plain ``` for language '')."""
    blocks, lines, inside, wanted = [], [], False, False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            if inside and wanted:
                blocks.append("".join(lines))
            inside = not inside
            wanted = inside and line.strip() == "```" + language
            lines = []
        elif inside:
            lines.append(line)
    return blocks


def commands(block: str) -> list[list[str]]:
    """The shell commands of a bash block: continuations joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


def run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """A README command (compiling through the session's cache, conftest.py: test_evaluate runs the
    same programs)."""
    if argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_readme_library_example_runs():
    code = code_blocks(section("## Using the pieces in your own Flax model"), "python")[0]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    match = re.search(r"loss (\S+), gates on: (\S+)", result.stdout)
    assert match, result.stdout
    loss, density = float(match.group(1)), float(match.group(2))
    # Cross-entropy of 10 classes at initialisation is near log(10); L0 adds about 0.4 * 0.5.
    assert 1.5 < loss < 6.0
    assert 0.0 < density < 1.0


def test_cost_commands_print_the_spec_figures_quoted():
    text = section("## Cost accounting")
    table, as_json = commands(code_blocks(text, "bash")[0])
    result = run(table)
    assert result.returncode == 0, result.stderr
    assert "40,550,400" in result.stdout or "40550400" in result.stdout, result.stdout
    result = run(as_json)
    assert result.returncode == 0, result.stderr
    cost = json.loads(result.stdout)
    # "ResNet-20/32/56: 40,550,400 / ... dense MACs, 9,984 / ... gate MACs, 269,722 / ... backbone
    # and 10,608 / ... gate parameters": the first figure of each list is ResNet-20's.
    quoted = [int(m.replace(",", "")) for m in re.findall(r"([\d,]+) /", text.split("ResNet-20/32/56:", 1)[1])[::2]]
    assert [cost["dense_macs"], cost["gate_macs"], cost["backbone_params"], cost["gate_params"]] == quoted[:4]


def test_evaluation_of_the_released_checkpoint_prints_the_figures_shown(tmp_path, cifar_mini_dir, bas_checkpoint):
    pytest.importorskip("torch")
    text = section("## Evaluation and analysis")
    command = next(c for c in commands(code_blocks(text, "bash")[0]) if any("--torch_checkpoint" in a for a in c))
    command = [f"--output_dir={tmp_path}" if a.startswith("--output_dir=") else a for a in command]
    result = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    shown = [line.strip() for line in code_blocks(text)[0].splitlines()]  # the README's sample
    printed = [line.strip() for line in result.stdout.splitlines()]
    for line in shown:
        assert line in printed, (line, result.stdout)


def test_torch_import_example_runs_as_written(bas_checkpoint):
    pytest.importorskip("torch")
    code = code_blocks(section("## Importing PyTorch FGC/BAS checkpoints"), "python")[0]
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shape, densities = result.stdout.strip().split(" ", 2)[:2], result.stdout.strip().split("[", 1)[1]
    assert " ".join(shape) == "(8, 10)"
    # The released BAS network keeps about two thirds of each early block's channels on.
    assert all(0.3 < float(d) < 0.95 for d in densities.rstrip("]").split(","))
