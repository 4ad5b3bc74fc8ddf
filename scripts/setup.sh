#!/usr/bin/env bash
# scripts/setup.sh — create .venv/ at the repo root with every pinned dependency and toollmm (editable).
#
#   bash scripts/setup.sh                 # CPU hosts and GPU hosts with NVIDIA driver >= 580 (torch 2.11, CUDA 13.0 wheels)
#   bash scripts/setup.sh --torch cu128   # GPU hosts with older drivers (torch 2.9.1, CUDA 12.8 wheels)
#   bash scripts/setup.sh --refreeze      # after editing requirements.txt: reinstall and rewrite constraints.txt
#
# Idempotent: a second run with unchanged requirements, constraints, pyproject and torch set takes seconds.
# Needs Python 3.11 (python3.11 or python3; override with PYTHON=/path/to/python).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
TORCH_SET="cu130"
REFREEZE=0

die() { echo "setup.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; }   # the header comment

while [ $# -gt 0 ]; do
  case "$1" in
    --torch) [ $# -ge 2 ] || die "--torch needs a value (cu130 or cu128)"; TORCH_SET="$2"; shift 2 ;;
    --torch=*) TORCH_SET="${1#--torch=}"; shift ;;
    --refreeze) REFREEZE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
case "$TORCH_SET" in cu130|cu128) ;; *) die "--torch must be cu130 or cu128, got '$TORCH_SET'" ;; esac

# ---- python 3.11
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$(command -v "$cand")"; break; fi
  done
fi
[ -n "$PY" ] || die "no python3.11 or python3 on PATH; install Python 3.11 or set PYTHON=/path/to/python3.11"
PYVER="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || die "cannot run $PY"
[ "$PYVER" = "3.11" ] || die "Python 3.11 is required (the pinned torch/deepspeed set is tested on it); $PY is $PYVER. Set PYTHON=/path/to/python3.11"

# ---- requirements for the chosen torch set
REQ="$REPO/requirements.txt"
CONS="$REPO/constraints.txt"
[ -f "$REQ" ] || die "missing $REQ"
[ -f "$CONS" ] || die "missing $CONS"
STAMP_WANT="$( { cat "$REQ" "$CONS" "$REPO/pyproject.toml"; echo "torch=$TORCH_SET py=$PYVER"; } | sha256sum | cut -d' ' -f1)"
STAMP_FILE="$VENV/.toollmm-setup-stamp"

mkdir -p "$REPO/.cache/torch_extensions"
if [ "$REFREEZE" = 0 ] && [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$STAMP_WANT" ] \
   && "$VENV/bin/python" -c "import toollmm" >/dev/null 2>&1; then
  echo "setup.sh: .venv is up to date (torch set $TORCH_SET)"
  exit 0
fi

START=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup.sh: creating $VENV with $PY ($PYVER)"
  "$PY" -m venv "$VENV" || die "python -m venv failed (on Debian: apt-get install python3.11-venv)"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
if [ "$TORCH_SET" = cu128 ]; then
  # torch 2.9.1 wheels on PyPI are CUDA 12.8 builds (NVIDIA driver >= 525); ENVIRONMENT notes they install with this stack.
  sed -e 's/^torch==.*/torch==2.9.1/' -e 's/^torchvision==.*/torchvision==0.24.1/' -e 's/^torchaudio==.*/torchaudio==2.9.1/' "$REQ" > "$TMP/requirements.txt"
  sed '/^# >>> torch-cu130/,/^# <<< torch-cu130/d' "$CONS" > "$TMP/constraints.txt"
else
  cp "$REQ" "$TMP/requirements.txt"
  cp "$CONS" "$TMP/constraints.txt"
fi
if [ "$REFREEZE" = 1 ]; then
  : > "$TMP/constraints.txt"   # resolve afresh from requirements.txt alone
fi

echo "setup.sh: installing pinned requirements (torch set $TORCH_SET); a cold install takes ~2 min and ~5.5 GB"
"${PIP[@]}" install -r "$TMP/requirements.txt" -c "$TMP/constraints.txt" \
  || die "pip install failed (see the pip output above). Network: only PyPI is needed."
"${PIP[@]}" install --no-deps --no-build-isolation -e "$REPO" >/dev/null \
  || die "editable install of toollmm failed"
"${PIP[@]}" check || die "pip check found broken requirements (see above)"

if [ "$REFREEZE" = 1 ]; then
  "$VENV/bin/python" "$REPO/scripts/freeze_constraints.py" "$CONS"
  STAMP_WANT="$( { cat "$REQ" "$CONS" "$REPO/pyproject.toml"; echo "torch=$TORCH_SET py=$PYVER"; } | sha256sum | cut -d' ' -f1)"
fi

"$VENV/bin/python" -c "import toollmm, torch; print('setup.sh: toollmm', toollmm.__version__, '| torch', torch.__version__)" \
  || die "toollmm does not import after install"
# On a CPU host DeepSpeed JIT-compiles its shared-memory all-reduce op the first time two ranks start (~20 s
# inside the demo's first stage): build it now, into the folder every run uses (ensure_torch_extensions_dir).
"$VENV/bin/python" - <<'PY' \
  || echo "setup.sh: note: DeepSpeed's CPU all-reduce op did not prebuild; the first 2-rank run builds it (see above)"
from toollmm.core.paths import build_cpu_comm_op
seconds = build_cpu_comm_op()
if seconds is not None:
    print(f"setup.sh: DeepSpeed's CPU all-reduce op built in {seconds:.0f} s")
PY
echo "$STAMP_WANT" > "$STAMP_FILE"
echo "setup.sh: done in $(( $(date +%s) - START )) s. Activate with: source .venv/bin/activate"
