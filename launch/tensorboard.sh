#!/usr/bin/env bash
# Serves TensorBoard for a run from worker 0 and forwards it to localhost:6006.
#   launch/tensorboard.sh NAME ZONE LOGDIR
set -euo pipefail
if [ $# -ne 3 ]; then echo "usage: $0 NAME ZONE LOGDIR" >&2; exit 2; fi
name=$1 zone=$2 logdir=$3
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=0 -- -L 6006:localhost:6006 \
  "pip install -q tensorboard && tensorboard --logdir $logdir/tensorboard --port 6006"
