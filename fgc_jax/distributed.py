"""Multi-process start-up with JAX's own distributed runtime, failing fast with clear messages.

Two ways to start a multi-process run:

- Explicitly: the flags (or `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`)
  name the coordinator, the process count and this process's id.
- Detected by JAX: otherwise `jax.distributed.initialize()` is called with no arguments and
  JAX's cluster detection finds them (a Cloud TPU VM slice, a SLURM step, Open MPI,
  Kubernetes); where it finds no cluster, the run uses its local devices alone. Under SLURM,
  JAX gives each task the GPU `$SLURM_LOCALID` unless `JAX_LOCAL_DEVICE_IDS` lists others.

With an explicit coordinator, every process first takes part in a small rendezvous on the
coordinator's port, before JAX's own runtime starts there: process 0 listens, the others
report `(process_id, num_processes)`, and process 0 answers once all have arrived. It adds
what `jax.distributed.initialize` does not do (measured with jax 0.10.2 on localhost), as
immediate, specific errors within `timeout_seconds`:

- processes started with different `--num_processes`: JAX joins them silently with process
  0's count;
- two processes with the same `--process_id`: JAX aborts one of them with a C++ stack trace;
  a process missing is named;
- coordinator unreachable (wrong host or port, process 0 not started): every other process
  fails after the timeout naming the address (JAX aborts the interpreter with "another task
  died"); a process that did reach process 0 waits at most one more timeout (plus 10 s of
  grace) for its answer;
- `process_id` outside `[0, num_processes)` fails before anything is contacted.

Set `FGC_SKIP_RENDEZVOUS=1` to go straight to `jax.distributed.initialize`.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time

import jax
from absl import logging

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_SKIP_RENDEZVOUS = "FGC_SKIP_RENDEZVOUS"

_MAGIC = "fgc-rendezvous-1"
_RETRY_SECONDS = 0.25
# How much longer than its own timeout a connected process waits for process 0's answer:
# process 0 answers at the end of *its* timeout, which may have started a moment later.
_ANSWER_GRACE_SECONDS = 10.0


class DistributedStartupError(RuntimeError):
    """The processes of a multi-process run could not be joined; the message says why."""


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator address {address!r} is not of the form host:port "
                         "(e.g. localhost:12355 or node001:12355)")
    return host, int(port)


def _send(conn: socket.socket, message: dict) -> None:
    conn.sendall((json.dumps(message) + "\n").encode())


def _receive(conn: socket.socket, deadline: float) -> dict | None:
    """One JSON line from `conn`, or None if the peer closed, timed out or spoke another protocol."""
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(4096)
        except (socket.timeout, OSError):
            return None
        if not chunk:
            return None
        data += chunk
        if len(data) > 65536:
            return None
    try:
        message = json.loads(data)
    except ValueError:
        return None
    return message if isinstance(message, dict) and message.get("magic") == _MAGIC else None


def _listen(port: int) -> socket.socket:
    """A listening socket on every address of `port` (where JAX's service will bind next)."""
    attempts = []
    if socket.has_dualstack_ipv6():
        attempts.append(dict(family=socket.AF_INET6, dualstack_ipv6=True))
    attempts.append(dict(family=socket.AF_INET))
    for i, options in enumerate(attempts):
        try:
            return socket.create_server(("", port), **options)
        except OSError as e:
            if e.errno == errno.EADDRINUSE or i == len(attempts) - 1:
                raise DistributedStartupError(
                    f"process 0 cannot listen on coordinator port {port}: {e}. Another run (or a "
                    "second process started with --process_id=0) is using it; pick a free port") from e
    raise AssertionError("unreachable")


def _rendezvous_coordinator(port: int, num_processes: int, deadline: float) -> None:
    """Process 0: waits for processes 1..n-1, checks their claims, answers each of them."""
    server = _listen(port)
    peers: dict[int, socket.socket] = {}
    problems: list[str] = []
    strays: list[socket.socket] = []
    try:
        while len(peers) < num_processes - 1 and time.monotonic() < deadline:
            server.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                conn, address = server.accept()
            except (socket.timeout, OSError):
                break
            hello = _receive(conn, min(deadline, time.monotonic() + 10.0))
            if hello is None:
                conn.close()  # a port scanner or a stale client of another protocol
                continue
            pid, count = hello.get("process_id"), hello.get("num_processes")
            if count != num_processes:
                problems.append(f"process {pid} (on {address[0]}) was started with num_processes={count}, "
                                f"process 0 with num_processes={num_processes}")
            if not isinstance(pid, int) or not 0 < pid < num_processes:
                problems.append(f"a process on {address[0]} claims process_id={pid}, outside 1..{num_processes - 1}")
                strays.append(conn)
            elif pid in peers:
                problems.append(f"two processes were started with process_id={pid}")
                strays.append(conn)
            else:
                peers[pid] = conn
            if problems:
                break
        missing = sorted(set(range(1, num_processes)) - set(peers))
        if missing and not problems:
            problems.append(f"processes {missing} of {num_processes} did not report within the timeout "
                            "(not started, or started with another --coordinator_address)")
        verdict = {"magic": _MAGIC, "ok": not problems, "error": "; ".join(problems)}
        for conn in list(peers.values()) + strays:
            try:
                _send(conn, verdict)
            except OSError:
                pass
    finally:
        for conn in list(peers.values()) + strays:
            conn.close()
        server.close()
    if problems:
        raise DistributedStartupError("the processes of this run disagree: " + "; ".join(problems))


def _rendezvous_worker(host: str, port: int, process_id: int, num_processes: int, deadline: float,
                       timeout_seconds: float) -> None:
    """Process i > 0: reports to process 0 until it answers or the deadline passes.

    Once connected, it waits up to `timeout_seconds` (plus a grace period) more for the answer:
    process 0 answers when all processes have reported or its own deadline (which may be
    later) has passed.
    """
    last_error = "no attempt"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 0.01)) as conn:
                _send(conn, {"magic": _MAGIC, "process_id": process_id, "num_processes": num_processes})
                verdict = _receive(conn, time.monotonic() + timeout_seconds + _ANSWER_GRACE_SECONDS)
            if verdict is not None:
                if not verdict.get("ok"):
                    raise DistributedStartupError(
                        f"process 0 at {host}:{port} rejected this run: {verdict.get('error')}")
                return
            last_error = ("something listens there but did not answer as process 0 of this run; if "
                          "the run has already started, this process's --process_id duplicates one "
                          "that joined")
        except OSError as e:
            last_error = str(e) or type(e).__name__
        time.sleep(_RETRY_SECONDS)
    raise DistributedStartupError(
        f"coordinator {host}:{port} was not reachable within {timeout_seconds:g}s (last error: "
        f"{last_error}). Check that process 0 of this run is running, that --coordinator_address "
        "names its host and port, and that the port is open between the hosts")


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               timeout_seconds: int = 300, cpu_collectives: str = "") -> None:
    """Joins a multi-process run if there is one; returns at once on a single machine.

    Explicit arguments win over the environment; without a coordinator, JAX's cluster
    detection decides. Waits at most `timeout_seconds` for the other processes, then raises
    `DistributedStartupError` instead of hanging. `cpu_collectives='gloo'` (or 'mpi') enables
    cross-process collectives between CPU devices, e.g. several processes on one machine.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR, "")
    num_processes = num_processes or int(os.environ.get(ENV_NUM_PROCESSES, "0"))
    if process_id < 0:
        process_id = int(os.environ.get(ENV_PROCESS_ID, "-1"))
    if timeout_seconds <= 0:
        raise ValueError(f"the distributed start-up timeout must be positive, got {timeout_seconds}")
    explicit = bool(coordinator_address)
    if explicit and (num_processes < 1 or not 0 <= process_id < num_processes):
        raise ValueError(f"a multi-process run needs num_processes >= 1 and 0 <= process_id < "
                         f"num_processes; got num_processes={num_processes}, process_id={process_id} "
                         f"(flags --num_processes/--process_id or ${ENV_NUM_PROCESSES}/${ENV_PROCESS_ID})")
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)

    kwargs = dict(initialization_timeout=int(timeout_seconds))
    if explicit:
        host, port = _split_address(coordinator_address)
        if num_processes > 1 and os.environ.get(ENV_SKIP_RENDEZVOUS, "") in ("", "0"):
            deadline = time.monotonic() + timeout_seconds
            if process_id == 0:
                _rendezvous_coordinator(port, num_processes, deadline)
            else:
                _rendezvous_worker(host, port, process_id, num_processes, deadline, timeout_seconds)
        kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
        logging.info("Joining a %d-process run (coordinator %s, process %d, timeout %ss)",
                     num_processes, coordinator_address, process_id, timeout_seconds)
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:
        # JAX's answer when it was given no coordinator and detected no cluster (it raises
        # before contacting anything): a single-machine run.
        if not explicit and "coordinator_address" in str(e):
            return
        raise DistributedStartupError(f"could not start the distributed runtime: {e}") from e
    except Exception as e:  # the runtime raises several types for an unreachable coordinator
        raise DistributedStartupError(
            f"could not join the distributed run (coordinator {coordinator_address or 'detected by JAX'}, "
            f"process {process_id if explicit else 'detected'} of {num_processes or 'detected'}) within "
            f"{timeout_seconds}s: {e}. Check that the coordinator process is running and its address "
            "and port are reachable from this host") from e
    if explicit and jax.process_count() != num_processes:
        raise DistributedStartupError(f"expected {num_processes} processes, the runtime reports "
                                      f"{jax.process_count()}")
    logging.info("Process %d of %d; %d local and %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
