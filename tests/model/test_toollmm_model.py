"""The composed model: losses, the batch contract, packing, stage trainability, parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from model_fixtures import ENC_DIM, BatchMaker, build_tiny, mixed_samples, write_tiny_llama
from toollmm.core.batch import MediaInputs
from toollmm.core.config import OptimConfig, load_config
from toollmm.model.losses import prepare_attention_mask
from toollmm.model.toollmm_model import PARTS


@pytest.fixture(scope="module")
def llm_dir(tiny_tokenizer_dir, tmp_path_factory):
    return write_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def model(llm_dir):
    return build_tiny(llm_dir, tokens_per_input=2, proj_type="mlp")


def test_forward_returns_finite_named_losses_for_mixed_media(model):
    maker = BatchMaker(model)
    batch = maker.batch(mixed_samples(maker))
    assert set(batch.media) == {"image", "video", "audio"} and len(batch.media["image"]) == 2
    out = model(batch)
    assert set(out) == {"lm", "align_image", "align_video", "align_audio", "loss"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values())
    assert all(out[k] > 0 for k in out)
    torch.testing.assert_close(
        out["loss"], out["lm"] + out["align_image"] + out["align_video"] + out["align_audio"]
    )
    # lm is the token mean of the next-token cross-entropy over supervised labels only
    logits = model.run_llm(batch).logits[:, :-1]
    labels = batch.labels[:, 1:]
    sel = labels != -100
    ref = torch.nn.functional.cross_entropy(logits[sel], labels[sel])
    torch.testing.assert_close(out["lm"], ref)


def test_media_tokens_land_on_placeholders_in_row_major_order(model):
    maker = BatchMaker(model)
    batch = maker.batch(mixed_samples(maker))
    embeds = model.embed(batch)
    plain = model.llm.get_input_embeddings()(batch.input_ids)
    for m, media in batch.media.items():
        tokens = model.input_proj(media.features)  # [N, n_out * k, H]
        pos = (batch.input_ids == model.bundle.token_ids.placeholder[m]).nonzero().tolist()
        flat = tokens.reshape(-1, tokens.shape[-1])
        assert len(pos) == flat.shape[0]
        for j, (r, t) in enumerate(pos):  # j-th placeholder (row-major) holds the j-th projected token
            torch.testing.assert_close(embeds[r, t], flat[j])
    other = torch.isin(batch.input_ids, torch.tensor(list(model.bundle.token_ids.placeholder.values())))
    torch.testing.assert_close(embeds[~other], plain[~other])  # everything else is the embedding lookup


def test_loss_weights_and_align_weight_zero(llm_dir):
    m = build_tiny(llm_dir)
    maker = BatchMaker(m)
    batch = maker.batch(mixed_samples(maker))
    m.loss_weights = {"lm": 0.5, "align": 2.0, "align_video": 0.0}
    m.trainable_parameters(["output_proj.video", "output_proj.image"])
    out = m(batch)
    want = 0.5 * out["lm"] + 2.0 * (out["align_image"] + out["align_audio"])
    torch.testing.assert_close(out["loss"], want)
    assert not out["align_video"].requires_grad and out["align_video"] > 0  # logged, not trained
    with pytest.raises(ValueError, match="align_text"):
        type(m)(m.bundle, m.input_proj, dict(m.output_proj), loss_weights={"align_text": 1.0})


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_unpacked(attn, llm_dir):
    m = build_tiny(llm_dir, attn=attn, tokens_per_input=2).eval()
    samples = mixed_samples(BatchMaker(m))
    unpacked = BatchMaker(m).batch(samples)
    packed = BatchMaker(m).packed(samples, pad=4)
    assert packed.attention_mask.shape[:2] == (1, 1) and packed.position_ids.max() < packed.input_ids.shape[1]
    with torch.no_grad():
        a, b = m.run_llm(unpacked).logits, m.run_llm(packed).logits
        la, lb = m(unpacked), m(packed)
    off = 0
    for i, s in enumerate(samples):
        n = len(s["ids"])
        torch.testing.assert_close(b[0, off : off + n], a[i, :n], atol=1e-5, rtol=0)
        off += n
    assert torch.isfinite(b).all()  # padding included
    for k in la:
        torch.testing.assert_close(lb[k], la[k], atol=1e-5, rtol=1e-5)


def test_packed_mask_preparation():
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    mask[0, 0, :3, :3] = torch.ones(3, 3, dtype=torch.bool).tril()  # one sample of 3, then 2 padding slots
    m = prepare_attention_mask(mask, "sdpa", torch.float32)
    assert torch.equal(m[0, 0, :3], mask[0, 0, :3]) and m[0, 0, 3, 3] and m[0, 0, 4, 4]  # pads see themselves
    assert m[0, 0, 3].sum() == 1 and m[0, 0, 4].sum() == 1
    e = prepare_attention_mask(mask, "eager", torch.float32)
    assert e.dtype == torch.float32 and e[0, 0, 2, 2] == 0 and e[0, 0, 0, 1] == torch.finfo(torch.float32).min
    assert (
        prepare_attention_mask(mask, "flash_attention_2", torch.bfloat16) is None
    )  # boundaries from position_ids
    two_d = torch.ones(2, 5, dtype=torch.long)
    assert prepare_attention_mask(two_d, "eager", torch.float32) is two_d
    with pytest.raises(ValueError, match=r"\[B, 1, T, T\]"):
        prepare_attention_mask(torch.ones(1, 2, 5, 5, dtype=torch.bool), "sdpa", torch.float32)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_optimiser_steps_change_exactly_the_stage_trainable_set(stage, llm_dir):
    cfg = load_config(stage=stage).config
    names = cfg.train.trainable
    m = build_tiny(llm_dir, seed=stage)
    counts = m.trainable_parameters(names)
    assert set(counts) == set(names) and all(c > 0 for c in counts.values())
    m.loss_weights = dict(cfg.train.loss_weights)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(m.param_groups(cfg.train.optim))
    maker = BatchMaker(m)
    batch = maker.batch(mixed_samples(maker))
    for _ in range(2):  # LoRA's A gets its first gradient on step 2 (B starts at 0)
        out = m(batch)
        assert math.isfinite(out["loss"].item())
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable, (sorted(changed - trainable)[:5], sorted(trainable - changed)[:5])
    groups = m.named_parts()
    assert trainable == {n for name in names for n, _ in groups[name]}


def test_text_only_batch_still_gives_every_trainable_param_a_gradient(model):
    model.trainable_parameters(["input_proj", "output_proj.image", "lora"])
    maker = BatchMaker(model)
    batch = maker.batch([maker.sample(("user", "USER: hi"), ("asst", "ASSISTANT: hello"))])
    model(batch)["loss"].backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n  # all ranks reduce the same set (DeepSpeed)
    assert all(p.grad.abs().sum() == 0 for p in model.input_proj.parameters())
    model.zero_grad(set_to_none=True)


def test_trainable_vocabulary_and_param_groups(model, llm_dir):
    with pytest.raises(ValueError, match=r"unknown name\(s\) \['embeddings'\].*input_proj"):
        model.trainable_parameters(["embeddings"])
    with pytest.raises(ValueError, match="lora.enabled is false"):
        build_tiny(llm_dir, lora=False).trainable_parameters(["lora"])
    model.trainable_parameters(["lora", "input_proj", "token_rows.signal", "output_proj.audio"])
    optim = OptimConfig(lr=1e-3, weight_decay=0.1, group_lr={"lora": 5e-4})
    groups = model.param_groups(optim)
    by_name = {g["name"]: g for g in groups}
    assert by_name["lora"]["lr"] == 5e-4 and by_name["input_proj"]["lr"] == 1e-3
    assert by_name["token_rows.signal.no_decay"]["weight_decay"] == 0.0 and "token_rows.signal" not in by_name
    assert by_name["input_proj"]["weight_decay"] == 0.1
    assert all(p.ndim < 2 for p in by_name["output_proj.audio.no_decay"]["params"])  # biases and norms
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="group_lr.*'lorra'"):
        model.param_groups(OptimConfig(group_lr={"lorra": 1.0}))
    assert "llm" in PARTS
    counts = model.trainable_parameters(["llm"])  # the demo's stand-in LM: everything in the LLM
    assert counts["llm"] == sum(p.numel() for p in model.llm.parameters())


def test_bad_batches_are_named(model):
    maker = BatchMaker(model)
    batch = maker.batch(mixed_samples(maker))
    short = batch.media["audio"]
    batch.media["audio"] = MediaInputs(features=short.features[:, :2], keys=short.keys)
    with pytest.raises(ValueError, match=r"audio: \d+ placeholder tokens.*audio0"):
        model(batch)
    batch = maker.batch(mixed_samples(maker))
    batch.media["image"] = MediaInputs(pixels=torch.zeros(2, 3, 8, 8), keys=["cat.png", "dog.png"])
    with pytest.raises(ValueError, match="cat.png.*without an encoder"):
        model(batch)
    batch = maker.batch(mixed_samples(maker))
    batch.signal_targets["video"].positions[0, 1] += 1
    with pytest.raises(ValueError, match=r"signal_targets\['video'\].*not a full video signal span"):
        model(batch)
    batch = maker.batch(mixed_samples(maker))
    e = batch.signal_targets["image"].embeddings
    batch.signal_targets["image"].embeddings = torch.zeros(e.shape[0], 77, 768)
    with pytest.raises(ValueError, match=r"\(77, 768\).*conditioned on \(4, 24\)"):
        model(batch)
    batch = maker.batch(mixed_samples(maker))
    no_audio = type(model)(model.bundle, model.input_proj, {"image": model.output_proj["image"]})
    with pytest.raises(ValueError, match=r"signal targets for \['audio', 'video'\]"):
        no_audio(batch)
    del batch.media["video"]
    with pytest.raises(ValueError, match="video placeholder tokens but no video media"):
        model(batch)
    assert ENC_DIM == model.input_proj.in_dim
