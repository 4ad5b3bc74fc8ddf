"""Our own unified JSONL (or JSON array), re-validated and passed through unchanged."""

from __future__ import annotations

import copy

from ..records import MEDIA_KEYS
from .base import Context, check_media, register


@register("unified")
def convert_unified(raw: dict, ctx: Context) -> list[dict]:
    """Unified records (re-validated; media checked with --media-root)."""
    if not isinstance(raw, dict):
        raise ctx.fail(f"expected a JSON object, got {type(raw).__name__}")
    rec = copy.deepcopy(raw)
    for key in MEDIA_KEYS.values():
        for path in rec.get(key, []) if isinstance(rec.get(key), list) else []:
            check_media(path, ctx)
    return [rec]
