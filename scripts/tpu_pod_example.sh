#!/usr/bin/env bash
# Train dla_jax on a Cloud TPU VM pod slice (e.g. v4-32, v5p-64): a template, edit the variables.
#
# Every worker runs the SAME command. No --coordinator_address/--num_processes/--process_id:
# dla_jax.parallel.initialize_distributed() sees a Cloud TPU VM and lets jax.distributed
# discover the workers from the TPU metadata server. Only process 0 writes logs/exports;
# checkpoints are written cooperatively, so WORKDIR must be storage every worker sees (GCS).
#
#   TPU_NAME=my-pod ZONE=us-central2-b bash scripts/tpu_pod_example.sh
set -euo pipefail

TPU_NAME="${TPU_NAME:?set TPU_NAME to the TPU VM name}"
ZONE="${ZONE:?set ZONE to the TPU zone, e.g. us-central2-b}"
REPO_DIR="${REPO_DIR:-$(cd "$(dirname "$0")/.." && pwd)}"      # this checkout, copied to every worker
CONFIG="${CONFIG:-configs/imagenet.py:dla_l,50}"                 # config file[:family,depth]
WORKDIR="${WORKDIR:-gs://YOUR_BUCKET/dla_jax/${TPU_NAME}}"       # shared: checkpoints + metrics
DATA_DIR="${DATA_DIR:-gs://YOUR_BUCKET/tensorflow_datasets}"     # prepared tfds data, readable by all workers

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}

# 1. Same code and packages on every worker.
tar -C "$REPO_DIR" --exclude=.git -czf /tmp/dla_jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/dla_jax.tgz "$TPU_NAME":~/ --zone "$ZONE" --worker=all
ssh_all "mkdir -p ~/dla_jax && tar -C ~/dla_jax -xzf ~/dla_jax.tgz && \
  pip install -U 'jax[tpu]' && pip install -e ~/dla_jax"

# 2. Train: one process per worker, all TPU chips of the slice in one ("data", "fsdp") mesh.
#    Config overrides follow ml_collections syntax, e.g. --config.mesh.fsdp=4 to shard parameters.
ssh_all "cd ~/dla_jax && python -m dla_jax.main \
  --config=${CONFIG} --config.data.data_dir=${DATA_DIR} --workdir=${WORKDIR} 2>&1 | tee ~/train.log"

# If a worker dies, the others stop within the heartbeat timeout; re-running step 2 resumes
# from the last checkpoint in WORKDIR. To stop a run on every worker:
#   ssh_all "pkill -u \$USER -f 'python -m dla_jax.main'"
