#!/usr/bin/env bash
#SBATCH --job-name=jaxgist
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=jaxgist-%j.out
#
# Multi-node GPU training with jaxgist on SLURM: one process per GPU (default) or per node.
#
#   sbatch [sbatch options] launch/slurm.sh CONFIG[:ARG] WORKDIR [--config.key=value ...]
#
#   # from the repository root (the job finds the code there), 2 nodes x 8 GPUs, one process per GPU:
#   sbatch launch/slurm.sh configs/finetune.py /shared/runs/cub \
#       --config.data.metadata=/shared/CUB/metadata.csv --config.data.image_dir=/shared/CUB/images \
#       --config.data.captions=/shared/CUB/captions_top5.json
#   # 4 nodes x 4 GPUs, one process per node driving its 4 GPUs:
#   sbatch --nodes=4 --gpus-per-node=4 --ntasks-per-node=1 --cpus-per-task=32 launch/slurm.sh configs/finetune.py /shared/runs/cub ...
#
# The #SBATCH lines above are defaults; options given to sbatch override them:
#   --nodes            number of machines
#   --ntasks-per-node  processes per machine: = --gpus-per-node (one process per GPU, the usual choice
#                      for JAX on GPU clusters) or 1 (one process sees all GPUs of its machine)
#   --gpus-per-node    GPUs per machine (or --gres=gpu:N on clusters configured that way). Do not use
#                      --gpus-per-task with several tasks per node unless your cluster binds one GPU to
#                      each task; both layouts are handled below, but the plain one is the most portable.
#   --cpus-per-task    CPU cores per process: image decoding and augmentation run on them
#                      (config.data.workers grain worker processes per JAX process)
#   --time, --output   wall-clock limit; log file (%j: job id), written in the submission directory
#
# How the processes find each other: `srun` starts SLURM_NTASKS copies of `python -m jaxgist`; in each,
# jaxgist.training.parallel.initialize_distributed sees SLURM_NTASKS > 1 inside a job step and calls
# jax.distributed.initialize(), which reads the coordinator (first node of SLURM_STEP_NODELIST, port
# derived from the job id), the process count (SLURM_NTASKS) and this process's index (SLURM_PROCID)
# from the environment. Every process feeds its share of each global batch; process 0 writes the logs.
#
# WORKDIR (and data paths) must be on a filesystem every node mounts: all processes write their shards
# of each checkpoint into WORKDIR/checkpoints. Resubmitting the same command resumes from the latest
# checkpoint there.
#
# Environment (read at submission time: sbatch passes the submitting shell's environment on):
#   JAXGIST_REPO       the jaxgist checkout on the shared filesystem (default: the directory sbatch was
#                      run from, SLURM_SUBMIT_DIR)
#   JAXGIST_VENV       virtual environment to activate on every node (default: JAXGIST_REPO/.venv if it
#                      exists). Install GPU JAX in it: pip install -e . "jax[cuda12]"
#   JAXGIST_SRUN_ARGS  extra srun options, e.g. "--cpu-bind=none"
#   JAX_COORDINATOR_PORT  coordinator port, when the one derived from the job id is taken
#   XLA_PYTHON_CLIENT_MEM_FRACTION, XLA_FLAGS, NCCL_*  passed through to every process as usual
set -euo pipefail

if [ $# -lt 2 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
  echo "usage: sbatch [sbatch options] launch/slurm.sh CONFIG[:ARG] WORKDIR [--config.key=value ...]" >&2
  echo "(see the header of launch/slurm.sh for the #SBATCH defaults and environment variables)" >&2
  exit 2
fi
if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "launch/slurm.sh is a batch script: submit it with sbatch (or run it inside salloc)" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2

repo=${JAXGIST_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$repo/jaxgist/main.py" ]; then
  echo "no jaxgist checkout at $repo: submit from the repository root or set JAXGIST_REPO" >&2
  exit 2
fi
cd "$repo"
venv=${JAXGIST_VENV:-$repo/.venv}
if [ -f "$venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
fi

echo "job $SLURM_JOB_ID: ${SLURM_NTASKS:-1} processes on ${SLURM_JOB_NUM_NODES:-1} nodes ($SLURM_JOB_NODELIST)," \
     "python $(command -v python), workdir $workdir" >&2

# Runs in each task before Python starts: which GPUs this process drives. JAX's SLURM detection makes
# each process use the GPU numbered SLURM_LOCALID, which is right for one task per GPU when every task
# sees all GPUs of its node; the two other layouts need JAX_LOCAL_DEVICE_IDS.
# shellcheck disable=SC2016
per_task='
set -euo pipefail
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=, read -r -a gpus <<< "$CUDA_VISIBLE_DEVICES"; visible=${#gpus[@]}
else
  visible=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
fi
tasks_here=$(( SLURM_NTASKS / SLURM_NNODES ))
if [ -z "${JAX_LOCAL_DEVICE_IDS:-}" ] && [ "$visible" -gt 0 ]; then
  if [ "$visible" -eq 1 ]; then
    export JAX_LOCAL_DEVICE_IDS=0                                  # SLURM bound one GPU to this task
  elif [ "$tasks_here" -eq 1 ]; then
    export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $(( visible - 1 )))    # one process drives every GPU here
  elif [ "$tasks_here" -ne "$visible" ]; then
    echo "task $SLURM_PROCID: $tasks_here tasks but $visible GPUs on $(hostname); use --ntasks-per-node" \
         "equal to the GPUs per node, or 1" >&2
    exit 2
  fi
fi
exec "$@"
'

# --kill-on-bad-exit: if one process fails, stop the others instead of leaving them waiting in a collective.
# shellcheck disable=SC2086
srun --kill-on-bad-exit=1 ${JAXGIST_SRUN_ARGS:-} bash -c "$per_task" jaxgist-task \
  python -m jaxgist --config "$config" --workdir "$workdir" "$@"
