"""The training stream: deterministic, worker-count independent, resumable, rank-split, mixed by weight."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from transformers import AutoTokenizer

from _datastream import ToyDecoder, ToyRenderer, make_source
from toollmm.data.pipeline import SampleProcessor
from toollmm.data.sources import JsonlSource
from toollmm.data.stream import StreamSettings, TrainStream


@pytest.fixture(scope="module")
def processor(tiny_tokenizer_dir):
    r = ToyRenderer(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    return SampleProcessor(r, r.ids, r.media_tokens, 512, ToyDecoder())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    path = make_source(root, 90)
    lines = path.read_text().splitlines()
    lines[10] = lines[10][:-5]  # one malformed line: skipped and counted under on_error=skip
    path.write_text("\n".join(lines) + "\n")
    return {"a": path, "b": make_source(root / "b", 30, name="other", media=False)}


def stream(data, processor, names=("a",), weights=None, **kw):
    settings = dict(micro_batch_size=4, pad_id=0, seed=7, window=3, num_workers=2, on_error="skip")
    settings.update(kw)
    return TrainStream([JsonlSource(data[n]) for n in names], processor, StreamSettings(**settings), weights)


def ids_of(batches):
    return [i for b in batches for row in b.sample_ids for i in row]


def take(s, n=None):
    out = []
    for b in s:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def test_resume_equals_uninterrupted_run(data, processor):
    full = stream(data, processor)
    epochs = [take(full), take(full)]
    reference = ids_of(epochs[0]) + ids_of(epochs[1])
    assert full.steps_per_epoch == 23 and [len(e) for e in epochs] == [23, 23]
    assert ids_of(epochs[0]) != ids_of(epochs[1])  # reshuffled per epoch
    assert sorted(ids_of(epochs[0])) == sorted(ids_of(epochs[1]))  # same 89 good samples each epoch

    first = stream(data, processor)
    before = take(first, 8)  # interrupted inside window 2 (batches 6..8), workers had prefetched more
    state = json.loads(json.dumps(first.state_dict()))  # goes into the checkpoint as is
    assert len(json.dumps(state)) < 1000 and state["epoch"] == 0 and state["consumed"] == 8
    del first
    resumed = stream(data, processor)
    resumed.load_state_dict(state)
    after = take(resumed) + take(resumed)
    assert ids_of(before) + ids_of(after) == reference
    assert resumed.skipped == full.skipped == Counter({"malformed_json": 2})  # once per epoch, not re-counted
    # and resuming exactly at an epoch boundary
    edge = stream(data, processor)
    take(edge)
    state = edge.state_dict()
    again = stream(data, processor)
    again.load_state_dict(state)
    assert ids_of(take(again)) == ids_of(epochs[1])


def test_order_is_fixed_by_seed_not_by_workers(data, processor):
    two = take(stream(data, processor, num_workers=2))
    zero = take(stream(data, processor, num_workers=0))
    assert ids_of(two) == ids_of(zero)
    assert all(a.input_ids.equal(b.input_ids) for a, b in zip(two, zero))
    assert ids_of(take(stream(data, processor, seed=8))) != ids_of(two)
    plain = take(stream(data, processor, shuffle=False, group_by_length=False, num_workers=1))
    assert ids_of(plain) == [f"syn-{i:05d}" for i in range(90) if i != 10]  # file order, bad line skipped


def test_ranks_split_each_epoch_into_equal_step_counts(data, processor):
    per_rank = [stream(data, processor, rank=r, world_size=2, num_workers=0) for r in range(2)]
    got = [take(s) for s in per_rank]
    assert per_rank[0].steps_per_epoch == per_rank[1].steps_per_epoch == len(got[0]) == len(got[1]) == 12
    a, b = ids_of(got[0]), ids_of(got[1])
    assert not set(a) & set(b) and len(a) + len(b) == 89


def test_mixture_weights(data, processor):
    # ratio: 3:1 over 200 samples per epoch -> 150 from a (90 items, so some twice), 50 from b
    s = stream(data, processor, names=("a", "b"), weights=[3.0, 1.0], mixture="ratio", epoch_samples=200)
    ids = ids_of(take(s))
    share = Counter(i.split("-")[0] for i in ids)
    assert share["other"] == 50 and share["syn"] == 150 - s.skipped["malformed_json"]
    head = Counter(i.split("-")[0] for i in ids[:100])  # proportions hold along the way, not just in total
    assert abs(head["syn"] / 100 - 0.75) < 0.12
    # scale: weight 2 = every item of b exactly twice per epoch, a once
    s = stream(data, processor, names=("a", "b"), weights=[1.0, 2.0])
    counts = Counter(ids_of(take(s)))
    assert {counts[f"other-{i:05d}"] for i in range(30)} == {2} and counts["syn-00000"] == 1


def test_resume_refuses_changed_settings(data, processor):
    s = stream(data, processor)
    take(s, 2)
    other = stream(data, processor, micro_batch_size=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        other.load_state_dict(s.state_dict())


def test_from_config_reads_the_data_section(tmp_path, data, processor):
    import yaml

    from toollmm.core.config import load_config
    from toollmm.core.configlib import ConfigError

    layer = {
        "run": {"seed": 3},
        "train": {"micro_batch_size": 5},
        "data": {
            "train": [{"path": str(data["a"]), "weight": 1.0}, {"path": str(data["b"]), "weight": 0.5}],
            "group_window": 4,
            "packing": True,
            "on_error": "skip",
            "num_workers": 0,
        },
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(layer))
    cfg = load_config(config_files=[tmp_path / "c.yaml"]).config
    s = TrainStream.from_config(cfg, processor, pad_id=0, rank=1, world_size=2)
    assert (s.s.seed, s.s.micro_batch_size, s.s.window, s.s.packing, s.s.rank) == (3, 5, 4, True, 1)
    assert s.counts == [90, 15] and s.steps_per_epoch == -(-53 // 5)  # 105 samples over 2 ranks
    batches = take(s)
    assert len(batches) == s.steps_per_epoch and all(b.attention_mask.dim() == 4 for b in batches)
    with pytest.raises(ConfigError, match="group_window: must be >= 1"):
        load_config(config_files=[tmp_path / "c.yaml"], overrides=["data.group_window=0"])
    with pytest.raises(ValueError, match="without a single record"):
        (tmp_path / "empty.jsonl").write_text("\n")
        TrainStream([JsonlSource(tmp_path / "empty.jsonl")], processor, s.s)
