#!/usr/bin/env bash
# Run a jaxgist job on every worker of a Cloud TPU VM pod slice (one process per worker).
#
#   launch/tpu_pod.sh [options] TPU_NAME CONFIG[:ARG] WORKDIR [--config.key=value ...]
#
#   # first time: copy this checkout to every worker and install it (jax[tpu]) in a venv there
#   launch/tpu_pod.sh --zone us-central2-b --sync --install my-v4-32 configs/finetune.py /mnt/shared/runs/cub \
#       --config.data.metadata=/mnt/shared/CUB/metadata.csv --config.data.image_dir=/mnt/shared/CUB/images \
#       --config.data.captions=/mnt/shared/CUB/captions_top5.json
#   # smoke test on the pod: tiny CLIP, generated data
#   launch/tpu_pod.sh --zone us-central2-b my-v4-32 configs/finetune.py:small /mnt/shared/runs/smoke
#
# What it does (from this machine, with gcloud):
#   1. looks up the internal IP of worker 0 (gcloud compute tpus tpu-vm describe) and makes it the
#      jax.distributed coordinator: every worker gets JAX_COORDINATOR_ADDRESS=<ip>:8476, which makes
#      jaxgist.training.parallel.initialize_distributed call jax.distributed.initialize(); jax fills in the
#      process count and this worker's index from the TPU VM metadata server;
#   2. with --sync, copies this checkout (tracked and untracked files git does not ignore) to
#      REMOTE_DIR on every worker; with --install, creates REMOTE_DIR/.venv there and installs the
#      package with its `tpu` extra (jax[tpu], i.e. libtpu);
#   3. runs `python -m jaxgist --config CONFIG --workdir WORKDIR ...` on all workers at once
#      (gcloud compute tpus tpu-vm ssh --worker=all) and waits; with --detach it starts the job
#      under nohup and returns (log: ~/jaxgist-<job>.log on each worker).
#
# WORKDIR is a Cloud Storage URL (gs://bucket/run: checkpoints, metrics.jsonl and results.json go
# there through etils.epath and Orbax) or one directory that every worker sees (Filestore/NFS, a
# bucket mounted with gcsfuse): all processes write their shards of each checkpoint into it, and
# process 0 writes metrics.jsonl, TensorBoard files and results.json. The GIST job's stages write
# numpy files and need a directory (it says so). Relative CONFIG and data paths are relative to
# REMOTE_DIR on the workers; relative WORKDIR too.
#
# Options:
#   --zone ZONE        TPU zone (default: $ZONE, else gcloud's compute/zone property)
#   --project PROJECT  GCP project (default: gcloud's core/project property)
#   --remote-dir DIR   the checkout on the workers, relative to the home directory or absolute
#                      (default: jaxgist)
#   --sync             copy this checkout to REMOTE_DIR on every worker before running
#   --install          create REMOTE_DIR/.venv and `pip install -e '.[tpu,gcs]' -c constraints.txt` on every worker first
#   --env KEY=VALUE    export this variable for the job on every worker (repeatable), e.g.
#                      --env LIBTPU_INIT_ARGS=... --env HF_HOME=/mnt/shared/hf
#   --port PORT        coordinator port on worker 0 (default: 8476)
#   --detach           start the job in the background on every worker and return
#   --dry-run          print the gcloud commands instead of running them
#   -h, --help         this text
#
# Requirements here: gcloud (authenticated), and `ssh-add` of your Google Compute Engine key so that
# the concurrent ssh sessions of --worker=all do not each ask for a passphrase.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
zone=${ZONE:-} project="" remote_dir=jaxgist port=8476
sync=0 install=0 detach=0 dry_run=0
envs=()
while [ $# -gt 0 ]; do
  case $1 in
    --zone) zone=$2; shift 2 ;;
    --zone=*) zone=${1#*=}; shift ;;
    --project) project=$2; shift 2 ;;
    --project=*) project=${1#*=}; shift ;;
    --remote-dir) remote_dir=$2; shift 2 ;;
    --remote-dir=*) remote_dir=${1#*=}; shift ;;
    --env) envs+=("$2"); shift 2 ;;
    --env=*) envs+=("${1#*=}"); shift ;;
    --port) port=$2; shift 2 ;;
    --port=*) port=${1#*=}; shift ;;
    --sync) sync=1; shift ;;
    --install) install=1; shift ;;
    --detach) detach=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    -*) echo "unknown option: $1" >&2; usage 2 >&2 ;;
    *) break ;;
  esac
done
if [ $# -lt 3 ]; then
  echo "usage: $0 [options] TPU_NAME CONFIG[:ARG] WORKDIR [--config.key=value ...]   (--help for more)" >&2
  exit 2
fi
tpu=$1 config=$2 workdir=$3
shift 3
overrides=("$@")

for kv in "${envs[@]+"${envs[@]}"}"; do
  if ! [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
    echo "--env $kv: expected KEY=VALUE" >&2
    exit 2
  fi
done

# gcloud flags shared by every call
gflags=()
[ -n "$zone" ] && gflags+=(--zone "$zone")
[ -n "$project" ] && gflags+=(--project "$project")

run() {  # run (or, with --dry-run, print) a command
  if [ "$dry_run" = 1 ]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

on_all_workers() {  # on_all_workers COMMAND: run a bash command line on every worker, concurrently
  run gcloud compute tpus tpu-vm ssh "$tpu" "${gflags[@]+"${gflags[@]}"}" --worker=all --command "$1"
}

# 1. The coordinator: worker 0's internal IP.
if [ "$dry_run" = 1 ]; then
  coordinator_ip="<worker-0-ip>"
else
  coordinator_ip=$(gcloud compute tpus tpu-vm describe "$tpu" "${gflags[@]+"${gflags[@]}"}" \
                   --format='value(networkEndpoints[0].ipAddress)')
  if [ -z "$coordinator_ip" ]; then
    echo "could not read worker 0's IP address of TPU $tpu (gcloud compute tpus tpu-vm describe)" >&2
    exit 1
  fi
fi

q_dir=$(printf '%q' "$remote_dir")

# 2. Code and environment on the workers.
if [ "$sync" = 1 ]; then
  tarball=$(mktemp "${TMPDIR:-/tmp}/jaxgist-src.XXXXXX.tgz")
  trap 'rm -f "$tarball"' EXIT
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$tarball")
  run gcloud compute tpus tpu-vm scp "$tarball" "$tpu:jaxgist-src.tgz" "${gflags[@]+"${gflags[@]}"}" --worker=all
  on_all_workers "set -e; mkdir -p $q_dir && tar -xzf ~/jaxgist-src.tgz -C $q_dir && rm ~/jaxgist-src.tgz"
fi
if [ "$install" = 1 ]; then
  # TPU VM images ship python3 but not always its venv module.
  on_all_workers "set -e; cd $q_dir
    python3 -m venv .venv 2>/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && python3 -m venv .venv; }
    .venv/bin/pip install -q -U pip
    .venv/bin/pip install -q -e '.[tpu,gcs]' -c constraints.txt
    .venv/bin/python -c 'import jax; print(jax.process_count(), \"process,\", jax.local_device_count(), \"local TPU devices\")'"
fi

# 3. The job.
job=$(date +%Y%m%d-%H%M%S)
cmd="set -eo pipefail; cd $q_dir; if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi"
cmd+="; export JAX_COORDINATOR_ADDRESS=$(printf '%q' "$coordinator_ip:$port")"
for kv in "${envs[@]+"${envs[@]}"}"; do
  cmd+="; export ${kv%%=*}=$(printf '%q' "${kv#*=}")"
done
py=$(printf '%q ' python -m jaxgist --config "$config" --workdir "$workdir" "${overrides[@]+"${overrides[@]}"}")
if [ "$detach" = 1 ]; then
  log="jaxgist-$job.log"
  cmd+="; nohup $py > ~/$log 2>&1 < /dev/null & echo \"\$(hostname): started job $job (pid \$!), log ~/$log\""
else
  cmd+="; $py"
fi
echo "TPU $tpu: coordinator $coordinator_ip:$port, workdir $workdir" >&2
on_all_workers "$cmd"
