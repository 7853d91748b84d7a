"""glibc malloc tunables: merging, validation, the one re-execution, and its effect on page faults."""
import os
import pathlib
import platform
import subprocess
import sys

import pytest

from fgc_jax import host_memory

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


@pytest.mark.parametrize("bad", ["hugetlb=1", "glibc.malloc.hugetlb", "glibc.malloc.hugetlb=", "malloc.hugetlb=1"])
def test_malformed_tunables_are_rejected_with_the_expected_form(bad):
    with pytest.raises(ValueError, match="glibc.<name>=<value>"):
        host_memory.validate(bad)


def test_empty_or_well_formed_tunables_are_accepted():
    host_memory.validate("")
    host_memory.validate("glibc.malloc.hugetlb=1:glibc.malloc.arena_max=4")


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


def _page_faults(tunables: str | None) -> int:
    """Minor page faults of 8 rounds of malloc, fill and free of 256 MiB (as XLA:CPU does per step).

    Plain libc malloc through ctypes: NumPy asks for huge pages on its own large arrays.
    """
    script = ("import ctypes, resource\n"
              "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p\n"
              "libc.free.argtypes = [ctypes.c_void_p]\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
              "for _ in range(8):\n"
              "    p = libc.malloc(256 << 20); ctypes.memset(p, 1, 256 << 20); libc.free(p)\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV_VAR}
    if tunables:
        env[host_memory.ENV_VAR] = tunables
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=120, check=True)
    return int(result.stdout)


@needs_glibc
def test_hugetlb_makes_large_allocations_fault_in_huge_pages():
    thp = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are disabled on this kernel")
    if tuple(int(x) for x in platform.libc_ver()[1].split(".")[:2]) < (2, 35):
        pytest.skip("glibc.malloc.hugetlb needs glibc >= 2.35")
    # 8 x 256 MiB in 4 KiB pages is 524,288 faults (524,296 measured here; 5,120 with hugetlb=1).
    plain, huge = _page_faults(None), _page_faults(HUGETLB)
    assert plain > 8 * (256 << 20) // 4096 * 0.9
    assert huge < plain / 20
