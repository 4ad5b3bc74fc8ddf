"""NExT-GPT data.

``nextgpt-pairs``: the X-text pair files ``{image_name | video_name | audio_name, caption, id?}``
(NExT-GPT code/dataset/{cc3m,webvid,audiocap}_dataset.py; data/T-X_pair_data/*/prepare.md). Default
``--opt direction=x2t`` (stage 1: medium in, caption out); ``direction=t2x`` makes caption-in,
generate-out records (stage 2).

``nextgpt-txt``: conversation files. (a) the legacy T+X->T / instruction file ``{image_name | mm_name,
output_modality, conversation: [{from, value, input_modality} | {from, value, caption, output_modality}]}``
(code/dataset/preprocess_dataset.py, instruction_dataset.py); (b) the 2024 comprehension files
``{input_image | input_video | input_audio, conversations}``; (c) the 2024 generation and T-T+X files
``{output_<m>?, <m>_captions, <m>_caption_embeddings, conversations}`` whose gpt turns mark the output
with ``<m>`` (data/DATA_README.md). A generated medium becomes the assistant turn's ``generate`` entry
(its placeholder leaves the text)."""

from __future__ import annotations

from pathlib import PurePosixPath

from toollmm.core.tokens import MODALITIES, PLACEHOLDER

from .base import (
    Context,
    attach_media,
    check_media,
    leftovers,
    make_record,
    need,
    record_id,
    register,
    sharegpt_messages,
    strip_output_placeholder,
)


@register(
    "nextgpt-pairs", options={"direction": "x2t (default: medium -> caption) or t2x (caption -> generate)"}
)
def convert_pairs(raw: dict, ctx: Context) -> list[dict]:
    """NExT-GPT / CC3M / WebVid / AudioCaps X-text pairs."""
    found = [m for m in MODALITIES if f"{m}_name" in raw]
    if len(found) != 1:
        raise ctx.fail("expected exactly one of image_name / video_name / audio_name")
    m = found[0]
    name = need(raw, f"{m}_name", ctx)
    caption = need(raw, "caption", ctx)
    check_media(name, ctx)
    rid = next(
        (str(raw[k]) for k in ("id", f"{m}_id") if raw.get(k) not in (None, "")), PurePosixPath(name).stem
    )
    meta = leftovers(raw, {"id", f"{m}_id", f"{m}_name", "caption"})
    direction = ctx.opt("direction", "x2t")
    if direction == "x2t":
        msgs = [{"role": "user", "content": PLACEHOLDER[m]}, {"role": "assistant", "content": caption}]
        return [make_record(rid, ctx, msgs, task="x2t", meta=meta, **{m + "s": [name]})]
    if direction != "t2x":
        raise ctx.fail(f"option direction={direction!r}: expected x2t or t2x")
    gen = {"modality": m, "caption": caption, "media": name}
    msgs = [{"role": "user", "content": caption}, {"role": "assistant", "content": "", "generate": [gen]}]
    return [make_record(rid, ctx, msgs, task="t2x", meta=meta)]


def _as_list(v) -> list:
    return [] if v in (None, "") else (list(v) if isinstance(v, list) else [v])


def _input_media(raw: dict, turns: list, ctx: Context) -> tuple[str | None, list[str], set[str]]:
    """The input modality, its files and the keys that held them."""
    for m in MODALITIES:
        if raw.get(f"input_{m}") not in (None, ""):
            return m, _as_list(raw[f"input_{m}"]), {f"input_{m}"}
    mods = {t.get("input_modality") for t in turns if isinstance(t, dict)} & set(MODALITIES)
    if len(mods) > 1:
        raise ctx.fail(f"several input modalities {sorted(mods)} for one media file")
    key = "image_name" if "image_name" in raw else "mm_name"
    if mods:
        return mods.pop(), [need(raw, key, ctx)], {key}
    return None, [], set()


def _targets(raw: dict) -> tuple[dict[str, dict[str, list]], set[str]]:
    """Per output modality: the output files, captions and caption-embedding keys, in order."""
    targets, keys = {}, set()
    for m in MODALITIES:
        media = _as_list(raw.get(f"output_{m}"))
        if raw.get("output_modality") == m and not media:
            media = _as_list(raw.get("image_name") or raw.get("mm_name"))
        targets[m] = {
            "media": media,
            "caption": _as_list(raw.get(f"{m}_captions")),
            "embedding": _as_list(raw.get(f"{m}_caption_embeddings")),
        }
        keys |= {f"output_{m}", f"{m}_captions", f"{m}_caption_embeddings"}
    return targets, keys


def _generate(turn: dict, msg: dict, targets: dict, taken: dict[str, int], ctx: Context) -> list[dict]:
    """The outputs one gpt turn must produce; their placeholders leave the turn's text."""
    gens = []
    for m in MODALITIES:
        if turn.get("output_modality") != m and PLACEHOLDER[m] not in msg["content"]:
            continue
        msg["content"], n = strip_output_placeholder(msg["content"], m)
        for _ in range(max(n, 1)):
            k = taken[m] = taken.get(m, -1) + 1
            caps = targets[m]["caption"]
            caption = turn.get("caption") or (caps[k] if k < len(caps) else None)
            if not caption:
                raise ctx.fail(f"generated {m} #{k} has no caption")
            gen = {"modality": m, "caption": caption}
            gen.update({f: targets[m][f][k] for f in ("embedding", "media") if k < len(targets[m][f])})
            if "media" in gen:
                check_media(gen["media"], ctx)
            gens.append(gen)
    return gens


@register("nextgpt-txt")
def convert_txt(raw: dict, ctx: Context) -> list[dict]:
    """NExT-GPT T+X->T, comprehension, generation and T-T+X instruction files."""
    key = "conversations" if "conversations" in raw else "conversation"
    turns = need(raw, key, ctx, list)
    msgs = sharegpt_messages(turns, ctx, key)
    in_mod, in_files, in_keys = _input_media(raw, turns, ctx)
    targets, target_keys = _targets(raw)
    taken: dict[str, int] = {}
    for turn, msg in zip(turns, msgs):
        gens = _generate(turn, msg, targets, taken, ctx) if msg["role"] == "assistant" else []
        if gens:
            msg["generate"] = gens
    media = {}
    if in_mod is not None:
        media[in_mod + "s"] = attach_media(msgs, in_mod, in_files, ctx)
    if taken:
        task = "t2x"
    else:
        task = "x2t" if any(k.startswith("input_") for k in in_keys) else None
    meta = leftovers(raw, {key, "output_modality", "image_name", "mm_name"} | in_keys | target_keys)
    return [make_record(record_id(raw, ctx), ctx, msgs, task=task, meta=meta, **media)]
