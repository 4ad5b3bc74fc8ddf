"""The delta checkpoint: peft's own adapter round trip, the size bound, strict loading."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model_fixtures import BatchMaker, build_tiny, mixed_samples, write_tiny_llama
from toollmm.checkpoint.delta import (
    ADAPTER_DIR,
    DELTA_FILE,
    DeltaError,
    delta_size_bound,
    delta_weight_bytes,
    load_delta,
    save_delta,
)
from toollmm.core.config import LLMConfig, LoraSettings, OptimConfig, TokenConfig
from toollmm.model.llm import load_causal_lm, prepare_llm

STAGE3 = [
    "lora",
    "input_proj",
    "output_proj.image",
    "output_proj.video",
    "output_proj.audio",
    "token_rows.signal",
    "token_rows.tool",
]


@pytest.fixture(scope="module")
def llm_dir(tiny_tokenizer_dir, tmp_path_factory):
    return write_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("llama"))


def _train(model, names, steps=2):
    model.trainable_parameters(names)
    opt = torch.optim.AdamW(model.param_groups(OptimConfig(lr=1e-2)))
    maker = BatchMaker(model)
    batch = maker.batch(mixed_samples(maker))
    for _ in range(steps):
        model(batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
    return batch


@pytest.fixture(scope="module")
def trained(llm_dir, tmp_path_factory):
    model = build_tiny(llm_dir, seed=7)
    batch = _train(model, STAGE3)
    out = save_delta(model, tmp_path_factory.mktemp("delta") / "stage_3")
    return model.eval(), batch, out


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft 0.21 internals
def test_lora_adapter_reloaded_by_peft_itself_gives_identical_logits(trained, llm_dir):
    model, batch, out = trained
    base, tok = load_causal_lm(LLMConfig(path=str(llm_dir), dtype="float32"))
    fresh = prepare_llm(base, tok, TokenConfig(), LoraSettings(enabled=False))  # rows at the same seeded init
    ids = torch.tensor([[1, 5, 9, 17, *fresh.token_ids.signal["image"], 30, 2]])
    with torch.no_grad():
        without_lora = fresh.model(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(fresh.model, str(out / ADAPTER_DIR)).eval()
    # token rows trained in stage 3 too: copy them from the delta, as the loader does
    rows = load_file(str(out / DELTA_FILE))
    with torch.no_grad():
        for key, t in rows.items():
            if key.startswith("token_rows."):
                _, matrix, group = key.split(".")
                fresh.rows[matrix].rows[group].copy_(t)
        got = peft_model(input_ids=ids).logits
        want = model.llm(input_ids=ids).logits
    assert torch.equal(got, want)
    assert not torch.allclose(without_lora, want)  # the adapter is what makes them equal


def test_delta_holds_only_new_rows_lora_and_projections_within_the_bound(trained):
    model, _, out = trained
    vocab = model.bundle.hf_model.get_input_embeddings().weight.shape[0]
    size = delta_weight_bytes(out)
    bound = delta_size_bound(model, model.delta_parts)
    assert size <= bound
    with safe_open(str(out / DELTA_FILE), "pt") as f:
        keys = list(f.keys())
        assert all(vocab not in f.get_slice(k).get_shape() for k in keys)
        assert json.loads(f.metadata()["parts"]) == sorted(model.delta_parts)
    adapter = load_file(str(out / ADAPTER_DIR / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert {k.split(".")[0] for k in keys} == {"token_rows", "input_proj", "output_proj"}
    # what the bound guards against: peft's default would have added the resized embedding matrices
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        auto = get_peft_model_state_dict(model.llm, save_embedding_layers="auto")
    assert any("embed_tokens" in k for k in auto) and not any("embed_tokens" in k for k in adapter)
    print(f"tiny delta: {size} bytes (bound {bound}); keys {len(keys)} + adapter {len(adapter)}")


def test_delta_round_trip_is_exact_and_partial_deltas_list_expected_missing(trained, llm_dir, tmp_path):
    model, batch, out = trained
    fresh = build_tiny(llm_dir, seed=99).eval()
    with torch.no_grad():
        before = fresh(batch)["loss"]
    report = load_delta(fresh, out)
    assert report.expected_missing == [] and set(report.parts) == set(model.delta_parts)
    with torch.no_grad():
        want, got = model(batch), fresh(batch)
    assert not torch.equal(before, got["loss"])
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # a stage-1 delta: input projection + token rows; the rest is expected-missing, listed by key
    stage1 = build_tiny(llm_dir, seed=5)
    stage1.trainable_parameters(["input_proj"])
    save_delta(stage1, tmp_path / "stage_1")
    assert not (tmp_path / "stage_1" / ADAPTER_DIR).exists()
    report = load_delta(fresh, tmp_path / "stage_1")
    assert report.parts == ["input_proj"]  # every token row is in every delta; not a part of its own
    assert any(k.startswith("output_proj.audio.") for k in report.expected_missing)
    assert any("lora_A" in k for k in report.expected_missing)
    assert torch.equal(fresh.input_proj.net.weight, stage1.input_proj.net.weight)


def _rewrite(src, dst, edit):
    dst.mkdir()
    with safe_open(str(src / DELTA_FILE), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(src / DELTA_FILE))
    new_meta = edit(tensors, meta)
    meta = new_meta if isinstance(new_meta, dict) else meta
    save_file(tensors, str(dst / DELTA_FILE), metadata=meta)
    (dst / ADAPTER_DIR).symlink_to(src / ADAPTER_DIR)
    return dst


def test_delta_files_with_the_old_part_names_still_load(trained, llm_dir, tmp_path):
    """Deltas written before the part vocabulary was one (parts ``[..., "token_rows"]``, the same keys)
    load exactly as before; what they recorded is read as today's names."""
    model, batch, out = trained

    def old_names(tensors, meta):
        return {
            **meta,
            "parts": json.dumps(
                sorted((set(model.delta_parts) - {"token_rows.signal", "token_rows.tool"}) | {"token_rows"})
            ),
        }

    old = _rewrite(out, tmp_path / "old", old_names)
    with safe_open(str(old / DELTA_FILE), "pt") as f:
        assert "token_rows" in json.loads(f.metadata()["parts"])
    fresh = build_tiny(llm_dir, seed=99).eval()
    report = load_delta(fresh, old)
    assert "token_rows" not in report.parts and report.expected_missing == []
    assert "token_rows" not in fresh.delta_parts
    with torch.no_grad():
        want, got = model(batch), fresh(batch)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    save_delta(fresh, tmp_path / "again")  # and a model loaded from it saves with today's names
    with safe_open(str(tmp_path / "again" / DELTA_FILE), "pt") as f:
        assert "token_rows" not in json.loads(f.metadata()["parts"])


def test_strict_load_refuses_and_names_the_key(trained, llm_dir, tmp_path):
    _, _, out = trained
    fresh = build_tiny(llm_dir)
    extra = _rewrite(
        out, tmp_path / "extra", lambda t, m: t.update({"input_proj.net.2.bias_extra": torch.zeros(3)})
    )
    with pytest.raises(DeltaError, match=r"unexpected key\(s\) \['input_proj.net.2.bias_extra'\]"):
        load_delta(fresh, extra)
    missing = _rewrite(out, tmp_path / "missing", lambda t, m: t.pop("output_proj.video.queries"))
    with pytest.raises(DeltaError, match=r"missing key\(s\) \['output_proj.video.queries'\]"):
        load_delta(fresh, missing)
    shape = _rewrite(
        out, tmp_path / "shape", lambda t, m: t.update({"token_rows.embed.tool": torch.zeros(4, 3)})
    )
    with pytest.raises(DeltaError, match=r"token_rows.embed.tool has shape \(4, 3\)"):
        load_delta(fresh, shape)

    def shift(t, m):
        ids = json.loads(m["token_ids"])
        ids["tool"]["<tool_call>"] += 1
        return {**m, "token_ids": json.dumps(ids)}

    with pytest.raises(DeltaError, match=r"NExT-GPT #47.*tool <tool_call>: delta \d+ vs tokenizer \d+"):
        load_delta(fresh, _rewrite(out, tmp_path / "ids", shift))
    other_r = build_tiny(llm_dir, r=8)
    with pytest.raises(DeltaError, match=r"adapter_config.json: r = 4, but model.llm.lora has 8"):
        load_delta(other_r, out)
    no_audio = build_tiny(llm_dir)
    del no_audio.output_proj["audio"]
    with pytest.raises(DeltaError, match=r"\['output_proj.audio'\] do not exist in this model"):
        load_delta(no_audio, out)


def test_llm_part_for_the_demo_stand_in_lm(llm_dir, tmp_path):
    model = build_tiny(llm_dir, lora=False, seed=3)
    batch = _train(model, ["llm", "input_proj"])
    save_delta(model, tmp_path / "demo")
    fresh = build_tiny(llm_dir, lora=False, seed=4)
    assert load_delta(fresh, tmp_path / "demo").parts == ["input_proj", "llm"]
    with torch.no_grad():
        # the LM and the input projection came from the delta (output projections were not trained)
        assert torch.equal(fresh.eval()(batch)["lm"], model.eval()(batch)["lm"])
