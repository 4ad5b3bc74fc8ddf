#!/usr/bin/env bash
# scripts/bench.sh — speed side by side, and how close training comes to the machine's limit.
#
#   bash scripts/bench.sh            # full size (~100M Llama); writes outputs/bench/bench.{json,md}, docs/scaling.md input
#   bash scripts/bench.sh --quick    # shrunk models, few steps (CI: under 3 minutes); checks every figure
#   bash scripts/bench.sh --sizes vicuna7b   # on a GPU host: the real LLM shape, to check docs/scaling.md
#
# Each figure runs in its own process; the run fails if a figure is missing, not finite or not positive.
# Extra arguments go to `python code/bench.py run` (--out DIR, --threads N, --work DIR).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
bash "$REPO/scripts/setup.sh" >/dev/null
ARGS=("$@")
OUT="$REPO/outputs/bench"
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  [ "${ARGS[$i]}" != "--out" ] || OUT="${ARGS[$((i + 1))]}"
done
"$PYTHON" "$REPO/code/bench.py" run ${ARGS[@]+"${ARGS[@]}"}
"$PYTHON" "$REPO/code/bench.py" scaling --bench "$OUT/bench.json" --out "$OUT/scaling.md"
