#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM (single- or multi-host) from a clone of
# this repository that is already on each worker (e.g. rsync'ed or git-cloned to ~/fr_jax).
#
#   launch/tpu_vm.sh my-tpu us-central2-b -- python -m fr_jax.decode --config=configs/tiny.py
#
# Every host runs the same program; JAX's multi-host runtime (jax.distributed) wires them
# together. Set FR_JAX_DIR to change the remote checkout path, FR_JAX_SETUP to run something
# first on each host (default: install the repo and the TPU build of jax pinned here).
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
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
  --command "cd $dir && $setup && $cmd"
