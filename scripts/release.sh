#!/usr/bin/env bash
# scripts/release.sh — publish a stage folder to the Hugging Face Hub (the trained delta + a model card).
#
#   bash scripts/release.sh --checkpoint outputs/demo/stage_3 --repo-id me/toollmm-demo --dry-run --out outputs/release/demo
#   bash scripts/release.sh --checkpoint outputs/run/stage_3 --repo-id me/toollmm-7b --private
#   bash scripts/release.sh --checkpoint outputs/run/stage_3 --repo-id me/toollmm-7b --merge   # + merged/ LLM (base size)
#
# --dry-run writes and checks the folder and lists every file without uploading. Without it the folder is
# uploaded with huggingface_hub (token from `hf auth login` or HF_TOKEN; never printed). All flags go to
# code/release.py (see `bash scripts/release.sh --help` for --license, --dataset, --base-id, --merge-dtype).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
case "${1:-}" in -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' ;; esac
bash "$REPO/scripts/setup.sh" >/dev/null   # creates/updates .venv only when needed (a stamp check otherwise)
exec "$PYTHON" "$REPO/code/release.py" "$@"
