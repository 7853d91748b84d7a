"""The CPU workarounds: applied by the trainer and `main` on CPU only, and exact.

glibc malloc tunables: merging, the one re-execution; which hosts restart; the trainer's
switches change no result."""
import functools
import json
import os
import pathlib
import platform
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fgc_jax import cpu_workarounds, host_memory
from fgc_jax.schedules import Phase
from fgc_jax.train import Trainer
from test_train_step import BATCH, INFO, NUM_TRAIN, synthetic_batches, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
HUGETLB = "glibc.malloc.hugetlb=1"
needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="GLIBC_TUNABLES is glibc's")


@pytest.mark.parametrize("current, expected", [
    ("", HUGETLB),
    ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:" + HUGETLB),
    ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0"),  # the user's own setting wins
    ("glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2", "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2"),
])
def test_merge_adds_only_the_names_not_already_set(current, expected):
    assert host_memory.merge(HUGETLB, current) == expected


@needs_glibc
def test_reexec_passes_the_merged_tunables_and_the_same_command_line():
    calls = []
    environ = {"PATH": "/bin", host_memory.ENV_VAR: "glibc.malloc.arena_max=2"}
    host_memory.reexec_with(HUGETLB, environ=environ, argv=["python", "-m", "x", "--flag"],
                            execve=lambda *args: calls.append(args))
    ((path, argv, env),) = calls
    assert (path, argv) == (sys.executable, ["python", "-m", "x", "--flag"])
    assert env["PATH"] == "/bin"
    assert env[host_memory.ENV_VAR] == "glibc.malloc.arena_max=2:" + HUGETLB
    # ... and the restarted process can still give a subprocess the environment from before.
    assert host_memory.environ_before_restart(env) == environ


@needs_glibc
def test_environment_before_a_restart_from_an_unset_variable():
    calls = []
    host_memory.reexec_with(HUGETLB, environ={"PATH": "/bin"}, argv=["python"],
                            execve=lambda *args: calls.append(args))
    ((_, _, env),) = calls
    assert env[host_memory.ENV_VAR] == HUGETLB
    assert host_memory.environ_before_restart(env) == {"PATH": "/bin"}
    assert host_memory.environ_before_restart({"PATH": "/bin"}) == {"PATH": "/bin"}  # never restarted


@pytest.mark.parametrize("wanted, current", [(HUGETLB, HUGETLB), (HUGETLB, "glibc.malloc.hugetlb=0"), ("", "")])
def test_no_reexec_when_nothing_is_missing(wanted, current):
    def fail(*args):
        raise AssertionError(f"re-executed with {args}")
    host_memory.reexec_with(wanted, environ={host_memory.ENV_VAR: current}, argv=["python"], execve=fail)


@needs_glibc
def test_a_process_restarts_exactly_once_with_the_tunables(tmp_path):
    script = ("import os; from fgc_jax import host_memory; "
              "print('started with', os.environ.get('GLIBC_TUNABLES'), os.getpid(), flush=True); "
              f"host_memory.reexec_with({HUGETLB!r})")
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV_VAR}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    (_, _, first, pid1), (_, _, second, pid2) = (line.split() for line in lines)
    assert (first, second) == ("None", HUGETLB)
    assert pid1 == pid2  # replaced in place: launchers and signals still see the same process


class _Dist:
    def __init__(self, name):
        self.metadata = {"Name": name}


@pytest.mark.parametrize("environ, installed, expected", [
    ({"JAX_PLATFORMS": "cpu"}, ["jax-cuda12-plugin"], True),  # the environment decides first
    ({"JAX_PLATFORMS": "cuda,cpu"}, [], False),
    ({"JAX_PLATFORMS": "tpu"}, [], False),
    ({}, ["jax", "jaxlib", "numpy"], True),
    ({}, ["jax", "jax_cuda13_plugin"], False),
    ({}, ["jax", "jax-rocm7-plugin"], False),
    ({}, ["jax", "libtpu"], False),
])
def test_cpu_hosts_are_told_from_gpu_and_tpu_hosts_without_starting_a_backend(monkeypatch, environ,
                                                                               installed, expected):
    monkeypatch.setattr(cpu_workarounds.importlib.metadata, "distributions",
                        lambda: [_Dist(name) for name in installed])
    assert cpu_workarounds.will_run_on_cpu(environ) is expected


@needs_glibc
@pytest.mark.parametrize("platforms, restarted", [("cpu", True), ("cuda", False), ("tpu", False)])
def test_main_restarts_with_the_malloc_tunables_on_cpu_hosts_only(platforms, restarted):
    script = ("import os; from fgc_jax import cpu_workarounds; "
              "print(os.getpid(), flush=True); cpu_workarounds.restart_for_cpu(); "
              "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), flush=True)")
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV_VAR}
    env["JAX_PLATFORMS"] = platforms
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")[:-1]
    # A restart runs the script again: its first line is printed twice.
    assert len(lines) == (3 if restarted else 2), result.stdout
    assert lines[-1].split()[1] == (HUGETLB if restarted else "None")


@needs_glibc
def test_main_restarts_before_importing_jax():
    """`python -m fgc_jax.main` restarts before its heavy imports: JAX is imported once, by the
    restarted process (-X importtime lists each process's imports; the restart keeps the option)."""
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV_VAR}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "fgc_jax.main", "--workdir=unused"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]  # --config is missing: a flag error, after the restart
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert imported.count("fgc_jax.cpu_workarounds") == 2, imported  # imported by both: restarted
    assert imported.count("jax") == 1


def _train_step_results(monkeypatch, cpu_workarounds_on: bool):
    """Two FGC k-NN steps of a depth-8 model on an 8-device CPU mesh, with the trainer's CPU
    switches on (as on CPU) or off (as on GPU/TPU): the jaxpr's dot count, losses, state."""
    monkeypatch.setattr(cpu_workarounds, "on_cpu", lambda mesh: cpu_workarounds_on)
    mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
    trainer = Trainer(tiny_config(), INFO, mesh, steps_per_epoch=NUM_TRAIN // BATCH)
    state = trainer.create_state(seed=0)
    sharding = NamedSharding(mesh, P("data"))
    losses = []
    for batch in synthetic_batches(2):
        batch = {k: jax.device_put(v, sharding) for k, v in batch.items()}
        if not losses:
            step = functools.partial(trainer._train_step, phase=Phase.FGC_NEIGHBOURS)  # pylint: disable=protected-access
            jaxpr = str(jax.make_jaxpr(step)(state, batch))
        state, metrics = trainer.train_step(state, batch, Phase.FGC_NEIGHBOURS)
        losses.append(float(metrics["loss"]))
    return jaxpr, losses, jax.device_get(state)


@pytest.mark.needs_devices(8)
def test_the_trainers_cpu_switches_change_the_program_but_not_the_results(monkeypatch):
    jaxpr_on, losses_on, state_on = _train_step_results(monkeypatch, True)
    jaxpr_off, losses_off, state_off = _train_step_results(monkeypatch, False)
    # On: an identity dot per convolution input and an all-gather routing of the k-NN
    # candidates; off: neither (the program a GPU/TPU run compiles).
    assert jaxpr_on.count("dot_general") > jaxpr_off.count("dot_general")
    assert "all_to_all" in jaxpr_off and "all_to_all" not in jaxpr_on
    np.testing.assert_allclose(losses_on, losses_off, rtol=1e-6)
    for (path, a), (_, b) in zip(jax.tree.flatten_with_path(state_on)[0], jax.tree.flatten_with_path(state_off)[0]):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=0,
                                   atol=1e-5, err_msg=jax.tree_util.keystr(path))


# Random123's known answers for Threefry-2x32 with 20 rounds (kat_vectors: key, counter -> output).
THREEFRY_KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]
THREEFRY_SCRIPT = """
import json, sys, types
import jax, jax.numpy as jnp, numpy as np
from jax.extend.random import threefry_2x32
from fgc_jax import cpu_workarounds

def draws():
    key = jax.random.key(7)
    fns = {"bits": lambda k: jax.random.bits(k, (64, 10)),
           "uniform": lambda k: jax.random.uniform(k, (3, 3, 16, 32)),
           "normal": lambda k: jax.random.normal(jax.random.fold_in(k, 3), (1000,)),
           "truncated_normal": lambda k: jax.random.truncated_normal(k, -2.0, 2.0, (5, 7)),
           "split": lambda k: jax.random.key_data(jax.random.split(k, 5))}
    return {name: np.asarray(jax.jit(fn)(key)).tobytes().hex() for name, fn in fns.items()}

def loops():  # while loops in the lowered draw
    return jax.jit(lambda k: jax.random.bits(k, (64, 10))).lower(jax.random.key(0)).as_text().count("stablehlo.while")

def known_answers():
    out = []
    for key, count, _ in json.loads(sys.argv[1]):
        pair = jax.jit(threefry_2x32)(jnp.asarray(key, jnp.uint32), jnp.asarray(count, jnp.uint32))
        out.append([int(x) for x in pair])
    return out

gpu_mesh = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="gpu")]))
cpu_mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
report = {"jax": {"loops": loops(), "draws": draws(), "known": known_answers()}}
cpu_workarounds.unrolled_threefry(gpu_mesh)  # not a CPU mesh: nothing changes
jax.clear_caches()
report["gpu_mesh"] = {"loops": loops()}
cpu_workarounds.unrolled_threefry(cpu_mesh)
jax.clear_caches()
report["unrolled"] = {"loops": loops(), "draws": draws(), "known": known_answers()}
print(json.dumps(report))
"""


def test_unrolled_threefry_draws_the_same_bits_without_a_loop():
    """`unrolled_threefry`: in a fresh process (JAX's own CPU rule first), every draw keeps its
    bits, the draw's program loses its loop, and Threefry gives Random123's known answers."""
    vectors = json.dumps([[list(k), list(c), list(o)] for k, c, o in THREEFRY_KNOWN_ANSWERS])
    result = subprocess.run([sys.executable, "-c", THREEFRY_SCRIPT, vectors], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    expected = [list(out) for _, _, out in THREEFRY_KNOWN_ANSWERS]
    assert report["jax"]["known"] == report["unrolled"]["known"] == expected
    assert report["unrolled"]["draws"] == report["jax"]["draws"]
    assert report["unrolled"]["loops"] == 0
    assert report["gpu_mesh"]["loops"] == report["jax"]["loops"]  # 1 up to jax-ml/jax#37872, then 0
