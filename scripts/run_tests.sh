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
# A test stuck in C code past test/conftest.py's hard limit ends the run and leaves the stacks
# of every thread in log/pytest_hang.txt: show them, since that is the one clue there is.
status=0
rm -f log/pytest_hang.txt
python -m pytest test "$@" || status=$?
if [ "$status" -ne 0 ] && [ -s log/pytest_hang.txt ]; then
  echo "[test] a test hung; its threads' stacks (log/pytest_hang.txt):"
  cat log/pytest_hang.txt
  # CI keeps only the end of the output: repeat the innermost frames of the main thread (the
  # last block faulthandler writes) and the test's name there.
  echo "[test] the main thread's innermost frames:"
  awk '/^(Thread|Current thread) 0x/ {n = 0} {block[n++] = $0} END {for (i = 0; i < n && i < 25; i++) print block[i]}' log/pytest_hang.txt
  echo "[test] the test that hung: $(head -n 1 log/pytest_hang.txt)"
fi
exit "$status"
