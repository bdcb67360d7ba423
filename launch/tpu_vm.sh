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
set -euo pipefail
if [ $# -lt 4 ] || [ "$3" != "--" ]; then
  echo "usage: $0 TPU_NAME ZONE -- COMMAND..." >&2
  exit 2
fi
name=$1 zone=$2
shift 3
dir=${FR_JAX_DIR:-~/fr_jax}
jax_version=$(grep -E '^jax==' "$(dirname "$0")/../requirements.txt" | cut -d= -f3)
setup=${FR_JAX_SETUP:-"pip install -q -e . && pip install -q 'jax[tpu]==${jax_version}'"}
printf -v cmd '%q ' "$@"

if [ "${FR_JAX_SKIP_PLAN:-0}" != 1 ] && [[ " $* " == *" fr_jax.train "* ]]; then
  slice=$(gcloud compute tpus tpu-vm describe "$name" --zone "$zone" \
    --format='value(acceleratorType)')
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
