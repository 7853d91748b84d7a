#!/usr/bin/env bash
# Runs N processes of `python -m fgc_jax.main` on this machine, joined into one multi-process
# JAX run on CPU devices with gloo collectives: the single-machine form of a multi-host
# launch, and the form tests/test_scale_out.py uses. Run it from the repository root.
#
# Usage:
#   launch/local_multiprocess.sh [options] [--] [fgc_jax.main flags...]
#
# Options [environment variable, default]:
#   -n, --num-processes N        processes to start [NUM_PROCESSES, 2]
#   -d, --devices-per-process D  virtual CPU devices per process [DEVICES_PER_PROCESS, 2]
#   -p, --port PORT              coordinator port on localhost [COORDINATOR_PORT, a free port]
#   -t, --timeout SECONDS        start-up timeout, passed as --distributed_timeout
#                                [DISTRIBUTED_TIMEOUT, 60]
#   -l, --log-dir DIR            write process i's output to DIR/process_i.log
#                                [LOG_DIR, unset: the terminal, each line prefixed "[i] "]
#   --python PATH                Python interpreter [PYTHON, python3]
#   --dry-run                    print the command of every process, one a line; run nothing
#   -h, --help                   show this help
#
# Every argument after the options (or after --) is passed to every process unchanged:
#   launch/local_multiprocess.sh -n 2 -d 2 -- --config=configs/quickstart.py --workdir=/tmp/fgc_2p
# Each process gets XLA_FLAGS=--xla_force_host_platform_device_count=D and JAX_PLATFORMS=cpu
# (EXTRA_XLA_FLAGS is appended to XLA_FLAGS), plus --coordinator_address=localhost:PORT
# --num_processes=N --process_id=i --cpu_collectives=gloo. With -n 1 the process runs alone,
# without those four flags. When a process fails, the others are stopped (SIGTERM, then
# SIGKILL after KILL_AFTER seconds, default 10) and the script exits with its status.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "local_multiprocess.sh: $*" >&2; exit 2; }

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

num_processes="${NUM_PROCESSES:-2}"
devices_per_process="${DEVICES_PER_PROCESS:-2}"
port="${COORDINATOR_PORT:-}"
timeout="${DISTRIBUTED_TIMEOUT:-60}"
log_dir="${LOG_DIR:-}"
python="${PYTHON:-python3}"
kill_after="${KILL_AFTER:-10}"
dry_run=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num-processes) [[ $# -ge 2 ]] || die "$1 needs a value"; num_processes="$2"; shift 2 ;;
    -d|--devices-per-process) [[ $# -ge 2 ]] || die "$1 needs a value"; devices_per_process="$2"; shift 2 ;;
    -p|--port) [[ $# -ge 2 ]] || die "$1 needs a value"; port="$2"; shift 2 ;;
    -t|--timeout) [[ $# -ge 2 ]] || die "$1 needs a value"; timeout="$2"; shift 2 ;;
    -l|--log-dir) [[ $# -ge 2 ]] || die "$1 needs a value"; log_dir="$2"; shift 2 ;;
    --python) [[ $# -ge 2 ]] || die "$1 needs a value"; python="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
is_count "$num_processes" || die "--num-processes must be a positive integer, got '$num_processes'"
is_count "$devices_per_process" || die "--devices-per-process must be a positive integer, got '$devices_per_process'"
is_count "$timeout" || die "--timeout must be a positive integer (seconds), got '$timeout'"
if [[ -z "$port" && "$num_processes" -gt 1 ]]; then
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"
fi
if [[ "$num_processes" -gt 1 ]]; then
  if ! is_count "$port" || [[ "$port" -ge 65536 ]]; then
    die "--port must be a TCP port (1-65535), got '$port'"
  fi
fi

xla_flags="--xla_force_host_platform_device_count=${devices_per_process}${EXTRA_XLA_FLAGS:+ ${EXTRA_XLA_FLAGS}}"

# The command of process $1, into the array `cmd`.
build_command() {
  cmd=(env "XLA_FLAGS=${xla_flags}" JAX_PLATFORMS=cpu "$python" -m fgc_jax.main "$@")
}

commands=()
for ((i = 0; i < num_processes; i++)); do
  if [[ "$num_processes" -gt 1 ]]; then
    build_command "${@}" "--coordinator_address=localhost:${port}" "--num_processes=${num_processes}" \
      "--process_id=${i}" --cpu_collectives=gloo "--distributed_timeout=${timeout}"
  else
    build_command "${@}"
  fi
  commands+=("$(quote_line "${cmd[@]}")")
done

if [[ "$dry_run" -eq 1 ]]; then
  printf '%s\n' "${commands[@]}"
  exit 0
fi

[[ -z "$log_dir" ]] || mkdir -p "$log_dir"
pids=()

stop_all() {
  local pid waited=0
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  while [[ "$waited" -lt "$kill_after" ]]; do
    local alive=0
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    [[ "$alive" -eq 1 ]] || return 0
    sleep 1
    waited=$((waited + 1))
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  eval "cmd=(${commands[$i]})"
  if [[ -n "$log_dir" ]]; then
    "${cmd[@]}" >"${log_dir}/process_${i}.log" 2>&1 &
  else
    "${cmd[@]}" > >(sed -u "s/^/[${i}] /") 2>&1 &
  fi
  pids+=("$!")
done

# Wait for every process; on the first failure stop the rest and report it.
status=0
remaining=("${pids[@]}")
while [[ ${#remaining[@]} -gt 0 ]]; do
  still=()
  for index in "${!remaining[@]}"; do
    pid="${remaining[$index]}"
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    if [[ "$rc" -ne 0 && "$status" -eq 0 ]]; then
      status="$rc"
      for ((i = 0; i < num_processes; i++)); do
        if [[ "${pids[$i]}" == "$pid" ]]; then
          echo "local_multiprocess.sh: process ${i} (pid ${pid}) exited with status ${rc}; stopping the others" >&2
        fi
      done
      stop_all
    fi
  done
  remaining=("${still[@]+"${still[@]}"}")
  [[ ${#remaining[@]} -eq 0 ]] || sleep 1
done
exit "$status"
