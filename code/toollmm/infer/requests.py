"""``Request`` (one conversation to continue), and requests from user input: a prompt with media, or
one line of a ``--batch`` JSONL file.

A batch line is either a unified record (``messages`` + ``images`` / ``videos`` / ``audios``; cut after its
last user message, so held-out records with reference answers work as prompts) or the short form
``{"prompt": "...", "images": [...], "videos": [...], "audios": [...]}``; both may carry ``id`` and
``tools``. Any other key is an error naming the line (``image``: did you mean ``images``?). Relative
media paths are taken from ``media_root`` (default: the batch file's folder). Every problem names the
file, the line and the key, and all bad lines (the first 20) are reported before the model runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from toollmm.core.errors import NotUtf8, UserError, iter_text_lines
from toollmm.core.tokens import PLACEHOLDER, PLACEHOLDER_RE

from ..data.records import MEDIA_KEYS


def with_placeholders(text: str, media: Sequence[tuple[str, str]]) -> str:
    """``text`` with one placeholder per medium put in front (in order) when it has none of its own."""
    if not media or PLACEHOLDER_RE.search(text or ""):
        return text or ""
    head = "".join(PLACEHOLDER[m] for m, _ in media)
    return f"{head}\n{text}" if text else head


def split_media(media: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """``[(modality, path)]`` -> ``{"images": [...], "videos": [...], "audios": [...]}`` (order kept)."""
    out: dict[str, list[str]] = {k: [] for k in MEDIA_KEYS.values()}
    for modality, path in media:
        if modality not in MEDIA_KEYS:
            raise ValueError(f"unknown media modality {modality!r} (known: {sorted(MEDIA_KEYS)})")
        out[MEDIA_KEYS[modality]].append(str(path))
    return out


@dataclass
class Request:
    """One conversation to continue: HF chat messages + media lists (paths, in placeholder order)."""

    messages: list[dict]
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    audios: list = field(default_factory=list)
    tools: list | None = None
    id: str = ""

    @classmethod
    def from_record(cls, record: dict, media_root: str | Path | None = None) -> Request:
        root = Path(media_root) if media_root else None

        def fix(x):
            if isinstance(x, list):
                return [fix(y) for y in x]
            return str(root / x) if root is not None and not Path(x).is_absolute() else x

        return cls(
            messages=record["messages"],
            images=[fix(x) for x in record.get("images") or []],
            videos=[fix(x) for x in record.get("videos") or []],
            audios=[fix(x) for x in record.get("audios") or []],
            tools=record.get("tools"),
            id=str(record.get("id", "")),
        )


MODALITY_OF_KEY = {v: k for k, v in MEDIA_KEYS.items()}


class BatchError(UserError, ValueError):
    """A batch file line that cannot become a request."""


def prompt_request(text: str, media=(), tools: list | None = None, id: str = ""):
    """``Request`` for one prompt and ``[(modality, path)]`` (placeholders put in front if none)."""
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


#: keys of the short form, and of a unified record (data/schema.json)
PROMPT_KEYS = ("prompt", "images", "videos", "audios", "id", "tools")
RECORD_KEYS = ("messages", "id", "source", "task", "images", "videos", "audios", "tools", "eval", "meta")
#: what users coming from other tools write instead (LLaVA's singular ``image``, ...)
KEY_HINTS = {"image": "images", "video": "videos", "audio": "audios", "text": "prompt", "query": "prompt",
             "question": "prompt", "instruction": "prompt", "input": "prompt", "conversations": "messages",
             "tool": "tools"}  # fmt: skip
MAX_REPORTED = 20


def _unknown_keys(obj: dict) -> list[str]:
    import difflib

    allowed = (
        RECORD_KEYS if "messages" in obj else PROMPT_KEYS if "prompt" in obj else (*RECORD_KEYS, "prompt")
    )
    out = []
    for k in obj:
        if k in allowed:
            continue
        hint = KEY_HINTS.get(k) or next(iter(difflib.get_close_matches(k, allowed, n=1, cutoff=0.6)), None)
        out.append(f"unknown key `{k}`" + (f" (did you mean `{hint}`?)" if hint else ""))
    if out:
        out[-1] += f"; a line takes {', '.join(PROMPT_KEYS)} or a unified record ({', '.join(RECORD_KEYS)})"
    return out


def request_from_obj(obj, root: Path, where: str, default_id: str):
    """One batch line (already parsed) -> ``Request``; unknown keys are an error (never ignored)."""
    if not isinstance(obj, dict):
        raise BatchError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = _unknown_keys(obj)
    if unknown and "messages" not in obj and not isinstance(obj.get("prompt"), str):
        unknown.append("needs `messages` (a unified record) or a `prompt` string")
    if unknown:
        raise BatchError(f"{where}: " + "; ".join(unknown))
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
    line number. Every bad line is found first: the error lists them all (the first 20)."""
    path = Path(path)
    if not path.is_file():
        raise BatchError(f"{path}: batch file not found")
    root = Path(media_root) if media_root else path.parent
    out, bad = [], []
    for n, line in iter_text_lines(path):
        where = f"{path}:{n}"
        try:
            if isinstance(line, NotUtf8):
                raise BatchError(str(line))
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:  # JSONDecodeError, or nesting too deep for the parser
                raise BatchError(f"{where}: not valid JSON ({e})") from None
            except RecursionError:
                raise BatchError(f"{where}: not valid JSON (nested too deeply)") from None
            out.append(request_from_obj(obj, root, where, default_id=str(n)))
        except BatchError as e:
            bad.append(str(e))
    if bad:
        shown = bad[:MAX_REPORTED]
        more = f"\n(and {len(bad) - len(shown)} more)" if len(bad) > len(shown) else ""
        head = f"{path}: {len(bad)} bad line(s), nothing was run:\n" if len(bad) > 1 else ""
        raise BatchError(head + "\n".join(shown) + more)
    if not out:
        raise BatchError(f"{path}: no requests (the file is empty)")
    return out
