#!/usr/bin/env bash
# scripts/test.sh — install if needed, lint, then run the test suite (CPU, offline, tiny models).
#
#   bash scripts/test.sh                 # fast tests (default; about 10 minutes or less on 2 cores)
#   bash scripts/test.sh --all           # also the `slow` end-to-end tests (demo --small, multi-process DeepSpeed)
#   bash scripts/test.sh tests/core/test_config.py -k override    # extra arguments go to pytest
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

MARKERS="not slow and not gpu"
ARGS=()
for a in "$@"; do
  case "$a" in
    --all) MARKERS="not gpu" ;;
    *) ARGS+=("$a") ;;
  esac
done

bash "$REPO/scripts/setup.sh"
cd "$REPO"
echo "test.sh: ruff check"
"$VENV/bin/ruff" check code tests scripts
echo "test.sh: pytest -m '$MARKERS'"
exec "$PYTHON" -m pytest -m "$MARKERS" ${ARGS[@]+"${ARGS[@]}"}
