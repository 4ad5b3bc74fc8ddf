"""Per-GPU training memory of stages 1-3 for Vicuna-7B (or any Llama-shaped LLM config) under ZeRO-2 and
ZeRO-3, from the model config and the stage YAMLs' micro-batch and max length.

    python scripts/memory_estimate.py                       # Vicuna-7B v1.5, 1/2/4/8 GPUs, features cached
    python scripts/memory_estimate.py --llm-config pretrained_checkpoint/llm_ckpt/vicuna_7b/config.json
    python scripts/memory_estimate.py --gpus 1 8 16 --no-feature-cache train.micro_batch_size=4

Prints the formula (toollmm.train.memory), then one markdown table: GiB per GPU, CUDA context not included.
Extra key=value arguments override every stage's config (as for code/train.py).
"""

from __future__ import annotations

import argparse
import json
import sys

from toollmm.core.config import load_config
from toollmm.core.paths import resolve
from toollmm.train import memory as mem


def llm_config(path: str | None, cfg) -> tuple[dict, str]:
    """The LLM's config.json: ``--llm-config``, else the one at ``model.llm.path``, else Vicuna-7B v1.5's."""
    candidates = [resolve(path)] if path else [resolve(cfg.model.llm.path) / "config.json"]
    for p in candidates:
        if p.is_file():
            return json.loads(p.read_text()), str(p)
        if path:
            sys.exit(f"memory_estimate.py: {p}: no such config.json")
    return dict(mem.VICUNA_7B), "lmsys/vicuna-7b-v1.5 (built in; its weights are not downloaded)"


def table(llm: dict, stages, gpus, cached: bool, overrides) -> list[str]:
    head = "| stage | trained params T | b x s | ZeRO | " + " | ".join(f"{n} GPU" for n in gpus) + " |"
    lines = [head, "|" + "---|" * (4 + len(gpus))]
    for stage in stages:
        cfg = load_config(stage=stage, overrides=overrides).config
        s = mem.stage_sizes(llm, cfg, cached_features=cached)
        for zero in (2, 3):
            cells = [f"{sum(mem.per_gpu_bytes(s, zero, n).values()) / mem.GiB:.1f}" for n in gpus]
            row = [str(stage), f"{s.trainable / 1e6:.1f} M", f"{s.micro_batch} x {s.seq_len}", str(zero), *cells]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm-config", help="an HF config.json (default: model.llm.path's, else Vicuna-7B's)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8], help="GPU counts (columns)")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    parser.add_argument("--no-feature-cache", action="store_true", help="ImageBind-huge in the model (ZeRO-2)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every stage")
    args = parser.parse_args(argv)
    llm, where = llm_config(args.llm_config, load_config(overrides=args.overrides).config)
    base, layer, _ = mem.llama_params(llm)
    print(mem.__doc__.split("\n\n", 1)[1].rstrip())
    print(f"\nLLM: {where}: {base / 1e9:.2f} B parameters ({layer / 1e6:.0f} M per layer)")
    cached = "cached (E = 0)" if not args.no_feature_cache else "not cached (ImageBind-huge in bf16)"
    print(f"Encoder features: {cached}. GiB per GPU, CUDA context not included:\n")
    print("\n".join(table(llm, args.stages, args.gpus, not args.no_feature_cache, args.overrides)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
