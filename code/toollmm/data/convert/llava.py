"""LLaVA: instruct-150k (bare COCO names), v1.5 mix-665k (prefixed paths, text-only ShareGPT records),
blip_laion_cc_sbu_558k pretrain (the ``<image>`` may follow the text). Schema: haotian-liu/LLaVA
docs/Finetune_Custom_Data.md: ``{id, image?, conversations: [{from: human|gpt, value}]}``."""

from __future__ import annotations

from .base import Context, attach_media, leftovers, make_record, need, record_id, register, sharegpt_messages


@register("llava")
def convert_llava(raw: dict, ctx: Context) -> list[dict]:
    """LLaVA instruct-150k / mix-665k / 558k-pretrain records (image optional)."""
    msgs = sharegpt_messages(need(raw, "conversations", ctx, list), ctx)
    images: list[str] = []
    if raw.get("image") not in (None, ""):
        image = need(raw, "image", ctx, (str, list))
        images = [image] if isinstance(image, str) else list(image)
    attach_media(msgs, "image", images, ctx)
    return [
        make_record(
            record_id(raw, ctx),
            ctx,
            msgs,
            images=images,
            meta=leftovers(raw, {"id", "image", "conversations"}),
        )
    ]
