#!/usr/bin/env bash
# Run a jaxgist job on this machine: launch/local.sh configs/demo.py /tmp/jaxgist-demo [--config.key=value ...]
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG[:ARG] WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
exec python -m jaxgist --config "$config" --workdir "$workdir" "$@"
