#!/usr/bin/env bash
# Creates a Cloud TPU VM (slice) with a recent TPU software image.
#   launch/create_tpu.sh NAME ZONE ACCELERATOR_TYPE [extra gcloud flags...]
set -euo pipefail
if [ $# -lt 3 ]; then echo "usage: $0 NAME ZONE ACCELERATOR_TYPE [gcloud flags]" >&2; exit 2; fi
name=$1 zone=$2 type=$3
shift 3
gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$type" \
  --version "${FR_JAX_TPU_IMAGE:-tpu-ubuntu2204-base}" "$@"
