"""The stream with its real neighbours: Data A's renderer and the encoder's preprocessing, from shards."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from _datastream import make_source, write_jsonl
from toollmm.core.batch import IGNORE_INDEX
from toollmm.core.config import load_config
from toollmm.core.tokens import TokenContract
from toollmm.data.captions import CaptionStore, embed_captions
from toollmm.data.pipeline import make_processor
from toollmm.data.shards import ShardSource, write_shards
from toollmm.data.sources import JsonlSource
from toollmm.data.stream import StreamSettings, TrainStream

pytest.importorskip("toollmm.data.render", reason="needs Data A's renderer")
pytest.importorskip("toollmm.data.preprocess", reason="needs the encoder's preprocessing")


def test_shards_render_and_preprocess_into_a_batch(tmp_path, tiny_tokenizer_dir):
    cfg = load_config(
        overrides=[
            "model.tokens.num_image_signal=2",
            "model.tokens.num_video_signal=2",
            "model.tokens.num_audio_signal=2",
            "data.max_length=512",
        ]
    ).config
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ids = TokenContract.from_config(cfg.model.tokens).add_to(tok)
    path = make_source(tmp_path / "src", 16)
    records = [json.loads(x) for x in path.read_text().splitlines()]
    store = CaptionStore(tmp_path / "cap")
    embed = lambda texts: torch.ones(len(texts), 3, 4) * torch.arange(len(texts))[:, None, None]  # noqa: E731
    embed_captions(records, {"image": embed}, {"image": "toy"}, store)
    write_jsonl(path, records)
    write_shards(JsonlSource(path, captions=store), tmp_path / "sh", 5)
    proc = make_processor(cfg, tok)
    for packing in (False, True):
        settings = StreamSettings(micro_batch_size=4, pad_id=0, packing=packing, max_length=512, window=2)
        batches = list(TrainStream([ShardSource(tmp_path / "sh")], proc, settings))
        assert sum(len(r) for b in batches for r in b.sample_ids) == 16
        images = torch.cat([b.media["image"].pixels for b in batches if "image" in b.media])
        audios = torch.cat([b.media["audio"].pixels for b in batches if "audio" in b.media])
        assert images.shape == (4, 3, 224, 224) and audios.shape == (4, 3, 1, 128, 204)
        sig = [b.signal_targets["image"] for b in batches if "image" in b.signal_targets]
        assert sum(len(s.positions) for s in sig) == 4 and all(s.embeddings.shape[1:] == (3, 4) for s in sig)
        for b in batches:
            for m, t in b.signal_targets.items():
                assert (b.input_ids[t.positions[:, 0], t.positions[:, 1]] == ids.signal[m][0]).all()
    # every sample's supervised tokens are its assistant answer (one sample per row when not packed)
    by_id = {r["id"]: r for r in records}
    for b in TrainStream([ShardSource(tmp_path / "sh")], proc, StreamSettings(4, 0, window=2)):
        for row, (sid,) in enumerate(b.sample_ids):
            supervised = b.labels[row][b.labels[row] != IGNORE_INDEX]
            assert by_id[sid]["messages"][-1]["content"] in tok.decode(supervised, skip_special_tokens=True)
