"""VideoChat / VideoChat2 instruction data: ``{video | image, QA: [{i?, q, a}], start?, end?}``.

Source: OpenGVLab/Ask-Anything video_chat2/dataset/it_dataset.py (ITImgTrainDataset.process_qa,
ITVidTrainDataset): the first QA's ``i`` is the instruction (a system prompt), an empty ``q`` means no
question (caption data; after the first QA its answer continues the previous assistant turn,
since two assistant turns in a row are not a valid chat), ``start``/``end`` clip the video (kept in ``meta.clip``)."""

from __future__ import annotations

from toollmm.core.tokens import PLACEHOLDER

from .base import Context, check_media, leftovers, make_record, need, record_id, register


@register("videochat")
def convert_videochat(raw: dict, ctx: Context) -> list[dict]:
    """VideoChat instruction records (``video`` or ``image`` + ``QA`` list)."""
    if "video" in raw:
        modality, media = "video", need(raw, "video", ctx)
    elif "image" in raw:
        modality, media = "image", need(raw, "image", ctx)
    else:
        raise ctx.fail("record has neither 'video' nor 'image'")
    qa = need(raw, "QA", ctx, list)
    if not qa:
        raise ctx.fail("empty 'QA' list")
    msgs: list[dict] = []
    first = qa[0] if isinstance(qa[0], dict) else {}
    if first.get("i"):
        msgs.append({"role": "system", "content": first["i"]})
    for k, turn in enumerate(qa):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("a"), str)
            or not isinstance(turn.get("q", ""), str)
        ):
            raise ctx.fail(f"QA[{k}]: expected {{'q': str, 'a': str}}, got {str(turn)[:80]}")
        q = turn.get("q", "")
        if k == 0:
            msgs.append({"role": "user", "content": PLACEHOLDER[modality] + ("\n" + q if q else "")})
        elif q:
            msgs.append({"role": "user", "content": q})
        elif msgs[-1]["role"] == "assistant":  # a later QA without a question continues the answer
            msgs[-1]["content"] += "\n" + turn["a"]
            continue
        msgs.append({"role": "assistant", "content": turn["a"]})
    check_media(media, ctx)
    meta = leftovers(raw, {"video", "image", "QA", "start", "end"})
    if "start" in raw or "end" in raw:
        meta["clip"] = [raw.get("start"), raw.get("end")]
    extra_i = [t["i"] for t in qa[1:] if t.get("i") and t.get("i") != first.get("i")]
    if extra_i:
        meta["other_instructions"] = extra_i
    return [make_record(record_id(raw, ctx), ctx, msgs, meta=meta, **{modality + "s": [media]})]
