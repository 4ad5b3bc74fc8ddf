"""Subprocess side of tests/checkpoint/test_reproducible_saves.py: save a tiny delta and a feature-cache entry.

python _repro_worker.py LLM_DIR IMAGE OUT
"""

from __future__ import annotations

import sys
from pathlib import Path


def save_all(llm_dir: str, image: str, out: str) -> dict[str, Path]:
    """Write ``OUT/delta`` (delta.safetensors + adapter) and one feature-cache file; returns the files."""
    from model_fixtures import build_tiny
    from toollmm.checkpoint.delta import save_delta
    from toollmm.core.config import load_config
    from toollmm.model.encoder import build_encoder
    from toollmm.model.feature_cache import FeatureCache

    out = Path(out)
    save_delta(build_tiny(llm_dir, seed=0), out / "delta", parts={"lora", "input_proj"})
    enc = build_encoder(load_config(config_files=["config/presets/encoder_tiny.yaml"]).config.model)
    cache = FeatureCache(out / "cache", enc)
    cache.get("image", image)
    return {
        "delta": out / "delta" / "delta.safetensors",
        "adapter": out / "delta" / "adapter" / "adapter_model.safetensors",
        "features": cache.path("image", cache.key("image", image)),
    }


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    save_all(*sys.argv[1:4])
