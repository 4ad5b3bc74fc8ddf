"""The end of a stage: the loadable stage folder (ZeRO-3 parameters gathered first) and the rank report
(what data each rank trained on, and whether every rank holds the same trained weights)."""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import nullcontext
from pathlib import Path

import torch

from toollmm.core.paths import resolve

from ..checkpoint.stage import save_stage

log = logging.getLogger(__name__)


def save_loadable(engine, model, cfg, stage_dir: Path, rank: int, extra: dict) -> None:
    """Stage folder (+ optional full-LLM export). Under ZeRO-3 the parameters are partitioned across
    ranks: every rank gathers the ones the stage folder holds (all of them for an LLM export) before
    rank 0 writes, so a LoRA adapter is never saved empty (LLaVA #1734)."""
    import deepspeed

    gather = nullcontext()
    if engine.zero_optimization_partition_weights():
        gather = deepspeed.zero.GatheredParameters(saved_parameters(model, cfg), modifier_rank=None)
    with gather:
        if rank == 0:
            save_stage(model, cfg, stage_dir, extra)
            if cfg.train.export_llm:
                from ..checkpoint.stage import export_llm

                export_llm(model, resolve(cfg.train.export_llm))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def saved_parameters(model, cfg) -> list[torch.nn.Parameter]:
    """The parameters a stage folder reads: the delta's tensors and the LoRA adapter (everything for
    an LLM export)."""
    from ..checkpoint.delta import delta_tensors

    if cfg.train.export_llm or "llm" in model.delta_parts:
        return list(model.parameters())
    tensors = delta_tensors(model, model.delta_parts)
    lora = [p for n, p in model.llm.named_parameters() if "lora_" in n]
    unique = {id(p): p for p in [*tensors.values(), *lora]}
    return list(unique.values())


class SeenSamples:
    """Order-free digest of the sample ids this rank trained on (sum of 64-bit hashes), resumable."""

    def __init__(self, state: dict | None = None):
        self.count = int((state or {}).get("count", 0))
        self.digest = int((state or {}).get("digest", 0))

    def add(self, batch) -> None:
        for row in batch.sample_ids:
            for sid in row:
                h = hashlib.blake2b(str(sid).encode(), digest_size=8).digest()
                self.digest = (self.digest + int.from_bytes(h, "little")) % 2**64
                self.count += 1

    def state(self) -> dict:
        return {"count": self.count, "digest": self.digest}


def weights_digest(engine, model) -> str | None:
    """sha256 of this rank's trainable parameters (None under ZeRO-3: they are partitioned)."""
    if engine.zero_optimization_partition_weights():
        return None
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def rank_report(engine, model, seen: SeenSamples, stream, rank: int, stage_dir: Path) -> list[dict]:
    """Every rank's data digest, padding-batch count and weights digest; rank 0 writes ``ranks.json``.
    Ranks whose trained weights differ are logged as an error (data parallelism broke)."""
    mine = {
        "rank": rank,
        "samples": seen.count,
        "samples_digest": f"{seen.digest:016x}",
        "padding_batches": stream.padding_batches,
        "skipped": dict(stream.skipped),
        "weights_sha256": weights_digest(engine, model),
    }
    rows = [mine]
    if torch.distributed.is_initialized():
        rows = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(rows, mine)
    if rank == 0:
        (Path(stage_dir) / "ranks.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
        shas = {r["weights_sha256"] for r in rows}
        if len(shas) > 1:
            log.error("ranks hold DIFFERENT trained weights: %s", [r["weights_sha256"] for r in rows])
    return rows
