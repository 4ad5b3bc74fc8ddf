"""One rank of the 2-process stream test (tests/train/test_ranks.py): a gloo process group, the real stream with
2 DataLoader workers, and an all_reduce per step like DDP/DeepSpeed gradient sync (a rank that stopped
early would leave the other blocked in it)."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from _datastream import ToyDecoder, ToyRenderer
from toollmm.data.pipeline import SampleProcessor
from toollmm.data.sources import JsonlSource
from toollmm.data.stream import StreamSettings, TrainStream


def main(data: str, tokenizer: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    r = ToyRenderer(AutoTokenizer.from_pretrained(tokenizer))
    proc = SampleProcessor(r, r.ids, r.media_tokens, 512, ToyDecoder())
    settings = StreamSettings(
        micro_batch_size=2, pad_id=0, rank=rank, world_size=world, shuffle=False, window=2, on_error="skip"
    )
    stream = TrainStream([JsonlSource(data)], proc, settings)
    steps, ids, synced = 0, [], []
    for _ in range(2):
        for batch in stream:
            t = torch.tensor([float(batch.real_tokens)])
            dist.all_reduce(t)  # every step of every rank must meet here
            synced.append(t.item())
            ids += [i for row in batch.sample_ids for i in row]
            steps += 1
    dist.barrier()
    result = {"steps": steps, "ids": ids, "synced": synced, **stream.stats()}
    with open(out, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
