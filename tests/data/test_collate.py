"""Batches: packing keeps every sample's logits, media follow placeholder order, real tokens are reported."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from toollmm.core.batch import IGNORE_INDEX
from toollmm.data.collate import SampleTensors, additive_mask, collate, pack_rows
from toollmm.data.plan import group_batches, rng

PAD, PH, SIG = 0, 60, 61  # pad, an image placeholder id, the first image signal id


def sample(i: int, n: int, n_media: int = 0, signal_at: int | None = None, seed: int = 0) -> SampleTensors:
    g = torch.Generator().manual_seed(seed * 1000 + i)
    ids = torch.randint(1, 59, (n,), generator=g)
    media = []
    for k in range(n_media):  # placeholders at positions 1, 3, ...
        ids[1 + 2 * k] = PH
        media.append(torch.full((1, 4), float(100 * i + k)))
    signals = []
    if signal_at is not None:
        ids[signal_at] = SIG
        signals.append(("image", signal_at, torch.full((3, 2), float(i))))
    labels = ids.clone()
    labels[: n // 3] = IGNORE_INDEX
    return SampleTensors(
        f"s{i}",
        ids,
        labels,
        {"image": media} if media else {},
        {"image": "features"} if media else {},
        signals,
    )


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return cfg


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_sample_alone(llama, attn):
    model = LlamaForCausalLM._from_config(llama, attn_implementation=attn).eval()
    samples = [sample(i, n) for i, n in enumerate([5, 17, 9, 30, 3, 12, 21])]
    batch = collate(samples, PAD, packing=True, max_length=40)
    assert batch.attention_mask.dtype == torch.bool and batch.attention_mask.dim() == 4
    assert len(batch.sample_ids) < len(samples)  # really packed
    mask = batch.attention_mask if attn == "sdpa" else additive_mask(batch.attention_mask)
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids).logits
        by_id = {s.id: s for s in samples}
        checked = 0
        for r, row in enumerate(batch.sample_ids):
            start = 0
            for sid in row:
                s = by_id[sid]
                alone = model(input_ids=s.input_ids[None]).logits[0]
                torch.testing.assert_close(packed[r, start : start + len(s)], alone, atol=1e-5, rtol=0)
                assert batch.position_ids[r, start : start + len(s)].tolist() == list(range(len(s)))
                start += len(s)
                checked += 1
        assert checked == len(samples)
        assert torch.isfinite(packed).all()  # padding positions attend to themselves: no NaN
        # padded (unpacked) batches give the same logits too
        padded = collate(samples, PAD)
        out = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask).logits
        for r, s in enumerate(samples):
            torch.testing.assert_close(
                out[r, : len(s)], model(input_ids=s.input_ids[None]).logits[0], atol=1e-5, rtol=0
            )


def test_media_and_signals_follow_row_major_placeholder_order():
    samples = [
        sample(0, 12, 2, signal_at=8),
        sample(1, 6, 1),
        sample(2, 20, 0, signal_at=15),
        sample(3, 9, 3),
    ]
    for packing in (False, True):
        b = collate(samples, PAD, packing=packing, max_length=30)
        rows, cols = (b.input_ids == PH).nonzero(as_tuple=True)
        order = list(zip(rows.tolist(), cols.tolist()))
        assert order == sorted(order) and len(order) == len(b.media["image"]) == 6
        # the k-th placeholder (row-major) carries the k-th media tensor: its owner is the sample at that spot
        owners = []
        for r, c in order:
            start = 0
            for sid in b.sample_ids[r]:
                n = len(samples[int(sid[1:])])
                if start <= c < start + n:
                    owners.append(sid)
                start += n
        assert b.media["image"].keys == owners
        values = [int(v) // 100 for v in b.media["image"].features[:, 0, 0].tolist()]
        assert [f"s{v}" for v in values] == owners
        pos = b.signal_targets["image"].positions
        assert (b.input_ids[pos[:, 0], pos[:, 1]] == SIG).all()
        assert b.signal_targets["image"].embeddings.shape == (2, 3, 2)


def test_real_token_fraction_is_reported_and_packing_raises_it():
    rs = random.Random(0)
    samples = [sample(i, rs.randint(4, 120), seed=1) for i in range(64)]
    total = sum(len(s) for s in samples)
    fractions = {}
    for packing in (False, True):
        real = cells = 0
        for k in range(0, 64, 8):
            b = collate(samples[k : k + 8], PAD, packing=packing, max_length=256)
            assert b.real_tokens == sum(len(s) for s in samples[k : k + 8])
            assert b.real_token_fraction == b.real_tokens / b.input_ids.numel()
            if not packing:
                assert b.real_tokens == int(b.attention_mask.sum())
            real, cells = real + b.real_tokens, cells + b.input_ids.numel()
        assert real == total
        fractions[packing] = real / cells
    assert fractions[True] > fractions[False] + 0.2
    # length grouping: sorted windows waste less than plan-order batches
    lengths = [len(s) for s in samples]
    for by_length in (False, True):
        groups = group_batches(lengths, 8, 8, by_length, rng(0, 1))
        cells = sum(len(g) * max(lengths[i] for i in g) for g in groups)
        fractions[("group", by_length)] = total / cells
    assert fractions[("group", True)] > fractions[("group", False)] + 0.2


def test_packing_and_padding_batches():
    rs = random.Random(1)
    for _ in range(200):
        lengths = [rs.randint(1, 64) for _ in range(rs.randint(1, 12))]
        rows = pack_rows(lengths, 64)
        fills = [sum(lengths[i] for i in r) for r in rows]
        assert sorted(i for r in rows for i in r) == list(range(len(lengths))) and max(fills) <= 64
        assert sum(f <= 32 for f in fills) <= 1  # no wasted rows: at most one row is half empty
    lengths = [60, 50, 10, 10, 10, 10, 10]  # first-fit decreasing alone: rows of 100 and 50 tokens
    assert [sum(lengths[i] for i in r) for r in pack_rows(lengths, 100)] == [80, 80]
    with pytest.raises(ValueError, match="capacity"):
        pack_rows([11], 10)
    empty = collate([], PAD, packing=True)
    assert empty.real_tokens == 0 and (empty.labels == IGNORE_INDEX).all() and empty.sample_ids == [[]]
    mixed = [sample(0, 10, 1), sample(1, 10, 1)]
    mixed[1].media_kind["image"] = "pixels"
    with pytest.raises(ValueError, match="s0: features.*s1: pixels"):
        collate(mixed, PAD)
