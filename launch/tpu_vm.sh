#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM (single- or multi-host) from a clone of
# this repository that is already on each worker (e.g. rsync'ed or git-cloned to ~/fr_jax).
#
#   launch/tpu_vm.sh my-tpu us-central2-b -- python -m fr_jax.decode --config=configs/tiny.py
#
# Every host runs the same program; JAX's multi-host runtime (jax.distributed) wires them
# together. Set FR_JAX_DIR to change the remote checkout path, FR_JAX_SETUP to run something
# first on each host (default: install the repo and the TPU build of jax pinned here).
#
# Before a training command (`python -m fr_jax.train ...`) starts on any host, worker 0
# compiles its programs for this slice with `python -m fr_jax.plan` (same --config flags,
# the slice's accelerator type as --topology) and the launch stops if one does not fit.
# FR_JAX_SKIP_PLAN=1 skips that check.
#
# --dry-run creates and starts nothing: it prints the slice's chips and hosts, the mesh the
# command would build (and fails if its sizes do not multiply to the slice's chips) and each
# worker's command line, via `python -m fr_jax.launch` on this machine. --slice=TYPE gives
# the accelerator type (else it is read with `gcloud ... describe`, which changes nothing).
#
#   launch/tpu_vm.sh my-tpu us-east5-a --dry-run --slice=v5p-32 -- python -m fr_jax.train ...
set -euo pipefail
usage="usage: $0 TPU_NAME ZONE [--dry-run [--slice=TYPE]] -- COMMAND..."
if [ $# -lt 4 ]; then echo "$usage" >&2; exit 2; fi
name=$1 zone=$2
shift 2
dry_run=0 slice=""
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case $1 in
    --dry-run) dry_run=1 ;;
    --slice=*) slice=${1#--slice=} ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
  shift
done
if [ $# -lt 2 ]; then echo "$usage" >&2; exit 2; fi
shift
dir=${FR_JAX_DIR:-"~/fr_jax"}  # quoted: the ~ is the worker's home, expanded there
jax_version=$(grep -E '^jax==' "$(dirname "$0")/../requirements.txt" | cut -d= -f3)
setup=${FR_JAX_SETUP:-"pip install -q -e . && pip install -q 'jax[tpu]==${jax_version}'"}
printf -v cmd '%q ' "$@"

if [ "$dry_run" = 1 ]; then
  if [ -z "$slice" ]; then
    slice=$(gcloud compute tpus tpu-vm describe "$name" --zone "$zone" \
      --format='value(acceleratorType)')
  fi
  slice=${slice/#v5litepod-/v5e-}  # Cloud's name for v5e slices
  cd "$(dirname "$0")/.."
  exec python -m fr_jax.launch "--slice=$slice" "--dir=$dir" "--setup=$setup" -- "$@"
fi

if [ "${FR_JAX_SKIP_PLAN:-0}" != 1 ] && [[ " $* " == *" fr_jax.train "* ]]; then
  slice=$(gcloud compute tpus tpu-vm describe "$name" --zone "$zone" \
    --format='value(acceleratorType)')
  slice=${slice/#v5litepod-/v5e-}
  plan_args=()
  for arg in "$@"; do
    case $arg in --config=*|--config.*) plan_args+=("$arg") ;; esac
  done
  printf -v plan '%q ' python -m fr_jax.plan "--topology=$slice" "${plan_args[@]}"
  echo "checking that the programs fit $slice: $plan" >&2
  # The plan compiles for the slice's topology with the CPU as host platform: it does not
  # hold the TPU the training run is about to use.
  if ! gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=0 \
      --command "cd $dir && $setup && JAX_PLATFORMS=cpu $plan"; then
    echo "fr_jax.plan: the programs do not fit $slice (see the table above); not launching." \
      "Change the config as it suggests, or set FR_JAX_SKIP_PLAN=1." >&2
    exit 1
  fi
fi

gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
  --command "cd $dir && $setup && $cmd"
