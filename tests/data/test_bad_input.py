"""Bad input: each class raises naming file and record, or is skipped, counted per reason and logged."""

from __future__ import annotations

import json
import logging
import re
import tarfile

import pytest
from transformers import AutoTokenizer

from _datastream import ToyDecoder, ToyRenderer, make_source
from toollmm.data.pipeline import SampleProcessor
from toollmm.data.records import BadSample
from toollmm.data.shards import ShardSource, write_shards
from toollmm.data.sources import JsonlSource
from toollmm.data.stream import StreamSettings, TrainStream

GOOD = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red circle"}]
BAD = {  # reason -> the JSONL line that triggers it
    "malformed_json": '{"id": "broken", "source": "x", "messages": [',
    "unknown_key": json.dumps({"id": "uk", "source": "x", "messages": GOOD, "colour": "red"}),
    "empty_conversation": json.dumps({"id": "empty", "source": "x", "messages": []}),
    "missing_media": json.dumps(
        {
            "id": "nofile",
            "source": "x",
            "images": ["gone.png"],
            "messages": [{"role": "user", "content": "<image>"}, GOOD[1]],
        }
    ),
    "corrupt_media": json.dumps(
        {
            "id": "junk",
            "source": "x",
            "images": ["junk.png"],
            "messages": [{"role": "user", "content": "<image>"}, GOOD[1]],
        }
    ),
    "media_mismatch": json.dumps({"id": "mm", "source": "x", "images": ["im1.png"], "messages": GOOD}),
    "overlong": json.dumps(
        {"id": "long", "source": "x", "messages": [GOOD[0], {"role": "assistant", "content": "red " * 400}]}
    ),
}


@pytest.fixture(scope="module")
def processor(tiny_tokenizer_dir):
    r = ToyRenderer(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    return SampleProcessor(r, r.ids, r.media_tokens, 200, ToyDecoder())


def dataset(tmp_path, bad: list[str]):
    path = make_source(tmp_path, 12)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    lines = path.read_text().splitlines()
    for k, reason in enumerate(bad):
        lines.insert(3 + 2 * k, BAD[reason])
    path.write_text("\n".join(lines) + "\n")
    return path


def run(path, processor, **kw):
    s = TrainStream(
        [JsonlSource(path)], processor, StreamSettings(micro_batch_size=3, pad_id=0, window=2, **kw)
    )
    return s, [i for b in s for row in b.sample_ids for i in row]


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_bad_input_raises_naming_file_and_record(tmp_path, processor, reason):
    path = dataset(tmp_path, [reason])
    rid = json.loads(BAD[reason])["id"] if reason != "malformed_json" else None
    where = f"{path}:4" + (f" (id={rid})" if rid else "")
    with pytest.raises(BadSample, match=re.escape(f"{where}: {reason}: ")) as err:
        run(path, processor, num_workers=0)
    assert err.value.reason == reason


def test_errors_cross_worker_processes_intact(tmp_path, processor):
    path = dataset(tmp_path, ["missing_media"])
    with pytest.raises(
        BadSample, match=r"\.jsonl:4 \(id=nofile\): missing_media: .*gone\.png does not exist"
    ):
        run(path, processor, num_workers=2)


def test_skip_counts_every_reason_and_logs(tmp_path, processor, caplog):
    path = dataset(tmp_path, sorted(BAD))
    with caplog.at_level(logging.WARNING, logger="toollmm.data.stream"):
        s, ids = run(path, processor, num_workers=0, on_error="skip", overlong="skip")
    assert dict(s.skipped) == dict.fromkeys(BAD, 1)
    assert sorted(ids) == [f"syn-{i:05d}" for i in range(12)]
    assert sum("skipping" in r.message for r in caplog.records) == len(BAD)
    assert any("id=long): overlong" in r.message for r in caplog.records)
    # the same counts come back from worker processes
    s2, ids2 = run(path, processor, num_workers=2, on_error="skip", overlong="skip")
    assert s2.skipped == s.skipped and ids2 == ids
    # overlong has its own policy: skipping the rest still raises on an over-long sample
    with pytest.raises(BadSample, match="overlong"):
        run(path, processor, num_workers=0, on_error="skip", overlong="raise")


def test_bad_shard_members_are_named(tmp_path, processor):
    path = make_source(tmp_path / "src", 6)
    write_shards(JsonlSource(path), tmp_path / "sh", 3)
    tar = tmp_path / "sh" / "shard-000000.tar"
    with tarfile.open(tar) as tf:
        png = tf.getmember("000000001.image.0.png")
    data = bytearray(tar.read_bytes())
    data[png.offset_data : png.offset_data + png.size] = b"x" * png.size  # same size, not a PNG any more
    tar.write_bytes(bytes(data))
    with pytest.raises(BadSample, match=r"shard-000000\.tar@\d+ \(id=syn-00001\): corrupt_media: im1\.png"):
        processor(ShardSource(tmp_path / "sh").load(1))
    (tmp_path / "sh" / "shard-000001.tar").write_bytes(b"not a tar")  # a damaged shard names itself
    with pytest.raises(BadSample, match=r"shard-000001\.tar@0: malformed_json: unreadable shard span"):
        ShardSource(tmp_path / "sh").load(3)
