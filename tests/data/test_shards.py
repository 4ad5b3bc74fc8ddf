"""Shards: records, media bytes, cached features and caption embeddings survive the round trip."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

from _datastream import make_source, png_bytes, write_jsonl
from entry_points import load_script
from toollmm.data.captions import CaptionStore, caption_key, embed_captions
from toollmm.data.records import BadSample
from toollmm.data.shardfmt import index_tar
from toollmm.data.shards import ShardSource, iter_samples, write_shards
from toollmm.data.sources import JsonlSource


def _prepare_data():
    """``code/prepare_data.py`` (an entry point, not a package module), where the parsers live."""
    return load_script("code/prepare_data.py", "prepare_data_shards")


prepare_data = _prepare_data()


def fake_encode(texts):
    """Stands in for a decoder's encode_prompt: [n, 3, 4], a deterministic function of the text."""
    return torch.stack([torch.arange(12.0).view(3, 4) * len(t) + sum(map(ord, t)) % 97 for t in texts])


def test_round_trip_records_media_embeddings_and_features(tmp_path):
    src_path = make_source(tmp_path / "src", 23)
    records = [json.loads(x) for x in src_path.read_text().splitlines()]
    store = CaptionStore(tmp_path / "captions")
    records, counts = embed_captions(
        records, {"image": fake_encode}, {"image": "tiny-sd"}, store, batch_size=2
    )
    assert counts["computed"] == sum(1 for r in records for m in r["messages"] for _ in m.get("generate", []))
    write_jsonl(src_path, records)
    # a second pass finds every embedding in the store and computes nothing
    _, again = embed_captions(records, {"image": fake_encode}, {"image": "tiny-sd"}, store)
    assert again == {"computed": 0, "cached": counts["computed"]}

    src = JsonlSource(src_path, captions=store)

    def audio_features(modality, media, sample):
        return np.full((1, 8), len(media.data), dtype=np.float32) if modality == "audio" else None

    out = tmp_path / "shards"
    summary = write_shards(src, out, shard_size=5, features=audio_features)
    assert summary == {"written": 23, "shards": 5, "skipped": {}}
    index = json.loads((out / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [5, 5, 5, 5, 3]
    back = list(iter_samples(out))
    assert [s.record for s in back] == records  # records unchanged, in order
    for s in back:
        for i, name in enumerate(s.record.get("images", [])):
            assert s.media["image"][i].data == (src_path.parent / name).read_bytes()
        for i, name in enumerate(s.record.get("audios", [])):
            size = len((src_path.parent / name).read_bytes())
            assert s.media["audio"][i].data is None and s.media["audio"][i].features[0, 0] == size
        targets = [g for m in s.record["messages"] for g in m.get("generate", [])]
        for j, g in enumerate(targets):
            assert g["embedding"] == caption_key(g["caption"], "tiny-sd")
            np.testing.assert_array_equal(s.captions[j], fake_encode([g["caption"]])[0].numpy())
        assert len(s.captions) == len(targets)
    # the tars are plain webdataset: members are <key>.<ext>, grouped by sample
    with tarfile.open(out / "shard-000000.tar") as tf:
        names = tf.getnames()
    assert "000000000.record.json" in names and "000000001.image.0.png" in names
    # random access without the index (plain tars are scanned) gives the same samples
    (out / "index.json").unlink()
    for f in out.glob("*.idx.npy"):
        f.unlink()
    src2 = ShardSource(out)
    assert len(src2) == 23 and src2.load(17).record == records[17]


def test_frame_list_video_and_index_spans(tmp_path):
    (tmp_path / "f0.png").write_bytes(png_bytes(1))
    (tmp_path / "f1.png").write_bytes(png_bytes(2))
    rec = {
        "id": "v1",
        "source": "lavia",
        "videos": [["f0.png", "f1.png"]],
        "messages": [
            {"role": "user", "content": "<video> what moves?"},
            {"role": "assistant", "content": "a dot"},
        ],
    }
    write_jsonl(tmp_path / "v.jsonl", [rec])
    write_shards(JsonlSource(tmp_path / "v.jsonl"), tmp_path / "out", 10)
    (s,) = list(iter_samples(tmp_path / "out"))
    assert s.media["video"][0].data == [png_bytes(1), png_bytes(2)]
    keys, spans = index_tar(tmp_path / "out" / "shard-000000.tar")
    assert keys == ["000000000"] and spans[0, 0] == 0 and spans[0, 1] % 512 == 0


def test_cli_writes_and_refuses_to_overwrite(tmp_path):
    src = make_source(tmp_path / "src", 6)
    parser = prepare_data.build_parser()
    argv = ["shard", "--input", str(src), "--output", str(tmp_path / "o"), "--shard-size", "4"]
    args = parser.parse_args(argv)
    assert args.run(args) == 0
    assert len(ShardSource(tmp_path / "o")) == 6 and len(list((tmp_path / "o").glob("*.tar"))) == 2
    with pytest.raises(FileExistsError, match="--overwrite"):
        args.run(parser.parse_args(argv))
    assert args.run(parser.parse_args([*argv, "--overwrite", "--shard-size", "6"])) == 0
    assert len(list((tmp_path / "o").glob("*.tar"))) == 1  # evenly divided: no empty trailing shard


def test_writer_names_or_counts_bad_records(tmp_path):
    src = make_source(tmp_path / "src", 8)
    (tmp_path / "src" / "im1.png").unlink()  # record 1 is the first image record
    with pytest.raises(BadSample, match=r"syn\.jsonl:2 \(id=syn-00001\): missing_media: .*im1\.png"):
        write_shards(JsonlSource(src), tmp_path / "a", 4)
    summary = write_shards(JsonlSource(src), tmp_path / "b", 4, on_error="skip")
    assert summary["written"] == 7 and summary["skipped"] == {"missing_media": 1}


def test_embed_captions_seam_caches_and_skips(tmp_path):
    src = make_source(tmp_path / "src", 8)  # records 3 and 7 are text->image
    calls = []

    def build_encoders(cfg):  # the decoders module provides DecoderPool.encode_captions here
        return {"image": lambda texts: calls.append(list(texts)) or fake_encode(texts)}, {"image": "fake-sd"}

    parser = prepare_data.build_parser()
    argv = ["embed-captions", "--input", str(src), "--output", str(tmp_path / "out.jsonl")]
    argv += ["--store", str(tmp_path / "store")]
    args = parser.parse_args(argv)
    assert prepare_data.run_embed_captions(args, build_encoders) == 0
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    keys = [g["embedding"] for r in out for m in r["messages"] for g in m.get("generate", [])]
    assert len(keys) == 2 and len(calls) == 1 and len(calls[0]) == 2
    store = CaptionStore(tmp_path / "store")
    np.testing.assert_array_equal(store.get(keys[0]), fake_encode(calls[0][:1])[0].numpy())
    assert prepare_data.run_embed_captions(parser.parse_args(argv), build_encoders) == 0
    assert len(calls) == 1  # nothing recomputed
    with pytest.raises(BadSample, match="bad_embedding: caption embedding 'nope'"):
        store.get("nope", "x.jsonl:1")
