"""Rewrite constraints.txt from the current environment (called by `scripts/setup.sh --refreeze`).

The torch-specific pins (torch, torchvision, torchaudio, triton, nvidia-*, cuda-*) go in a marked block
that `setup.sh --torch cu128` removes, so the CUDA 12.8 set can resolve its own. The ``gpu-only`` block
(packages this environment never installs, e.g. liger-kernel for ``model.llm.fused_kernels``, carried to a
GPU host by ``scripts/gpu_check.sh --wheelhouse``) is kept as it stands.
"""

from __future__ import annotations

import subprocess
import sys

VARIANT = ("torch==", "torchvision==", "torchaudio==", "triton==", "nvidia-", "cuda-")


def kept_block(text: str, name: str = "gpu-only") -> list[str]:
    """The lines of the ``# >>> name`` ... ``# <<< name`` block of ``text`` (markers included), or []."""
    lines = text.splitlines()
    start = next((i for i, x in enumerate(lines) if x.startswith(f"# >>> {name}")), None)
    if start is None:
        return []
    end = next((i for i in range(start, len(lines)) if lines[i].startswith(f"# <<< {name}")), len(lines) - 1)
    return lines[start : end + 1]


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
    try:
        with open(path, encoding="utf-8") as f:
            lines += kept_block(f.read())
    except FileNotFoundError:
        pass
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    sys.stderr.write(f"freeze_constraints: wrote {len(pins)} pins to {path}\n")


if __name__ == "__main__":
    main(sys.argv[1])
