"""Write the demo corpus: media, task files, stand-in LM text, tokenizer and summary.

Layout of ``out`` (every media path in a record is relative to ``out``, the corpus's media root)::

    media/{image,audio,video}/{train,heldout}/NNNNN.{png,wav,mp4}
    train/{x2t_image,x2t_audio,x2t_video,t2x_image,t2x_audio,t2x_video,instruct,tools,multiturn,lm_pretrain}.jsonl
    heldout/{same tasks except lm_pretrain}.jsonl   (records carry ``eval``)
    tokenizer/        Llama-style sentencepiece tokenizer trained on the training text (no toollmm tokens)
    summary.json      counts, attribute value sets, captions, seed, generation time

Every random choice draws from ``numpy.random.default_rng([seed, stream, index])``, so the output is a
pure function of (seed, sizes): two runs write identical bytes (``summary.json``'s timing aside).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jsonschema
import numpy as np
import sentencepiece as spm

from toollmm.core.paths import DATA_DIR, resolve
from toollmm.core.tokens import PLACEHOLDER_RE
from toollmm.demo import media, records, text
from toollmm.model.tiny_tokenizer import build_sentencepiece_tokenizer

from .tools import DEMO_TOOLS, TOOL_NAMES

log = logging.getLogger(__name__)

GENERATION_ORDER = ("image", "audio", "video")  # the order the corpus draws media in (changing it changes the corpus)
SPLITS = ("train", "heldout")
EXT = {"image": "png", "audio": "wav", "video": "mp4"}
OWNED = ("media", "train", "heldout", "tokenizer", "summary.json")


@dataclass(frozen=True)
class DemoSizes:
    """How much to generate. ``renders`` = renders per attribute combination (train, held-out)."""

    renders: dict = field(default_factory=lambda: {"image": (20, 4), "audio": (30, 6), "video": (10, 3)})
    t2x: dict = field(default_factory=lambda: {"image": 240, "audio": 135, "video": 240})  # train records
    instruct: tuple = (300, 50)  # per modality (train, held-out)
    tools: tuple = (200, 50)  # per tool (train, held-out)
    multiturn: tuple = (500, 40)  # 2-3 turn chats (train, held-out)
    lm_copy: int = 300  # per modality
    lm_instruct: int = 100  # per modality
    lm_t2x: int = 60  # per modality
    # tool conversations (mostly made-up values): many distinct records seen few times teach copying;
    # few records seen many times (1500 x 12 epochs) let the LM memorise values instead
    lm_tools: int = 4000
    lm_repeat: int = 2000  # copy drills (numbers, made-up names): a quarter of the stage-0 samples


FULL = DemoSizes()
SMALL = DemoSizes(
    renders={"image": (3, 1), "audio": (6, 1), "video": (2, 1)},
    t2x={"image": 24, "audio": 18, "video": 24},
    instruct=(30, 10),
    tools=(60, 8),
    multiturn=(80, 10),
    lm_copy=40,
    lm_instruct=15,
    lm_t2x=10,
    lm_tools=240,
    lm_repeat=240,
)


def rng_for(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(stream.encode()), index])


# --------------------------------------------------------------------------------- media
def render_media(out: Path, seed: int, sizes: DemoSizes) -> dict[str, dict[str, list[records.Render]]]:
    """Render every medium; returns renders[modality][split], combos interleaved."""
    renders: dict = {m: {} for m in GENERATION_ORDER}
    for m in GENERATION_ORDER:
        combos = text.combos(m)
        for s, per_combo in zip(SPLITS, sizes.renders[m]):
            lst = []
            for i in range(per_combo * len(combos)):
                attrs, rng = combos[i % len(combos)], rng_for(seed, f"media/{m}/{s}", i)
                rel = f"media/{m}/{s}/{i:05d}.{EXT[m]}"
                if m == "image":
                    media.save_image(media.render_image(attrs, rng), out / rel)
                elif m == "audio":
                    media.save_wav(media.render_tone(attrs, rng), out / rel)
                else:
                    media.save_mp4(media.render_video_frames(attrs, rng), out / rel)
                lst.append(records.Render(rel, m, dict(attrs)))
            renders[m][s] = lst
    return renders


# ------------------------------------------------------------------------------- records
def _pick(seq: list, seed: int, stream: str, i: int):
    return seq[int(rng_for(seed, stream, i).integers(len(seq)))]


def media_task_records(renders: dict, split: str, seed: int, sizes: DemoSizes) -> dict[str, list[dict]]:
    """x2t_* (one per render), t2x_* and instruct records of one split."""
    files: dict = {}
    n_inst = sizes.instruct[SPLITS.index(split)]
    instruct = []
    for m in GENERATION_ORDER:
        rs = renders[m][split]
        files[f"x2t_{m}"] = [
            records.x2t(r, f"demo-{split}-x2t_{m}-{i:05d}", split, rng_for(seed, f"x2t/{m}/{split}", i))
            for i, r in enumerate(rs)
        ]
        # training requests take random renders as reference outputs; held-out: one per held-out render
        picks = (
            rs if split == "heldout" else [_pick(rs, seed, f"t2x-pick/{m}", i) for i in range(sizes.t2x[m])]
        )
        files[f"t2x_{m}"] = [
            records.t2x(r, f"demo-{split}-t2x_{m}-{i:05d}", split, rng_for(seed, f"t2x/{m}/{split}", i))
            for i, r in enumerate(picks)
        ]
        for i in range(n_inst):
            r = _pick(rs, seed, f"inst-pick/{m}/{split}", i)
            rid = f"demo-{split}-instruct-{m}-{i:05d}"
            instruct.append(records.instruct(r, rid, split, rng_for(seed, f"instruct/{m}/{split}", i)))
    files["instruct"] = instruct
    return files


def tool_records(split: str, seed: int, sizes: DemoSizes) -> list[dict]:
    return [
        records.tool_use(t, f"demo-{split}-tools-{t}-{i:05d}", split, rng_for(seed, f"tools/{t}/{split}", i))
        for t in TOOL_NAMES
        for i in range(sizes.tools[SPLITS.index(split)])
    ]


def multiturn_records(renders: dict, split: str, seed: int, sizes: DemoSizes) -> list[dict]:
    """2-3 turn chats of ``split`` (tools, media input, generation; ``records.multi_turn``)."""
    rs = {m: renders[m][split] for m in GENERATION_ORDER}
    return [
        records.multi_turn(
            rs, f"demo-{split}-multiturn-{i:05d}", split, rng_for(seed, f"multiturn/{split}", i)
        )
        for i in range(sizes.multiturn[SPLITS.index(split)])
    ]


def build_lm_text(seed: int, sizes: DemoSizes) -> list[dict]:
    """Stand-in LM pretraining text: copy patterns plus every training conversation template, shuffled."""
    out = []
    builders = {"copy": (sizes.lm_copy, records.lm_copy), "instruct": (sizes.lm_instruct, records.lm_instruct),
                "t2x": (sizes.lm_t2x, records.lm_t2x)}  # fmt: skip
    for m in GENERATION_ORDER:
        for kind, (n, build) in builders.items():
            for i in range(n):
                rng = rng_for(seed, f"lm/{kind}/{m}", i)
                attrs = text.combos(m)[int(rng.integers(len(text.combos(m))))]
                out.append(build(m, attrs, f"demo-train-lm-{kind}-{m}-{i:05d}", rng))
    for i in range(sizes.lm_tools):
        out.append(records.lm_tool(i, f"demo-train-lm-tool-{i:05d}", rng_for(seed, "lm/tool", i)))
    for i in range(sizes.lm_repeat):
        out.append(records.lm_repeat(f"demo-train-lm-repeat-{i:05d}", rng_for(seed, "lm/repeat", i)))
    order = rng_for(seed, "lm/order", 0).permutation(len(out))
    return [out[i] for i in order]


def build_records(renders: dict, seed: int, sizes: DemoSizes) -> dict[str, dict[str, list[dict]]]:
    """All task files: {split: {task: [records]}}."""
    files = {
        s: media_task_records(renders, s, seed, sizes)
        | {"tools": tool_records(s, seed, sizes), "multiturn": multiturn_records(renders, s, seed, sizes)}
        for s in SPLITS
    }
    files["train"]["lm_pretrain"] = build_lm_text(seed, sizes)
    return files


# ----------------------------------------------------------------------------- validation
def _schema_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((DATA_DIR / "schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def validate_records(recs: list[dict], where: str) -> None:
    """Schema-valid, unique ids, and one media path per placeholder; raises naming file and record."""
    validator, seen = _schema_validator(), set()
    for i, rec in enumerate(recs):
        rid = rec.get("id", f"#{i}")
        errors = sorted(validator.iter_errors(rec), key=lambda e: list(e.path))
        if errors:
            e = errors[0]
            raise ValueError(f"{where}: record {rid}: schema error at {list(e.path)}: {e.message}")
        if rid in seen:
            raise ValueError(f"{where}: duplicate record id {rid}")
        seen.add(rid)
        found = [mm for msg in rec["messages"] for mm in PLACEHOLDER_RE.findall(msg["content"])]
        for m, key in records.MEDIA_KEY.items():
            if found.count(m) != len(rec.get(key, [])):
                raise ValueError(
                    f"{where}: record {rid}: {found.count(m)} <{m}> placeholders but {len(rec.get(key, []))} {key}"
                )


# ------------------------------------------------------------------------------ tokenizer
def corpus_text(recs: list[dict]) -> list[str]:
    """Every string the LLM reads or writes in these records (contents, tool calls, tool specs)."""
    out = []
    for rec in recs:
        for msg in rec["messages"]:
            out.append(msg["content"])
            out += [json.dumps(c["function"], sort_keys=True) for c in msg.get("tool_calls", [])]
    return [t for t in out if t]


def build_tokenizer(files: dict, out_dir: Path, vocab_size: int) -> Path:
    """Train the demo LLM's tokenizer on the training split's text only (held-out words stay unseen)."""
    texts = [t for recs in files["train"].values() for t in corpus_text(recs)]
    texts += [json.dumps(t, sort_keys=True) for t in DEMO_TOOLS]
    # the chat templates' role strings occur once per turn in every rendered sample: weight them like that,
    # so they become single pieces (" USER:" was 5 tokens) and the tiny LM reads shorter sequences
    roles = [
        "USER: ASSISTANT: SYSTEM: TOOL:",
        "### Human: ### Assistant:",
        "A chat with a helpful assistant.",
    ]
    texts += roles * max(1, len(texts) // 20)
    # "▁" a piece of its own: request words and JSON argument values split into the same pieces (copyable)
    return build_sentencepiece_tokenizer(texts, out_dir, vocab_size=vocab_size, space_piece=True)


# ---------------------------------------------------------------------------------- write
def _clear(out: Path) -> None:
    """Remove a previous corpus in ``out`` (only the entries this generator owns); refuse foreign folders."""
    if not out.exists():
        return
    foreign = sorted({p.name for p in out.iterdir()} - set(OWNED))
    if foreign and not (out / "summary.json").exists():
        raise FileExistsError(
            f"{out} holds no demo corpus but other files ({foreign[:3]}); refusing to write"
        )
    for name in OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def write_jsonl(recs: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))


def generate_demo_corpus(
    out_dir, seed: int = 0, small: bool = False, sizes: DemoSizes | None = None, vocab_size: int = 1000
) -> dict:
    """Generate the demo corpus into ``out_dir`` (replacing a previous one) and return its summary."""
    t0 = time.perf_counter()
    out = resolve(out_dir)
    sizes = sizes or (SMALL if small else FULL)
    _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    renders = render_media(out, seed, sizes)
    t_media = time.perf_counter() - t0
    files = build_records(renders, seed, sizes)
    for s, tasks in files.items():
        for task, recs in tasks.items():
            validate_records(recs, f"{s}/{task}.jsonl")
            write_jsonl(recs, out / s / f"{task}.jsonl")
    tok = build_tokenizer(files, out / "tokenizer", vocab_size)
    tok_size = spm.SentencePieceProcessor(model_file=str(tok / "tokenizer.model")).vocab_size()
    summary = {
        "seed": seed,
        "small": small,
        "media_root": ".",
        "media_root_note": "record media paths are relative to this folder (set the sources' media_root to it)",
        "counts": {s: {t: len(r) for t, r in tasks.items()} for s, tasks in files.items()},
        "records_total": sum(len(r) for tasks in files.values() for r in tasks.values()),
        "media": {m: {s: len(renders[m][s]) for s in SPLITS} for m in GENERATION_ORDER},
        "attributes": {m: {a: list(v) for a, v in media.ATTRIBUTES[m].items()} for m in GENERATION_ORDER},
        "captions": {m: [text.caption(m, c) for c in text.combos(m)] for m in GENERATION_ORDER},
        "tools": TOOL_NAMES,
        "tokenizer": {
            "path": "tokenizer",
            "vocab_size": tok_size,
            "special_tokens": "none (TokenContract.add_to)",
        },
        "heldout": "x2t/t2x/instruct: new renders of seen attribute values; tools: unseen argument values and "
        "request phrasings; held-out records carry `eval`",
        "sizes": asdict(sizes),
        "generation_s": {"media": round(t_media, 2), "total": round(time.perf_counter() - t0, 2)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log.info("demo corpus: %d records, %s media in %.1fs -> %s", summary["records_total"], summary["media"],
             summary["generation_s"]["total"], out)  # fmt: skip
    return summary
