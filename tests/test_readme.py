"""The README's library example runs as written."""
import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_example_runs():
    section = README.read_text().split("## Using the pieces in your own Flax model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    match = re.search(r"loss (\S+), gates on: (\S+)", result.stdout)
    assert match, result.stdout
    loss, density = float(match.group(1)), float(match.group(2))
    # Cross-entropy of 10 classes at initialisation is near log(10); L0 adds about 0.4 * 0.5.
    assert 1.5 < loss < 6.0
    assert 0.0 < density < 1.0
