#!/usr/bin/env bash
# scripts/gpu_check.sh — everything a GPU host must prove, in one run that never hangs:
#
#   bash scripts/gpu_check.sh                       # on a GPU host: bf16, Vicuna-7B / ImageBind-huge shapes
#   bash scripts/gpu_check.sh --cpu                 # the same sections at tiny sizes on the CPU (fp32, gloo)
#   bash scripts/gpu_check.sh --wheelhouse [DIR]    # HERE (with network): wheels a bare GPU host lacks -> DIR
#
# Writes outputs/gpu_check/gpu_check.json (+ gpu_check.log), copied to $OUT when that is set. Without .venv/
# the script installs .wheelhouse/*.whl into /tmp/site (--no-index --no-deps) over the host's own python3.
# The wheelhouse also holds the check's small demo corpus (demo/, rendered here: video needs PyAV).
# Exit status 1 when a kernel invariant fails or a section fails (each is recorded in the JSON).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# pinned packages the GPU image lacks or has at another version, and their missing dependencies
# (checked against /work/.library/device/KINDS.md's list and each wheel's Requires-Dist)
# Not carried: numpy (the image's 2.5 under its own compiled stack), huggingface_hub (its 1.33 satisfies
# transformers, diffusers and peft; 2.x would add httpx2), av (36 MB; the check then leaves video files out
# of stage 1 and encodes synthetic video), wandb (the check runs with wandb disabled).
# liger-kernel (model.llm.fused_kernels, the fused_kernels section) is pure Python over the image's torch /
# triton; the venv here never installs it (CUDA only): its pin is constraints.txt's gpu-only block.
WHEELS=(
  deepspeed hjson pydantic pydantic_core annotated-types typing-inspection
  transformers tokenizers peft sentencepiece diffusers importlib_metadata
  imagebind-unofficial ftfy wcwidth iopath pytorchvideo setuptools
  jsonschema jsonschema-specifications referencing rpds-py
  soundfile cffi pycparser platformdirs sniffio
  liger-kernel
)

pin() {  # NAME -> NAME==VERSION from constraints.txt / requirements.txt (case and -/_ insensitive)
  local want
  want="$(echo "$1" | tr 'A-Z_' 'a-z-')"
  cat "$REPO/constraints.txt" "$REPO/requirements.txt" | grep -v '^#' | while IFS='=' read -r name _ ver; do
    [ "$(echo "$name" | tr 'A-Z_' 'a-z-')" = "$want" ] && { echo "$name==$ver"; break; }
  done
}

wheelhouse() {
  local dir="${1:-$REPO/.wheelhouse}"
  mkdir -p "$dir"
  local py="$REPO/.venv/bin/python"
  [ -x "$py" ] || py=python3
  for name in "${WHEELS[@]}"; do
    [ "$name" != deepspeed ] || continue
    spec="$(pin "$name")"
    [ -n "$spec" ] || { echo "no pin for $name in constraints.txt" >&2; exit 2; }
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$dir" "$spec" 2>/dev/null ||
      "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "$spec"  # sdist only (pure Python)
  done
  if ! ls "$dir"/deepspeed-*.whl >/dev/null 2>&1; then  # PyPI has only an sdist: build it (pure Python)
    "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "$(pin deepspeed)"
  fi
  if [ ! -f "$dir/demo/summary.json" ]; then  # the check's corpus (rendering video needs PyAV, left out above)
    PYTHONPATH="$REPO/code" "$py" -c "import sys; from toollmm.demo.corpus import generate_demo_corpus as g; g(sys.argv[1], small=True)" "$dir/demo"
  fi
  echo "wheelhouse $dir: $(ls "$dir"/*.whl | wc -l) wheels, $(du -sh "$dir" | cut -f1)"
}

ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse)
      if [ $# -gt 1 ] && [ "${2#-}" = "$2" ]; then wheelhouse "$2"; else wheelhouse; fi
      exit 0
      ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

if [ -x "$REPO/.venv/bin/python" ]; then
  PY="$REPO/.venv/bin/python"
  export PYTHONPATH="$REPO/code${PYTHONPATH:+:$PYTHONPATH}"
else  # a bare GPU host: its python3 + the carried wheels
  PY=python3
  if ! ls "$REPO"/.wheelhouse/*.whl >/dev/null 2>&1; then
    echo "no .venv/ and no .wheelhouse/: run 'bash scripts/gpu_check.sh --wheelhouse' where pip has network" >&2
    exit 2
  fi
  if [ ! -f /tmp/site/.toollmm_wheelhouse ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$REPO"/.wheelhouse/*.whl
    touch /tmp/site/.toollmm_wheelhouse
  fi
  export PYTHONPATH="$REPO/code:/tmp/site"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) > 1 ? $(nproc) / 2 : 1 ))}"
case " ${ARGS[*]-} " in
  *" --budget "* | *" --cpu "*) ;;
  *) ARGS+=(--budget "$((465 - SECONDS))") ;;  # the GPU run, install included, ends within 8 minutes
esac
exec "$PY" "$REPO/scripts/gpu_check.py" ${ARGS[@]+"${ARGS[@]}"}
