"""LaViA video instructions: a video given as a list of frames with one ``<image>`` per frame
(``{id, image: [frame paths], conversations}``, LLaVA ShareGPT layout). The frames become one ``<video>``
whose entry in ``videos`` is the frame list; ``--opt frames_as=images`` keeps them as separate images."""

from __future__ import annotations

import re

from toollmm.core.tokens import PLACEHOLDER

from .base import (
    Context,
    attach_media,
    check_media,
    count_placeholders,
    leftovers,
    make_record,
    need,
    record_id,
    register,
    sharegpt_messages,
)

_RUN = re.compile(r"<image>(?:\s*<image>)*\n?")


@register("lavia", options={"frames_as": "video (default: one <video> with a frame list) or images"})
def convert_lavia(raw: dict, ctx: Context) -> list[dict]:
    """LaViA frame-list video instructions."""
    frames = need(raw, "image", ctx, (list, str))
    frames = [frames] if isinstance(frames, str) else frames
    msgs = sharegpt_messages(need(raw, "conversations", ctx, list), ctx)
    meta = leftovers(raw, {"id", "image", "conversations"})
    mode = ctx.opt("frames_as", "video")
    if mode == "images":
        attach_media(msgs, "image", frames, ctx)
        return [make_record(record_id(raw, ctx), ctx, msgs, images=frames, meta=meta)]
    if mode != "video":
        raise ctx.fail(f"option frames_as={mode!r}: expected video or images")
    n = count_placeholders(msgs)["image"]
    if n != len(frames):
        raise ctx.fail(f"{n} <image> placeholder(s) for {len(frames)} frame(s)")
    runs = [m for m in msgs if "<image>" in m["content"]]
    if len(runs) != 1 or len(_RUN.findall(runs[0]["content"])) != 1:
        raise ctx.fail(
            "the frames' <image> placeholders are not one contiguous run; use --opt frames_as=images"
        )
    runs[0]["content"] = _RUN.sub(
        lambda m: PLACEHOLDER["video"] + ("\n" if m.group(0).endswith("\n") else ""),
        runs[0]["content"],
        count=1,
    )
    check_media(frames, ctx)
    return [make_record(record_id(raw, ctx), ctx, msgs, videos=[frames], meta=meta)]
