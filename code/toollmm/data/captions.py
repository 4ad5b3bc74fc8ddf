"""Caption embeddings for text->X targets: an on-disk store and the seam ``embed-captions`` plugs into.

A stage-2/3 signal span is supervised by the decoder text encoder's embedding of its caption
(``[n_query, cond_dim]``, e.g. 77 x 768 for SD v1.5). They are computed once, stored here keyed by
decoder identity + caption, and referenced from the record by ``generate[].embedding`` (the key).
``prepare_data.py shard`` copies them into the shards; JSONL sources read them from the store.

The decoder-specific part is one callable per modality, ``encode_captions(texts) -> Tensor[n, n_query,
cond_dim]`` (the pipeline's own ``encode_prompt``), built by the decoders module and passed in.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from toollmm.core.errors import read_jsonl_objects
from toollmm.core.files import file_mode
from toollmm.core.paths import resolve
from toollmm.data.records import BadSample, load_caption

log = logging.getLogger(__name__)

EncodeCaptions = Callable[[list[str]], "object"]  # texts -> Tensor/ndarray [n, n_query, cond_dim]


def caption_key(caption: str, decoder_id: str) -> str:
    """Stable key of one caption under one decoder text encoder (a different decoder = a new key)."""
    return hashlib.sha256(f"{decoder_id}\0{caption}".encode()).hexdigest()[:32]


class CaptionStore:
    """``<root>/<key[:2]>/<key>.npy`` files, written atomically (safe with several ranks)."""

    def __init__(self, root: str | os.PathLike, decoder_ids: Mapping[str, str] | None = None):
        self.root = Path(root)
        # when set, a target without an ``embedding`` key is looked up by caption_key(caption, decoder id)
        self.decoder_ids = dict(decoder_ids or {})

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str, where: str = "") -> np.ndarray:
        p = self.path(key)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise BadSample(
                "bad_embedding",
                where,
                f"caption embedding {key!r} is not in {self.root} (run embed-captions)",
            ) from None
        return load_caption(data, where, str(p))

    def put(self, key: str, array: np.ndarray) -> None:
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
        os.fchmod(
            fd, file_mode()
        )  # mkstemp creates 0600; readers on a shared filesystem need the umask's mode
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, p)


def embed_captions(
    records: Iterable[dict],
    encoders: Mapping[str, EncodeCaptions],
    decoder_ids: Mapping[str, str],
    store: CaptionStore,
    batch_size: int = 32,
) -> tuple[list[dict], dict[str, int]]:
    """Give every ``generate`` target that has a caption an ``embedding`` key, computing only the
    embeddings the store lacks (in batches of ``batch_size`` per modality).

    ``encoders[modality](texts)`` must return ``[len(texts), n_query, cond_dim]``. Returns the records
    (updated in place) and counts ``{"computed": n, "cached": n}``.
    """
    records = list(records)
    todo: dict[str, dict[str, str]] = {}  # modality -> key -> caption
    cached = 0
    for rec in records:
        for m in rec.get("messages", []):
            for g in m.get("generate") or []:
                if "caption" not in g:
                    continue
                mod = g["modality"]
                if mod not in encoders:
                    raise KeyError(f"record {rec.get('id')}: no caption encoder for modality {mod!r}")
                g["embedding"] = key = caption_key(g["caption"], decoder_ids[mod])
                if store.has(key) or key in todo.get(mod, {}):
                    cached += store.has(key)
                    continue
                todo.setdefault(mod, {})[key] = g["caption"]
    computed = 0
    for mod, items in todo.items():
        keys = list(items)
        for i in range(0, len(keys), batch_size):
            chunk = keys[i : i + batch_size]
            out = encoders[mod]([items[k] for k in chunk])
            out = out.detach().float().cpu().numpy() if hasattr(out, "detach") else np.asarray(out)
            if out.ndim != 3 or out.shape[0] != len(chunk):
                raise ValueError(
                    f"encode_captions[{mod}] returned shape {out.shape} for {len(chunk)} captions; "
                    "expected [n, n_query, cond_dim]"
                )
            for k, arr in zip(chunk, out):
                store.put(k, arr)
            computed += len(chunk)
    log.info("caption embeddings: %d computed, %d already stored in %s", computed, cached, store.root)
    return records, {"computed": computed, "cached": cached}


def embed_captions_jsonl(
    input: str | os.PathLike,
    output: str | os.PathLike,
    encoders: Mapping[str, EncodeCaptions],
    decoder_ids: Mapping[str, str],
    store: CaptionStore,
    batch_size: int = 32,
) -> dict[str, int]:
    """``embed_captions`` over a JSONL file of records; writes ``output`` (atomically) with every
    captioned ``generate`` target's ``embedding`` key set. Returns ``{"computed": n, "cached": n}``."""
    src = resolve(input)
    records = [rec for _, rec in read_jsonl_objects(src)]
    records, counts = embed_captions(records, encoders, decoder_ids, store, batch_size)
    out = resolve(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, out)
    return counts
