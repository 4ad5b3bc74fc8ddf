"""Rewrite constraints.txt from the current environment (called by `scripts/setup.sh --refreeze`).

The torch-specific pins (torch, torchvision, torchaudio, triton, nvidia-*, cuda-*) go in a marked block
that `setup.sh --torch cu128` removes, so the CUDA 12.8 set can resolve its own.
"""

from __future__ import annotations

import subprocess
import sys

VARIANT = ("torch==", "torchvision==", "torchaudio==", "triton==", "nvidia-", "cuda-")


def main(path: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    )
    pins = sorted((line for line in out.stdout.splitlines() if "==" in line), key=str.lower)
    common = [p for p in pins if not p.startswith(VARIANT)]
    variant = [p for p in pins if p.startswith(VARIANT)]
    lines = [
        "# Transitive pins from the tested environment (pip freeze of a fresh scripts/setup.sh install, pip check clean).",
        "# Regenerate after changing requirements.txt: bash scripts/setup.sh --refreeze",
        "# The block between the torch-cu130 markers is swapped out by `scripts/setup.sh --torch cu128`.",
        *common,
        "# >>> torch-cu130",
        *variant,
        "# <<< torch-cu130",
    ]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    sys.stderr.write(f"freeze_constraints: wrote {len(pins)} pins to {path}\n")


if __name__ == "__main__":
    main(sys.argv[1])
