#!/bin/bash
# Cloud TPU VM pod slice: the same command on every worker (JAX finds the slice's topology itself).
#   bash experiments/launch/tpu_pod.sh
# CHANGE the five variables below. The workdir must be gs:// (the workers share no disk); the TPU
# VMs' service account needs read/write on the bucket.
set -euo pipefail
TPU_NAME=my-tpu              # CHANGE: `gcloud compute tpus tpu-vm create $TPU_NAME --accelerator-type=v5p-32 ...`
ZONE=us-east5-a              # CHANGE
PROJECT=my-project           # CHANGE
CONFIG=experiments/configs/finetune_digits.py   # CHANGE
WORKDIR=gs://my-bucket/runs/$TPU_NAME           # CHANGE

# 1. Once: the code and its environment on every worker (CHANGE the repository URL).
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=all \
  --command='test -d jtl || git clone https://example.com/your/jtl.git jtl;
             cd jtl && python3 -m venv .venv && .venv/bin/pip install -q -e ".[tpu]"'

# 2. The run: one process per worker, started together. Run this again after a preemption: it resumes.
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=all \
  --command="cd jtl && .venv/bin/python -m experiments.train --config=$CONFIG --workdir=$WORKDIR --distributed"
