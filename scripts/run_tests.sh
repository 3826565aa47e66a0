#!/usr/bin/env bash
# Runs the linter and the whole test suite in the environment made by scripts/setup.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck disable=SC1091
source ./env.sh
echo "[test] ruff"
ruff check .
echo "[test] pytest"
python -m pytest test "$@"
