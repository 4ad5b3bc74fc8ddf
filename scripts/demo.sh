#!/usr/bin/env bash
# scripts/demo.sh — the embedded default: the whole system, tiny, trained on this CPU, visibly learning.
#
#   bash scripts/demo.sh            # full demo corpus (about 10-15 min on 2 cores)
#   bash scripts/demo.sh --small    # small corpus (a few minutes; what the slow test runs)
#   bash scripts/demo.sh --out /tmp/demo --small    # everything under /tmp/demo (the checkout is not touched)
#   bash scripts/demo.sh --dry-run [--out DIR]      # print each step's command, run nothing
#   bash scripts/demo.sh --rebuild                  # retrain the stage-0 stand-in even if it could be reused
#   bash scripts/demo.sh -- train.optim.lr=1e-3      # key=value overrides after -- go to every train.sh call
#
# 1. setup (.venv)  2. corpus -> data/demo/  3. base models -> outputs/demo/base/ (a user places real
# checkpoints the same way)  4. stages 0-3 through scripts/train.sh --config config/demo.yaml, each followed
# by its held-out evaluation (python code/evaluate.py demo)  5. one inference request (code/inference.py)
# and a 3-turn chat (inference.py --chat: calculator, caption of an attached image, image generation)
# 6. outputs/demo/metrics.json and a summary table. Each step's full log: outputs/demo/logs/.
# With --out DIR: the run folder is DIR (base models, caches, stage folders, logs, metrics.json) and the
# corpus DIR/data (run.output_root, run.name and vars.demo_data of config/demo.yaml are set to match).
# Starts from a clean run folder (stage folders, logs and metrics of a previous demo are removed; base
# models are rebuilt; the encoder-feature and caption caches under <run>/cache/ are reused). The stage-0
# stand-in LM (stage_0/ and base/llm/) is reused when its inputs are unchanged: the stage-0 text, the
# tokenizer, the initial LM, config/demo.yaml and config/stage_0.yaml, the code (git tree of code/ plus
# uncommitted edits), the ranks and the overrides, hashed into stage_0/demo_inputs.sha256. --rebuild retrains it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

SMALL=0; EXTRA=(); OUT=""; DRY=0; REBUILD=0
while [ $# -gt 0 ]; do
  case "$1" in
    --small) SMALL=1; shift ;;
    --out) [ $# -ge 2 ] || { echo "demo.sh: --out needs a folder" >&2; exit 2; }; OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    --dry-run) DRY=1; shift ;;
    --rebuild) REBUILD=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "demo.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
SMALL_FLAG=(); [ "$SMALL" = 1 ] && SMALL_FLAG=(--small)

# Tiny matrices: one thread per process is fastest, and several threads on a busy machine are far slower.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Both cores: on a CPU host with >= 2 cores each stage runs as 2 gloo ranks (scripts/train.sh --num_gpus 2)
# with micro batch 8 per rank, so the global batch (16) and the optimiser steps equal a one-process run's.
# DEMO_RANKS=1 runs one process. On a GPU host train.sh uses the local GPUs as usual (one rank here).
if [ -z "${DEMO_RANKS:-}" ]; then
  DEMO_RANKS=1
  if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; }; then
    # (nproc counts OMP_NUM_THREADS, set above: ask without it)
    [ "$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1)" -ge 2 ] && DEMO_RANKS=2
  fi
fi
case "$DEMO_RANKS" in 1) RANK_ARGS=() ;; 2) RANK_ARGS=(--num_gpus 2 train.micro_batch_size=8) ;;
  *) echo "demo.sh: DEMO_RANKS must be 1 or 2, got '$DEMO_RANKS'" >&2; exit 2 ;; esac
# a free port per demo, so two demos (or a demo and a test) on one machine do not collide on 29500
[ "$DEMO_RANKS" = 1 ] || [ -n "${MASTER_PORT:-}" ] || export MASTER_PORT="$("$PYTHON" -c \
  'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
CONFIG="config/demo.yaml"
if [ -n "$OUT" ]; then   # a folder typed on the command line: relative to the current directory
  case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
  RUN="${OUT%/}"; DATA="$RUN/data"
  # the run folder is <run.output_root>/<run.name>; every demo path in config/demo.yaml follows these
  WHERE=("run.output_root=$(dirname "$RUN")" "run.name=$(basename "$RUN")" "vars.demo_data=$DATA")
else
  RUN="$REPO/outputs/demo"; DATA="data/demo"; WHERE=()
fi
LOGS="$RUN/logs"
now() { date +%s.%N; }
T0=$(now)
secs() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# run_step NAME CMD...: the command's output goes to $LOGS/NAME.log; its tail is shown if it fails.
run_step() {
  local name="$1"; shift
  if [ "$DRY" = 1 ]; then printf '%s: ' "$name"; printf '%q ' "$@"; echo; return 0; fi
  local t; t=$(now)
  printf '[demo] %-26s ' "$name"
  if "$@" > "$LOGS/$name.log" 2>&1; then
    echo "done in $(secs "$t") s"
  else
    echo "FAILED (exit $?) after $(secs "$t") s; last lines of $LOGS/$name.log:"
    tail -n 30 "$LOGS/$name.log" >&2
    exit 1
  fi
}

cd "$REPO"
if [ "$DRY" = 0 ]; then
  bash "$REPO/scripts/setup.sh"
  rm -rf "$RUN"/stage_1 "$RUN"/stage_2 "$RUN"/stage_3 "$RUN/metrics.json" "$RUN/chat.json" "$RUN/chat" "$LOGS"   # stage_0: see below
  mkdir -p "$LOGS"
  echo "[demo] $( [ "$SMALL" = 1 ] && echo small || echo full ) run in $RUN, $DEMO_RANKS rank(s), OMP_NUM_THREADS=$OMP_NUM_THREADS, logs in $LOGS"
fi

run_step corpus "$PYTHON" code/prepare_data.py demo --output "$DATA" ${SMALL_FLAG[@]+"${SMALL_FLAG[@]}"}
run_step base_models "$PYTHON" code/prepare_data.py demo-base --config "$CONFIG" --corpus "$DATA" \
  --output "$RUN/base"

# The inputs of stage 0, hashed: a stage_0/ (and its export base/llm/) trained on the same is reused.
stage0_key() {
  {
    sha256sum "$DATA/train/lm_pretrain.jsonl" "$DATA/tokenizer/tokenizer.model" "$RUN"/base/llm_init/*.safetensors \
      "$CONFIG" config/stage_0.yaml | cut -d' ' -f1
    git -C "$REPO" rev-parse HEAD:code 2>/dev/null || echo "no git"
    git -C "$REPO" diff HEAD -- code config 2>/dev/null || true
    printf '%s\n' "ranks=$DEMO_RANKS" ${WHERE[@]+"${WHERE[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
  } | sha256sum | cut -d' ' -f1
}
STAGE0_KEY=""
if [ "$DRY" = 0 ]; then
  STAGE0_KEY=$(stage0_key)
  if [ "$REBUILD" = 0 ] && [ -f "$RUN/stage_0/demo_inputs.sha256" ] && [ -f "$RUN/base/llm/config.json" ] \
     && [ "$(cat "$RUN/stage_0/demo_inputs.sha256")" = "$STAGE0_KEY" ]; then
    STAGE0_REUSED=1
  else
    STAGE0_REUSED=0
    rm -rf "$RUN/stage_0" "$RUN/base/llm"
  fi
fi

# Stage N's held-out tasks: stage 1 is also scored on t2x (the alignment before stage 2 trained it).
EVAL_TASKS=("" "x2t,t2x" "t2x" "tools,multiturn,x2t,t2x")
for STAGE in 0 1 2 3; do
  if [ "$STAGE" = 0 ] && [ "$DRY" = 0 ] && [ "$STAGE0_REUSED" = 1 ]; then
    echo "[demo] stage_0                    reused: its inputs are unchanged (--rebuild retrains it)"
    continue
  fi
  # the small corpus's stage-0 text is a tenth of the full one: more passes, or the stand-in LM cannot yet
  # copy the attribute words that stage 1 relies on (at 5.2 epochs it stopped at loss 1.5, stage 1 at chance)
  SMALL_STAGE0=(); [ "$SMALL" = 1 ] && [ "$STAGE" = 0 ] && SMALL_STAGE0=(train.epochs=16)
  run_step "stage_$STAGE" bash scripts/train.sh --stage "$STAGE" --config "$CONFIG" \
    ${RANK_ARGS[@]+"${RANK_ARGS[@]}"} ${WHERE[@]+"${WHERE[@]}"} ${SMALL_STAGE0[@]+"${SMALL_STAGE0[@]}"} \
    ${EXTRA[@]+"${EXTRA[@]}"}
  [ "$STAGE" != 0 ] || [ "$DRY" = 1 ] || echo "$STAGE0_KEY" > "$RUN/stage_0/demo_inputs.sha256"
  if [ -n "${EVAL_TASKS[$STAGE]}" ]; then
    run_step "eval_stage_$STAGE" "$PYTHON" code/evaluate.py demo --checkpoint "$RUN/stage_$STAGE" \
      --data "$DATA" --tasks "${EVAL_TASKS[$STAGE]}" --workers "$DEMO_RANKS"
    [ "$DRY" = 1 ] || sed -n 's/^\[demo-eval\] /         /p' "$LOGS/eval_stage_$STAGE.log"
  fi
done

# One request through the inference CLI (the demo tool set runs in-process): the trained model picks a
# tool, fills its arguments from the request, reads the result and answers.
PROMPT="Check the weather for Zurich tomorrow."
INFER=("$PYTHON" code/inference.py --checkpoint "$RUN/stage_3" --prompt "$PROMPT" --json --output-dir "$RUN/inference")
REPORT=("$PYTHON" code/evaluate.py demo-report --run "$RUN")
if [ "$DRY" = 1 ]; then
  printf 'inference: '; printf '%q ' "${INFER[@]}"; echo
  printf 'chat: '; printf '%q ' "$PYTHON" code/inference.py --checkpoint "$RUN/stage_3" --chat --json --output-dir "$RUN/chat"; echo
  printf 'report: '; printf '%q ' "${REPORT[@]}" ${SMALL_FLAG[@]+"${SMALL_FLAG[@]}"}; echo
  exit 0
fi
t=$(now)
if "${INFER[@]}" > "$LOGS/inference.json" 2> "$LOGS/inference.log"; then
  echo "[demo] inference                  done in $(secs "$t") s: $LOGS/inference.json"
  "$PYTHON" - "$LOGS/inference.json" "$PROMPT" <<'PY'
import json, sys
out = json.load(open(sys.argv[1]))
print(f"         user: {sys.argv[2]}")
print("         model: " + json.dumps(out, ensure_ascii=False)[:600])
PY
else
  echo "[demo] inference                  FAILED after $(secs "$t") s; last lines of $LOGS/inference.log:" >&2
  tail -n 20 "$LOGS/inference.log" >&2
  exit 1
fi

# A 3-turn chat through the same runtime (inference.py --chat keeps the history as training renders it):
# a tool call, a caption of an image attached in the second turn, then an image generated by the model.
CHAT_IMAGE="$DATA/media/image/heldout/00000.png"
CHAT_IN=("What is 120 plus 35?" "/image $CHAT_IMAGE" "Caption this image." "Draw a blue triangle.")
t=$(now)
if printf '%s\n' "${CHAT_IN[@]}" | "$PYTHON" code/inference.py --checkpoint "$RUN/stage_3" --chat --json \
    --output-dir "$RUN/chat" > "$LOGS/chat.jsonl" 2> "$LOGS/chat.log"; then
  echo "[demo] 3-turn chat                done in $(secs "$t") s: $RUN/chat.json"
  "$PYTHON" - "$LOGS/chat.jsonl" "$RUN/chat.json" "${CHAT_IN[@]}" <<'PY'
import json, sys
outs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
turns, media = [], []
for line in sys.argv[3:]:
    if line.startswith("/image "):
        media.append(line.split(" ", 1)[1])
        continue
    turns.append({"user": line, "images": media, "output": outs[len(turns)] if len(turns) < len(outs) else None})
    media = []
json.dump({"turns": turns}, open(sys.argv[2], "w"), indent=1)
for t in turns:
    o = t["output"] or {}
    calls = "; ".join(f"{c['name']}({json.dumps(c['arguments'])}) -> {c['result']}" for c in o.get("tool_calls", []))
    print(f"         user: {t['user']}" + (f"  [image {t['images'][0]}]" if t["images"] else ""))
    print(f"         model: {o.get('text')!r}" + (f"  [tool: {calls}]" if calls else "")
          + "".join(f"  [{m['modality']}: {m['path']}]" for m in o.get("media", []))
          + (f"  errors: {o['errors']}" if o.get("errors") else ""))
PY
else
  echo "[demo] 3-turn chat                FAILED after $(secs "$t") s; last lines of $LOGS/chat.log:" >&2
  tail -n 20 "$LOGS/chat.log" >&2
  exit 1
fi

"${REPORT[@]}" --total-wall-s "$(secs "$T0")" ${SMALL_FLAG[@]+"${SMALL_FLAG[@]}"} 2>"$LOGS/report.log"
