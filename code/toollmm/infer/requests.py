"""Requests from user input: a prompt with media, or one line of a ``--batch`` JSONL file.

A batch line is either a unified record (``messages`` + ``images`` / ``videos`` / ``audios``; cut after its
last user message, so held-out records with reference answers work as prompts) or the short form
``{"prompt": "...", "images": [...], "videos": [...], "audios": [...]}``; both may carry ``id`` and
``tools``. Relative media paths are taken from ``media_root`` (default: the batch file's folder). Every
problem names the file, the line and the key, and is found before the model runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from .session import MEDIA_KEYS, with_placeholders

MODALITY_OF_KEY = {v: k for k, v in MEDIA_KEYS.items()}


class BatchError(ValueError):
    """A batch file line that cannot become a request."""


def prompt_request(text: str, media=(), tools: list | None = None, id: str = ""):
    """``Request`` for one prompt and ``[(modality, path)]`` (placeholders put in front if none)."""
    from ..inference_api import Request
    from .session import split_media

    msgs = [{"role": "user", "content": with_placeholders(text, media)}]
    return Request(messages=msgs, tools=tools, id=id, **split_media(media))


def _paths(obj: dict, key: str, root: Path, where: str) -> list[str]:
    items = obj.get(key) or []
    if not isinstance(items, list):
        raise BatchError(f"{where}: `{key}` must be a list of paths, got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            # a video given as a frame list (LaViA) is a list of paths
            if isinstance(item, list) and key == "videos" and all(isinstance(x, str) for x in item):
                frames = [str(root / x) if not Path(x).is_absolute() else x for x in item]
                missing = [f for f in frames if not Path(f).is_file()]
                if missing:
                    raise BatchError(f"{where}: {key}[{i}]: frame file not found: {missing[0]}")
                out.append(frames)
                continue
            raise BatchError(f"{where}: {key}[{i}] must be a path string, got {item!r}")
        p = Path(item) if Path(item).is_absolute() else root / item
        if not p.is_file():
            raise BatchError(f"{where}: {key}[{i}]: file not found: {p}")
        out.append(str(p))
    return out


def request_from_obj(obj, root: Path, where: str, default_id: str):
    """One batch line (already parsed) -> ``Request``."""
    from ..inference_api import Request

    if not isinstance(obj, dict):
        raise BatchError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    media = {key: _paths(obj, key, root, where) for key in MEDIA_KEYS.values()}
    rid = str(obj.get("id", default_id))
    tools = obj.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BatchError(f"{where}: `tools` must be a list of tool specs")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise BatchError(f"{where}: `messages` must be a list of message objects")
        users = [i for i, m in enumerate(msgs) if m.get("role") == "user"]
        if not users:
            raise BatchError(f"{where}: `messages` has no user message to answer")
        return Request(messages=msgs[: users[-1] + 1], tools=tools, id=rid, **media)
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise BatchError(f"{where}: needs `messages` (a unified record) or a `prompt` string")
    order = [(MODALITY_OF_KEY[k], p) for k in MEDIA_KEYS.values() for p in media[k]]
    msgs = [{"role": "user", "content": with_placeholders(prompt, order)}]
    return Request(messages=msgs, tools=tools, id=rid, **media)


def read_batch(path: str | Path, media_root: str | Path | None = None) -> list:
    """Every line of a JSONL batch file as a ``Request`` (blank lines skipped); ``id`` defaults to the
    line number."""
    path = Path(path)
    if not path.is_file():
        raise BatchError(f"{path}: batch file not found")
    root = Path(media_root) if media_root else path.parent
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BatchError(f"{where}: not valid JSON ({e})") from None
            out.append(request_from_obj(obj, root, where, default_id=str(n)))
    if not out:
        raise BatchError(f"{path}: no requests (the file is empty)")
    return out
