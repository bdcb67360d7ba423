#!/usr/bin/env bash
# Copies this checkout to ~/fr_jax (or $FR_JAX_DIR) on every worker of a TPU VM.
#   launch/copy.sh NAME ZONE
set -euo pipefail
if [ $# -ne 2 ]; then echo "usage: $0 NAME ZONE" >&2; exit 2; fi
name=$1 zone=$2
root=$(cd "$(dirname "$0")/.." && pwd)
archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
git -C "$root" archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$name":/tmp/fr_jax.tar.gz --zone "$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
  --command "mkdir -p ${FR_JAX_DIR:-~/fr_jax} && tar -xzf /tmp/fr_jax.tar.gz -C ${FR_JAX_DIR:-~/fr_jax}"
