#!/usr/bin/env bash
# The README's run command (after scripts/setup.sh): starts the node with config/params.yaml.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck disable=SC1091
source ./env.sh
exec python -m qwen3vl_seg_ros.ros.node --ros-args --params-file config/params.yaml "$@"
