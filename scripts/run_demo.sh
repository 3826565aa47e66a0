#!/usr/bin/env bash
# The README's run command (`make demo`, after scripts/setup.sh): the segmentation node with the
# shipped tiny model on the simulated RGB-D camera, driven like a planner; results in demo_output/.
# Options pass through, e.g. ./scripts/run_demo.sh --scenes 5 --model Qwen/Qwen3-VL-2B-Instruct
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck disable=SC1091
source ./env.sh
exec python -m qwen3vl_seg_ros.ros.demo "$@"
