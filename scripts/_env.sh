# scripts/_env.sh — sourced by the other scripts: repo root, venv, and the environment every run shares.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
PYTHON="$VENV/bin/python"
# DeepSpeed JIT-builds ops here once; a persistent, git-ignored folder so tests and runs reuse them.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO/.cache/torch_extensions}"
mkdir -p "$TORCH_EXTENSIONS_DIR"
export PYTHONUNBUFFERED=1
# OpenMP threads sleep instead of spinning at barriers: on a shared or oversubscribed CPU host, spinning
# made element-wise ops ~20x slower (scripts/bench.sh measures this; docs/benchmarks.md).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
