"""Benchmark pieces that can be wrong without being slow: FLOP formulas (derived by hand), the encoder
sizing rule, batch bookkeeping, the figure check CI relies on, and the frozen encoder inside a DeepSpeed
engine (the stage-1 'encode every step' path)."""

from __future__ import annotations

import math

import pytest
import torch

from toollmm.core.batch import IGNORE_INDEX, Batch
from toollmm.core.config import EncoderDims, PreprocessConfig, load_config
from toollmm.data.collate import SampleTensors, collate
from toollmm.perf import flops, report
from toollmm.perf.train_figs import batch_flops, sample_lengths
from toollmm.perf.world import FULL, QUICK, encoder_dims_for


def test_llama_parameter_counts_match_transformers():
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = flops.LlamaShape(hidden=64, layers=3, intermediate=160, vocab=500, heads=4, kv_heads=2)
    cfg = LlamaConfig(
        hidden_size=64, num_hidden_layers=3, intermediate_size=160, vocab_size=500,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert shape.total_params == n
    body = sum(
        p.numel()
        for name, p in model.named_parameters()
        if "embed_tokens" not in name and "lm_head" not in name
    )
    assert shape.body_params == body
    assert flops.LlamaShape.of(cfg) == shape
    # Vicuna-7B: 6,738,415,616 parameters (the published Llama-2-7B count)
    assert flops.VICUNA_7B.total_params == 6_738_415_616


def test_train_flops_by_hand():
    s = flops.LlamaShape(hidden=8, layers=2, intermediate=16, vocab=10, heads=2, kv_heads=2)
    body = 2 * (4 * 64 + 3 * 8 * 16 + 16) + 8  # q,k,v,o + gate,up,down + 2 norms per layer; final norm
    assert s.body_params == body == 1320
    # two samples of 3 and 2 tokens, logits at 2 positions; attention: 6 * L * d * n(n+1) per sample
    attn = 6 * 2 * 8 * (3 * 4 + 2 * 3)
    assert flops.train_flops(s, [3, 2], 2) == 4 * body * 5 + 4 * 80 * 2 + attn
    assert flops.forward_flops(s, [3, 2], 2) == 2 * body * 5 + 2 * 80 * 2 + attn / 3


def test_vit_flops_and_width_search():
    # one block of width 4 on 3 tokens with a patch of volume 2: 3 * (24*16 + 4*3*4 + 2*2*4)
    assert flops.vit_forward_flops(4, 1, 3, 2) == 3 * (384 + 48 + 16)
    target = flops.vit_forward_flops(96, 32, flops.VISION_TOKENS, flops.VISION_PATCH)
    assert flops.width_for(target, 32, flops.VISION_TOKENS, flops.VISION_PATCH, 16) == 96
    assert flops.width_for(1.0, 32, flops.VISION_TOKENS, flops.VISION_PATCH, 16) == 16  # at least one step


def test_encoder_sizing_keeps_the_huge_to_vicuna_ratio():
    pre, huge = PreprocessConfig(), EncoderDims()
    for sizes in (FULL, QUICK):
        dims = EncoderDims(**encoder_dims_for(sizes.llm, 117, 4))
        for m, tol in (("image", 0.35), ("audio", 0.5), ("video", 0.35)):
            bench = flops.encoder_flops_per_input(dims, pre, m) / flops.train_flops(sizes.llm, [117], 4)
            real = flops.encoder_flops_per_input(huge, pre, m) / flops.train_flops(flops.VICUNA_7B, [117], 4)
            assert abs(bench / real - 1) < tol, (sizes.name, m, bench, real)
        assert dims.vision_embed_dim % 16 == 0 and dims.audio_embed_dim % 12 == 0
    assert EncoderDims(**encoder_dims_for(FULL.llm, 117, 4)).vision_num_blocks == huge.vision_num_blocks
    # huge per image: 257 tokens x 32 blocks of width 1280 -> about a third of a TFLOP
    assert 3.2e11 < flops.encoder_flops_per_input(huge, pre, "image") < 3.5e11


def _sample(n: int, supervised: int, sid: str) -> SampleTensors:
    ids = torch.arange(3, 3 + n)
    labels = torch.full((n,), IGNORE_INDEX)
    labels[n - supervised :] = ids[n - supervised :]
    return SampleTensors(sid, ids, labels)


@pytest.mark.parametrize("packing", [True, False])
def test_batch_lengths_and_flops(packing):
    samples = [_sample(7, 3, "a"), _sample(5, 2, "b"), _sample(4, 1, "c")]
    batch = collate(samples, pad_id=0, packing=packing, max_length=12)
    assert sorted(sample_lengths(batch)) == [4, 5, 7]
    s = flops.LlamaShape(hidden=8, layers=1, intermediate=8, vocab=10, heads=1, kv_heads=1)
    # logits where the next token is supervised: 3 + 2 + 1 positions
    assert batch_flops(s, batch) == flops.train_flops(s, [7, 5, 4], 6)


def test_sample_lengths_refuses_inconsistent_batches():
    b = collate([_sample(4, 1, "a")], pad_id=0, packing=True, max_length=8)
    bad = Batch(b.input_ids, b.labels, b.attention_mask, b.position_ids, real_tokens=5)
    with pytest.raises(ValueError, match="real tokens"):
        sample_lengths(bad)


def _bench() -> dict:
    fc = {m: {"speedup": 1.1, "ideal_speedup": 1.2, "efficiency": 0.92} for m in report.FIGURE_ORDER}
    return {
        "machine": {"cpu": "x", "threads": 2, "device": "cpu", "load_avg_before": [0.1, 0.2, 0.3]},
        "quick": True, "gemm_gflops": 80.0, "mfu_cpu": 0.7, "train_real_tokens_per_s": 500.0,
        "hf_trainer_real_tokens_per_s": 400.0, "vs_hf_trainer_tokens_per_s_ratio": 1.25,
        "real_token_fraction": 0.96, "real_token_fraction_naive": 0.8, "feature_cache": fc,
        "loader_to_train_ratio": 3.0, "inference_second_request_speedup": 9.0,
        "serve_concurrent_speedup": 3.5, "serve": {
            "concurrent_rps": 7.0, "sequential_rps": 2.0, "concurrent_p50_s": 1.1, "concurrent_p95_s": 1.3,
            "sequential_p50_s": 0.5, "sequential_p95_s": 0.6, "errors": 0, "checkpoint": "x/stage_3"},
        "peak_rss_mb": {"mfu": 1200.0},
        "mfu_cpu_stage1": 0.5, "mfu_cpu_stage2": 0.4,
        "stage_steps": {
            "stage1": {"time_split": {"forward_s": 0.5, "backward_s": 0.9, "grad_reduce_s": 0.01,
                                      "optimizer_s": 0.02, "total_s": 1.43},
                       "output_proj_forward_time_share": 0.15},
            "stage2": {"time_split": {"forward_s": 0.3, "backward_s": 0.5, "grad_reduce_s": 0.04,
                                      "optimizer_s": 0.06, "total_s": 0.9},
                       "output_proj_flop_share": 0.012, "output_proj_forward_time_share": 0.2}},
    }  # fmt: skip


def test_check_finds_missing_nonfinite_and_nonpositive_figures():
    good = _bench()
    assert report.check(good) == []
    bad = _bench()
    del bad["feature_cache"]["video"]["efficiency"]
    bad["mfu_cpu"] = math.nan
    bad["loader_to_train_ratio"] = 0.0
    bad["gemm_gflops"] = True
    del bad["mfu_cpu_stage2"]
    problems = report.check(bad)
    assert len(problems) == 5
    assert any(p.startswith("mfu_cpu_stage2") for p in problems)
    assert any(p.startswith("feature_cache.video.efficiency") for p in problems)
    assert any(p.startswith("mfu_cpu") for p in problems) and any("gemm_gflops" in p for p in problems)
    gpu = _bench()
    gpu["machine"]["device"] = "NVIDIA A100"
    assert any(p.startswith("mfu_gpu") for p in report.check(gpu))
    assert any(p.startswith("mfu_gpu_stage1") for p in report.check(gpu))


def test_check_refuses_failed_serving_requests():
    b = _bench()
    b["serve"]["errors"] = 2
    assert report.check(b) == ["serve.errors: 2 failed requests (must be 0)"]
    assert "serve.py: 8 concurrent clients" in report.markdown(_bench())


def test_markdown_marks_misses():
    md = report.markdown(_bench())
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "**no**" in rows["MFU (CPU)"] and "**no**" in rows["ours / HF Trainer (tokens/s)"]
    assert "| yes |" in rows["real-token fraction, ours"] and "0.1" in md.splitlines()[0]
    # the stage-1 / stage-2 MFU rows: reported figures without a target, their time split in the notes
    s1, s2 = rows["MFU stage 1 (CPU)"].split("|"), rows["MFU stage 2 (CPU)"].split("|")
    assert s1[2].strip() == "0.5" and s1[3].strip() == s1[4].strip() == ""
    assert (
        "fwd / bwd / reduce / optimiser 0.5 / 0.9 / 0.01 / 0.02 s; output projections 15 % of forward"
        in s1[5]
    )
    assert s2[2].strip() == "0.4" and "1.2 % of FLOPs, 20 % of forward time" in s2[5]


def test_harness_runs_and_reports_the_stage_figures():
    """``mfu_stage1`` / ``mfu_stage2`` run right after ``mfu`` (quick and full) and land in bench.json as
    ``<mfu key>_stage{1,2}`` with their time split."""
    from toollmm.perf import harness

    for sizes in (QUICK, FULL):
        names = harness.figure_names(sizes)
        assert names[names.index("mfu") + 1 : names.index("mfu") + 3] == ["mfu_stage1", "mfu_stage2"]
    b = _bench()
    split = b["stage_steps"]["stage2"]
    figs = {
        "mfu": [{"mfu": 0.7, "gemm_gflops": 80.0}],
        "mfu_stage1": [{"mfu": 0.5, "step_s": 1.4, **b["stage_steps"]["stage1"]}],
        "mfu_stage2": [{"mfu": 0.4, "step_s": 0.9, "extra": 1, **split}],
        "ours": [{"real_tokens_per_s": 500.0}],
        "hf": [{"real_tokens_per_s": 400.0}],
        "tokens": [{"ours": 0.96, "naive": 0.8}],
        "loader": [{"loader_samples_per_s": 30.0, "train_samples_per_s": 10.0}],
        "inference": [{"speedup": 9.0}],
        "serve": [{"speedup": 3.5, **b["serve"]}],
        **{f"cache_{m}": [v] for m, v in b["feature_cache"].items()},
    }
    for gpu in (False, True):
        mach = {**b["machine"], "device": "NVIDIA H100" if gpu else "cpu"}
        out = harness.assemble(figs, {"mfu": 1.0}, mach, QUICK, True)
        key = "mfu_gpu" if gpu else "mfu_cpu"
        assert (out[f"{key}_stage1"], out[f"{key}_stage2"]) == (0.5, 0.4)
        assert report.check(out) == []
    assert out["stage_steps"]["stage2"] == {"step_s": 0.9, **split}


def test_frozen_encoder_inside_a_deepspeed_engine(monkeypatch):
    """Stage 1 without the feature cache puts the encoder in the engine; DeepSpeed's start-up broadcast
    must not trip over ImageBind's 0-dim logit-scale parameter, and the state dict keeps its keys."""
    import deepspeed

    from toollmm.model.encoder import build_encoder, build_imagebind, model_kwargs

    mcfg = load_config(config_files=["config/presets/encoder_tiny.yaml"]).config.model
    enc = build_encoder(mcfg)
    assert all(p.dim() > 0 for p in enc.parameters())
    assert set(enc.model.state_dict()) == set(build_imagebind(model_kwargs(mcfg)).state_dict())

    class Stage1(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.proj = enc, torch.nn.Linear(32, 4)

        def forward(self, x):
            return self.proj(self.encoder.encode("image", x)).sum()

    if not torch.distributed.is_initialized():  # a one-rank group; the environment is restored afterwards
        from toollmm.train.ds import free_port

        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    model = Stage1()
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.proj.parameters()), config=ds)
    before = model.proj.weight.detach().clone()
    loss = engine(torch.randn(1, 3, 224, 224))
    engine.backward(loss)
    engine.step()
    assert not torch.equal(before, model.proj.weight) and torch.isfinite(loss)


def test_memory_per_gpu_by_hand():
    from toollmm.perf.scaling import memory_per_gpu_gb

    s = flops.LlamaShape(hidden=8, layers=2, intermediate=16, vocab=10, heads=2, kv_heads=2)
    # weights 1480 x 2 B; states 100 x 12 / 8 + 100 x 2 / 8; activations 2 x 10 x 8 x 2 + 34 x 10 x 8;
    # logits 2 x 3 x 10 x 4 x 2; plus 3 GB
    want = (2960 + 175 + 3040 + 480) / 1e9 + 3.0
    assert memory_per_gpu_gb(s, 100, 2, 2, 5, 3, checkpointing=True) == pytest.approx(want)
    z3 = (2960 / 8 + 2 * 1320 + 175 + 3040 + 480) / 1e9 + 3.0
    assert memory_per_gpu_gb(s, 100, 3, 2, 5, 3, checkpointing=True) == pytest.approx(z3)


def test_scaling_projection_is_calibrated_and_ordered():
    from toollmm.perf import scaling as S

    mfu = S.calibrated_mfu()
    assert 0.15 < mfu < 0.6
    for (samples, tokens, sup, factor), hours in zip(S.LLAVA.values(), S.ANCHOR_HOURS.values()):
        per = factor * flops.VICUNA_7B.body_params * tokens + factor * flops.VICUNA_7B.head_params * sup
        implied = samples * per / (8 * S.GPUS[0].bf16_tflops * 1e12 * mfu) / 3600
        assert abs(implied / hours - 1) < 0.25  # one MFU explains both published runs
    run = S.RUNS[2]
    a2, a3 = (S.project(S.GPUS[0], z3, run, mfu) for z3 in (False, True))
    h2 = S.project(S.GPUS[1], False, run, mfu)
    assert a3["hours"] >= a2["hours"] > h2["hours"] and a3["memory_gb"] < a2["memory_gb"] < 80
    text = S.render(None)
    assert text.count("| stage ") == len(S.RUNS) and "3.5 h" in text and "not published" in text
    assert all(a[:40] in text for a in S.ASSUMPTIONS)
    gpu = {
        "mfu_gpu": 0.41,
        "machine": {"device": "NVIDIA H100"},
        "sizes": {"llm": {"hidden": 4096, "layers": 32}},
    }
    assert "MFU used: 8x A100-80G 0.41" in S.render(gpu)


def test_serve_figure_prompts_need_no_prepared_workspace(tmp_path, monkeypatch):
    """The serving figure on a fresh ``--work`` folder (neither it nor its corpus exists yet) takes its
    prompts from the repo's demo corpus (what the demo checkpoint trained on) instead of failing."""
    import json

    from toollmm.perf import serve_fig
    from toollmm.perf.world import SIZES, World

    data = tmp_path / "data"
    (data / "demo" / "heldout").mkdir(parents=True)
    recs = [{"messages": [{"role": "user", "content": "<image>\nwhat is it?"}], "images": ["a.png"]}]
    recs += [{"messages": [{"role": "user", "content": f"question {i}"}]} for i in range(3)]
    (data / "demo" / "heldout" / "instruct.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (data / "demo" / "heldout" / "tools.jsonl").write_text(json.dumps(recs[1]) + "\n")
    monkeypatch.setattr(serve_fig, "DATA_DIR", data)
    world = World(tmp_path / "fresh" / "W", SIZES["full"])
    assert not world.work.exists()
    assert serve_fig._prompts(world, 5) == [
        "question 0",
        "question 1",
        "question 2",
        "question 0",
        "Tell me about request 4.",
    ]
