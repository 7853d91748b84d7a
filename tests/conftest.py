"""Test set-up: eight virtual CPU devices, so sharded code runs as on an 8-chip host.

`JAX_PLATFORMS=cuda` (benchmarks/device_check.py) runs the tests on a GPU instead: there,
float32 matmuls and convolutions run at 'highest' precision (the tests check the maths
against NumPy, not TF32's rounding), tests marked `needs_devices(n)` skip where fewer
devices exist, and tests marked `needs_cpu` (of XLA:CPU's own figures) skip on other backends.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Many tests build the same small programs; compile each once per test session.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="fgc_jax_test_xla_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
if os.environ["JAX_PLATFORMS"] != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_devices(n): skipped where JAX has fewer than n devices")
    config.addinivalue_line("markers", "needs_cpu: tests of XLA:CPU's own figures, skipped on other backends")


def pytest_runtest_setup(item):
    needs = item.get_closest_marker("needs_devices")
    if needs and jax.device_count() < needs.args[0]:
        pytest.skip(f"needs {needs.args[0]} devices, {jax.default_backend()} has {jax.device_count()}")
    if item.get_closest_marker("needs_cpu") and jax.default_backend() != "cpu":
        pytest.skip(f"tests XLA:CPU's figures; the backend is {jax.default_backend()}")

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
CIFAR_MINI = SHARED / "data" / "cifar10-mini" / "cifar-10-batches-bin"
BAS_CHECKPOINT = SHARED / "weights" / "resnet20_bas_epoch100.pth"


@pytest.fixture
def cifar_mini_dir():
    """The real CIFAR-10 subset in ../shared; the test is skipped where it is absent."""
    if not CIFAR_MINI.is_dir():
        pytest.skip(f"{CIFAR_MINI} not found (../shared is absent)")
    return CIFAR_MINI


@pytest.fixture
def bas_checkpoint():
    """The authors' released BAS-stage ResNet-20; the test is skipped where it is absent."""
    if not BAS_CHECKPOINT.is_file():
        pytest.skip(f"{BAS_CHECKPOINT} not found (../shared is absent)")
    return BAS_CHECKPOINT
