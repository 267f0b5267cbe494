#!/bin/bash
# Train dla_jax on a SLURM GPU cluster: a template, edit the #SBATCH lines and variables, then
#   sbatch scripts/slurm_gpu_example.sh
#
# One task per GPU (the default below): srun starts nodes * 8 processes; inside each,
# dla_jax.parallel.initialize_distributed() sees SLURM (SLURM_JOB_ID, SLURM_NTASKS > 1) and lets
# jax.distributed read coordinator, process count and id from SLURM; jax then gives task i the GPU
# numbered SLURM_LOCALID. So every task must SEE all GPUs of its node: request them per node
# (--gpus-per-node), not per task (--gpus-per-task would renumber each task's GPU to 0).
#
# One task per node instead: set --ntasks-per-node=1 and uncomment JAX_LOCAL_DEVICE_IDS below,
# otherwise jax would use only GPU 0 of each node.
#
#SBATCH --job-name=dla_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

VENV="${VENV:-$HOME/venvs/dla_jax}"                        # pip install -U 'jax[cuda12]' && pip install -e .
REPO_DIR="${REPO_DIR:-$SLURM_SUBMIT_DIR}"
CONFIG="${CONFIG:-configs/imagenet.py:dla_l,50}"
WORKDIR="${WORKDIR:-/shared/$USER/dla_jax/$SLURM_JOB_ID}"  # on a filesystem every node sees
DATA_DIR="${DATA_DIR:-/shared/datasets/tensorflow_datasets}"

source "$VENV/bin/activate"
cd "$REPO_DIR"
# export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7   # only with --ntasks-per-node=1
# export JAX_COORDINATOR_PORT=12345             # if jax's default port is taken on the first node
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9

# --kill-on-bad-exit: one failed task ends the step instead of leaving the others waiting.
srun --kill-on-bad-exit=1 python -m dla_jax.main \
  --config="$CONFIG" --config.data.data_dir="$DATA_DIR" --workdir="$WORKDIR"
