#!/usr/bin/env bash
# Trains FGC on a Cloud TPU VM slice: creates the slice (or reuses it), installs this checkout
# on every worker, and runs the same `python3 -m fgc_jax.main` on all workers at once. JAX
# finds the slice's hosts itself (fgc_jax.distributed calls jax.distributed.initialize() on a
# TPU VM), so no coordinator flags are needed. Run it from the repository root.
#
# Usage:
#   TPU_NAME=fgc-v4 ZONE=us-central2-b WORKDIR=gs://BUCKET/fgc_r18 launch/tpu_pod.sh [options] \
#       [--] [fgc_jax.main flags...]
#
# Options:
#   --dry-run        print every gcloud/tar command, one a line; run nothing
#   --skip-create    do not describe/create the slice (it exists)
#   --skip-install   do not copy and install the checkout (already done)
#   --detach         start training in the background on the workers (nohup, output in
#                    ~/fgc_train.log on each worker) and return; default: stream all output
#   -h, --help       show this help
# Environment [default]:
#   TPU_NAME          slice name (required)
#   ZONE              zone of the slice (required), e.g. us-central2-b for v4
#   PROJECT           Google Cloud project [gcloud's configured project]
#   ACCELERATOR_TYPE  slice type used when creating it [v4-32: 4 hosts x 4 chips]
#   RUNTIME_VERSION   TPU VM software version used when creating it [tpu-ubuntu2204-base]
#   SPOT              1: create a Spot slice (cheaper, preemptible; training resumes from
#                     the latest checkpoint when rerun) [0]
#   CONFIG            config file [configs/resnet18_imagenet.py]
#   WORKDIR           checkpoint/metrics directory; must be gs:// so every host sees it (required)
#   REMOTE_DIR        install directory in each worker's home [fgc_jax]
#   JAX_PIP_SPEC      how pip installs JAX for TPU ['jax[tpu]']
#   PIP_EXTRAS        more packages for the workers, space-separated [none]; the checkout is
#                     installed with its gcs extra (`.[gcs]`: gcsfs, google-cloud-storage),
#                     which the gs:// workdir needs
# Every argument after the options is passed to fgc_jax.main, e.g.
#   --config.data.dir=gs://BUCKET/tensorflow_datasets --config.fgc.bank_dtype=bfloat16
# The checkout is copied as `git ls-files` lists it (tracked files, working-tree contents).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

dry_run=0
create=1
install=1
detach=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --skip-create) create=0; shift ;;
    --skip-install) install=0; shift ;;
    --detach) detach=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

tpu_name="${TPU_NAME:-}"
zone="${ZONE:-}"
project="${PROJECT:-}"
accelerator_type="${ACCELERATOR_TYPE:-v4-32}"
runtime_version="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
spot="${SPOT:-0}"
config="${CONFIG:-configs/resnet18_imagenet.py}"
workdir="${WORKDIR:-}"
remote_dir="${REMOTE_DIR:-fgc_jax}"
jax_pip_spec="${JAX_PIP_SPEC:-jax[tpu]}"
pip_extras="${PIP_EXTRAS:-}"

[[ -n "$tpu_name" ]] || die "set TPU_NAME to the slice's name (see --help)"
[[ -n "$zone" ]] || die "set ZONE to the slice's zone, e.g. ZONE=us-central2-b (see --help)"
[[ -n "$workdir" ]] || die "set WORKDIR to a gs:// directory for checkpoints and metrics (see --help)"
[[ "$workdir" == gs://* ]] || die "WORKDIR=$workdir is not a gs:// path: the workers of a slice share no disk"
[[ "$remote_dir" =~ ^[A-Za-z0-9_.-]+$ ]] || die "REMOTE_DIR must be a plain directory name, got '$remote_dir'"

common=(--zone="$zone")
[[ -z "$project" ]] || common+=(--project="$project")

archive="/tmp/${tpu_name}-fgc_jax.tar.gz"
describe=(gcloud compute tpus tpu-vm describe "$tpu_name" "${common[@]}" --format=value\(state\))
create_cmd=(gcloud compute tpus tpu-vm create "$tpu_name" "${common[@]}"
  --accelerator-type="$accelerator_type" --version="$runtime_version")
[[ "$spot" != 1 ]] || create_cmd+=(--spot)
pack=(tar -czf "$archive" --null -T -)
copy=(gcloud compute tpus tpu-vm scp "$archive" "${tpu_name}:fgc_jax.tar.gz" "${common[@]}" --worker=all)
install_script="rm -rf ~/${remote_dir} && mkdir -p ~/${remote_dir} && tar -xzf ~/fgc_jax.tar.gz -C ~/${remote_dir}"
read -r -a extras <<<"$pip_extras"
install_script+=" && cd ~/${remote_dir} && python3 -m pip install -q -U $(quote_line "$jax_pip_spec" "${extras[@]+"${extras[@]}"}") -e '.[gcs]'"
install_cmd=(gcloud compute tpus tpu-vm ssh "$tpu_name" "${common[@]}" --worker=all --command="$install_script")
train_line="$(quote_line python3 -m fgc_jax.main --config="$config" --workdir="$workdir" "$@")"
if [[ "$detach" -eq 1 ]]; then
  train_script="cd ~/${remote_dir} && nohup ${train_line} > ~/fgc_train.log 2>&1 < /dev/null &"
else
  train_script="cd ~/${remote_dir} && ${train_line}"
fi
train_cmd=(gcloud compute tpus tpu-vm ssh "$tpu_name" "${common[@]}" --worker=all --command="$train_script")

if [[ "$dry_run" -eq 1 ]]; then
  if [[ "$create" -eq 1 ]]; then
    quote_line "${describe[@]}"
    echo "# if the describe fails (no such slice):"
    quote_line "${create_cmd[@]}"
  fi
  if [[ "$install" -eq 1 ]]; then
    echo "git ls-files -z | $(quote_line "${pack[@]}")"
    quote_line "${copy[@]}"
    quote_line "${install_cmd[@]}"
  fi
  quote_line "${train_cmd[@]}"
  exit 0
fi

command -v gcloud >/dev/null || die "gcloud is not installed (https://cloud.google.com/sdk/docs/install)"
if [[ "$create" -eq 1 ]]; then
  if state="$("${describe[@]}" 2>/dev/null)"; then
    echo "tpu_pod.sh: reusing slice ${tpu_name} (state ${state})"
  else
    echo "tpu_pod.sh: creating slice ${tpu_name} (${accelerator_type}, ${runtime_version})"
    "${create_cmd[@]}"
  fi
fi
if [[ "$install" -eq 1 ]]; then
  git rev-parse --is-inside-work-tree >/dev/null 2>&1 || die "run from the repository root (a git checkout)"
  git ls-files -z | "${pack[@]}"
  "${copy[@]}"
  "${install_cmd[@]}"
fi
"${train_cmd[@]}"
