#!/usr/bin/env bash
# scripts/train.sh — run one training stage through the DeepSpeed launcher.
#
#   bash scripts/train.sh --stage 1                          # all local GPUs (or one CPU process without GPUs)
#   bash scripts/train.sh --stage 2 --num_gpus 4             # 4 local GPUs (on CPU: 4 gloo ranks)
#   bash scripts/train.sh --stage 3 --hostfile hosts.txt     # multi-node (DeepSpeed hostfile: "host slots=8")
#   bash scripts/train.sh --stage 3 --config config/demo.yaml run.name=demo train.max_steps=100
#   bash scripts/train.sh --stage 1 --dry-run                # print the launcher command and exit
#   bash scripts/train.sh --stage 1 --resume                 # continue the run's newest resume checkpoint
#
# Everything after the known flags goes to code/train.py (key=value overrides, --config, --resume, ...).
# MASTER_PORT (default 29500) and MASTER_ADDR are honoured. No GPU ids are hard-coded: restrict GPUs with
# the launcher's own --include/--exclude via DS_LAUNCHER_ARGS="--include localhost:0,1".
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

STAGE=""; HOSTFILE=""; NUM_GPUS=""; DRY=0; PASS=()
die() { echo "train.sh: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) [ $# -ge 2 ] || die "--stage needs a value"; STAGE="$2"; PASS+=(--stage "$2"); shift 2 ;;
    --stage=*) STAGE="${1#--stage=}"; PASS+=(--stage "$STAGE"); shift ;;
    --hostfile) [ $# -ge 2 ] || die "--hostfile needs a file"; HOSTFILE="$2"; shift 2 ;;
    --num_gpus|--num-gpus) [ $# -ge 2 ] || die "--num_gpus needs a number"; NUM_GPUS="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; exit 0 ;;   # the header comment
    *) PASS+=("$1"); shift ;;
  esac
done
case "$STAGE" in 0|1|2|3) ;; "") die "--stage N is required (1, 2 or 3; 0 = LM pretraining of a stand-in model)" ;; *) die "--stage must be 0-3, got '$STAGE'" ;; esac
[ -z "$NUM_GPUS" ] || [[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || die "--num_gpus must be a positive integer, got '$NUM_GPUS'"
[ -z "$HOSTFILE" ] || [ -f "$HOSTFILE" ] || die "hostfile '$HOSTFILE' not found"

[ "$DRY" = 1 ] || bash "$REPO/scripts/setup.sh" >/dev/null

# GPUs: what the driver sees vs what torch can use (a CUDA 13 build on an old driver sees none).
SMI_GPUS=0
if [ -z "${TOOLLMM_FORCE_CPU:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
  SMI_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
fi
TORCH_GPUS=0
if [ "$SMI_GPUS" -gt 0 ]; then
  if [ "$DRY" = 1 ] && [ -n "${TOOLLMM_DRYRUN_TORCH_GPUS:-}" ]; then
    TORCH_GPUS="$TOOLLMM_DRYRUN_TORCH_GPUS"   # tests of the command line on hosts without GPUs
  else
    TORCH_GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  fi
  if [ "$TORCH_GPUS" = 0 ]; then
    die "nvidia-smi sees $SMI_GPUS GPU(s) but torch cannot use them: the NVIDIA driver is probably older than this torch build needs (CUDA 13.0 wheels need driver >= 580). Run 'bash scripts/setup.sh --torch cu128' (CUDA 12.8, driver >= 525) or upgrade the driver. Not falling back to the CPU."
  fi
fi

TRAIN_PY="$REPO/code/train.py"
PORT_ARGS=(--master_port "${MASTER_PORT:-29500}")
[ -z "${MASTER_ADDR:-}" ] || PORT_ARGS+=(--master_addr "$MASTER_ADDR")
# shellcheck disable=SC2206
EXTRA_LAUNCHER=(${DS_LAUNCHER_ARGS:-})
if [ "$TORCH_GPUS" -gt 0 ] || [ -n "$HOSTFILE" ]; then
  CMD=("$VENV/bin/deepspeed" "${PORT_ARGS[@]}" ${EXTRA_LAUNCHER[@]+"${EXTRA_LAUNCHER[@]}"})
  [ -z "$HOSTFILE" ] || CMD+=(--hostfile "$HOSTFILE")
  [ -z "$NUM_GPUS" ] || CMD+=(--num_gpus "$NUM_GPUS")
  CMD+=("$TRAIN_PY" "${PASS[@]}")
else
  RANKS="${NUM_GPUS:-1}"
  CORES=$(nproc 2>/dev/null || echo 1)
  THREADS=$(( CORES / RANKS )); [ "$THREADS" -ge 1 ] || THREADS=1
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$THREADS}"
  if [ "$RANKS" = 1 ]; then
    CMD=("$PYTHON" "$TRAIN_PY" "${PASS[@]}")          # one CPU process, no launcher
  else
    CMD=("$VENV/bin/deepspeed" "${PORT_ARGS[@]}" --num_gpus "$RANKS" "$TRAIN_PY" "${PASS[@]}")   # gloo ranks
  fi
fi

if [ "$DRY" = 1 ]; then
  [ "$TORCH_GPUS" -gt 0 ] || [ -n "$HOSTFILE" ] || printf 'OMP_NUM_THREADS=%s ' "$OMP_NUM_THREADS"
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
