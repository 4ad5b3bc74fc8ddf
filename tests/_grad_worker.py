"""One rank of the gradient-reduction check (started by the deepspeed launcher from test_train_two_ranks.py).

A toy model whose third layer ``c`` is used by rank 0 at the START of the graph and only touched (a zero
stand-in call) by rank 1, so the two ranks' backward passes produce ``c``'s gradients in different
orders. Two optimiser steps of ``toollmm.train.loop.optimiser_step`` (grad_accum 2) must give exactly the
weights of plain SGD on the mean loss over both ranks' micro-batches.

    deepspeed --num_gpus 2 _grad_worker.py ZERO_STAGE LATE OUT_JSON
"""

from __future__ import annotations

import json
import os
import sys

import deepspeed
import torch

from toollmm.train.ds import init_distributed, shutdown_distributed
from toollmm.train.finish import SeenSamples
from toollmm.train.loop import optimiser_step
from toollmm.train.tracking import MetricsWindow

GA, STEPS, LR = 2, 2, 0.1


class ToyBatch:
    """What ``optimiser_step`` reads from a batch: ``to``, token counts and sample ids."""

    def __init__(self, x: torch.Tensor, use_c: bool):
        self.x, self.use_c = x, use_c
        self.input_ids = torch.zeros(x.shape[0], 4, dtype=torch.long)
        self.real_tokens, self.sample_ids = self.input_ids.numel(), [[str(i)] for i in range(x.shape[0])]

    def to(self, device, dtype):
        return ToyBatch(self.x.to(device, dtype), self.use_c)


class Toy(torch.nn.Module):
    def __init__(self, late: bool):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3), torch.nn.Linear(5, 3)
        self.late = late  # the stand-in call after a and b (ZeRO-2 only: ZeRO-3 needs one call order)

    def forward(self, batch: ToyBatch) -> dict:
        x, zero = batch.x, None
        if batch.use_c:
            x = torch.cat([x[:, 3:], self.c(x[:, :5])], 1)
        elif not self.late:
            zero = self.c(x.new_zeros(1, 5)).sum() * 0.0
            x = torch.cat([x[:, 3:], x[:, :3]], 1)
        else:
            x = torch.cat([x[:, 3:], x[:, :3]], 1)
        loss = self.b(torch.relu(self.a(x))).pow(2).mean()
        if self.late and not batch.use_c:
            zero = self.c(x.new_zeros(1, 5)).sum() * 0.0
        return {"loss": loss if zero is None else loss + zero}


def micro_batch(rank: int, k: int) -> ToyBatch:
    g = torch.Generator().manual_seed(100 * rank + k)
    return ToyBatch(torch.randn(2, 6, generator=g), use_c=rank == 0)


def main(stage: int, late: bool, out: str) -> None:
    rank, _, world = init_distributed()
    torch.manual_seed(0)
    model, reference = Toy(late), Toy(late)
    reference.load_state_dict(model.state_dict())
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": GA,
        "train_batch_size": 2 * GA * world,
        "optimizer": {"type": "SGD", "params": {"lr": LR}},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    source = (micro_batch(rank, k) for k in range(STEPS * GA))
    for _ in range(STEPS):
        optimiser_step(engine, source, GA, torch.float32, MetricsWindow(), SeenSamples())
    sgd = torch.optim.SGD(reference.parameters(), lr=LR)
    for step in range(STEPS):
        sgd.zero_grad()
        batches = [micro_batch(r, step * GA + k) for r in range(world) for k in range(GA)]
        (sum(reference(b)["loss"] for b in batches) / len(batches)).backward()
        sgd.step()
    with deepspeed.zero.GatheredParameters(list(model.parameters())) if stage == 3 else torch.no_grad():
        got = {n: p.detach().clone() for n, p in model.named_parameters()}
    err = {n: float((got[n] - p.detach()).abs().max()) for n, p in reference.named_parameters()}
    moved = max(float((p.detach() - initial[n]).abs().max()) for n, p in reference.named_parameters())
    with open(out, "w") as f:
        json.dump({"rank": rank, "max_err": max(err.values()), "err": err, "moved": moved}, f)
    shutdown_distributed()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(int(args[0]), args[1] == "late", args[2].replace("RANK", os.environ["RANK"]))
