"""The baseline a researcher would write: Hugging Face ``Trainer`` + peft LoRA on the same LLM, the same
rendered tool-use samples (ids and labels from our renderer), the same micro-batch, max length, LoRA and
optimiser settings, in transformers' own best documented configurations (``HF_CONFIGS``):

- ``grouped``: ``DataCollatorForSeq2Seq(padding="longest")`` with ``train_sampling_strategy="group_by_length"``
  (transformers 5's name for ``group_by_length=True``): batches of similar lengths, little padding;
- ``flattened``: ``DataCollatorWithFlattening`` (padding-free: the micro-batch as one row, position ids
  restarting per sample; transformers' sdpa mask keeps attention inside each sample) with the same sampler.

Each run trains every configuration; ``real_tokens_per_s`` is the best of them (the ratio in bench.json is
against the best HF configuration, not a weak one) and ``configs`` keeps each one's figures.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time

import torch

from toollmm.perf.flops import train_flops
from toollmm.perf.gemm import BURST_SHAPES, gemm_gflops
from toollmm.perf.world import World

log = logging.getLogger(__name__)


#: the HF configurations the baseline trains (name -> (collator, sampling strategy)); see the module docstring
HF_CONFIGS = ("grouped", "flattened")


class _Counting:
    """The collator, counting each batch's samples' lengths (real tokens) in order."""

    def __init__(self, collator):
        self.collator, self.lengths = collator, []

    def __call__(self, features):
        self.lengths.append([len(f["input_ids"]) for f in features])
        return self.collator(features)


def _collator(name: str, tok):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if name == "grouped":
        return DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    if name == "flattened":
        return DataCollatorWithFlattening(separator_id=-100)
    raise ValueError(f"unknown HF baseline configuration {name!r} (one of {', '.join(HF_CONFIGS)})")


def _samples(cfg, tok, path) -> list[dict]:
    from toollmm.data.pipeline import make_render_fn

    render = make_render_fn(cfg, tok)
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            r = render(json.loads(line), where=f"{path}:{i + 1}")
            ids = [int(x) for x in r.input_ids][: cfg.data.max_length]
            labels = [int(x) for x in r.labels][: cfg.data.max_length]
            out.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    return out


def hf_trainer_tokens(world: World) -> dict:
    """Every configuration of ``HF_CONFIGS``; the best one's figures at the top level."""
    configs = {name: _hf_run(world, name) for name in HF_CONFIGS}
    best = max(configs, key=lambda n: configs[n]["real_tokens_per_s"])
    return {**configs[best], "config": best, "configs": configs}


def _hf_run(world: World, name: str) -> dict:
    """Median real tokens/s per step of ``Trainer.train()`` after the warm-up steps, one configuration."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from toollmm.core.tokens import TokenContract
    from toollmm.model.llm import apply_lora
    from toollmm.perf.train_figs import stage3_tools

    s = world.sizes
    steps = s.trainer_steps + s.warmup
    cfg = stage3_tools(world, "hf", steps).config
    tok = AutoTokenizer.from_pretrained(str(world.llm))
    TokenContract.from_config(cfg.model.tokens).add_to(tok)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # what our stream pads with when the tokenizer has no pad token
    data = _samples(cfg, tok, world.demo / "train" / "tools.jsonl")
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        str(world.llm), dtype=dtype, attn_implementation=cfg.model.llm.attn_implementation
    )
    model = apply_lora(model, cfg.model.llm.lora)  # the same peft adapter config our trainer builds
    collator = _Counting(_collator(name, tok))
    starts: list[float] = []
    ends: list[float] = []
    bursts: list[float] = []
    device = "cuda" if on_gpu else "cpu"

    class Timer(TrainerCallback):
        """Step i runs from starts[i] to ends[i]; a GEMM burst follows each step, outside both."""

        def on_step_begin(self, args, state, control, **kw):
            if not starts:
                bursts.append(gemm_gflops(s.gemm_seconds, device, shapes=BURST_SHAPES)["gflops"])
                starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if on_gpu:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
            bursts.append(gemm_gflops(s.gemm_seconds, device, shapes=BURST_SHAPES)["gflops"])
            starts.append(time.perf_counter())

    o = cfg.train.optim
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=s.micro_batch,
            gradient_accumulation_steps=1,
            max_steps=steps,
            learning_rate=o.lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.betas[0],
            adam_beta2=o.betas[1],
            adam_epsilon=o.eps,
            max_grad_norm=o.grad_clip,
            lr_scheduler_type="cosine",
            optim="adamw_torch",
            train_sampling_strategy="group_by_length",
            dataloader_num_workers=0,
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=not on_gpu,
            bf16=on_gpu,
            remove_unused_columns=False,
            seed=cfg.run.seed,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=data,
            data_collator=collator,
            callbacks=[Timer()],
            processing_class=tok,  # group_by_length reads its model_input_names
        )
        trainer.train()
    done = list(zip(collator.lengths, starts, ends, bursts, bursts[1:]))[s.warmup :]
    rates = [sum(n) / (b - a) for n, a, b, _, _ in done]
    # executed FLOPs: this step computes logits at every position (the real ones are counted)
    mfus = [train_flops(s.llm, n, sum(n)) / (b - a) / 1e9 / ((g0 + g1) / 2) for n, a, b, g0, g1 in done]
    return {
        "real_tokens_per_s": statistics.median(rates),
        "mfu": statistics.median(mfus),
        "gemm_gflops": statistics.median(bursts),
        "steps": len(rates),
        "max_memory_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None,
    }
