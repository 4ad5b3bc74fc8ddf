"""OpenAI Chat Completions requests -> our ``Request`` + per-row decode options, checked field by field.

Every problem is an ``ApiError`` (HTTP status, message, the offending field as ``param``) that the app
returns in the API's error shape; nothing here trusts the client. Messages become unified-record messages
(the training renderer's input): user content parts become text with ``<image>`` / ``<video>`` / ``<audio>``
placeholders (put in front of the text, in part order, as training and ``inference.py`` lay them out,
unless the text writes its own placeholders), ``tool_calls`` arguments (a JSON string in the API) become
objects, a ``tool`` message takes the name of the call it answers (``tool_call_id``), and media this server
returned in an assistant turn (echoed back by the client) become that turn's ``generate`` entries, so the
history holds the signal spans the model wrote, as ``ChatSession`` keeps them. Media arrive as
``data:`` URLs / base64 (decoded into the request's upload folder) or as file paths under the media root;
nothing is fetched from the network. Each medium is preprocessed here, so one that does not decode is a
400 naming its part before anything reaches the model.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..agent.spec import ToolResult
from ..core.toolcall import call_from_value
from ..infer.requests import with_placeholders
from ..infer.session import tool_messages

ROLES = ("system", "developer", "user", "assistant", "tool")
MEDIA_PARTS = {"image_url": "image", "video_url": "video", "input_audio": "audio"}
SUFFIX_OF_MIME = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "image/bmp": ".bmp",
    "video/mp4": ".mp4",
    "video/webm": ".webm",
    "video/quicktime": ".mov",
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "audio/wave": ".wav",
    "audio/mpeg": ".mp3",
    "audio/flac": ".flac",
    "audio/ogg": ".ogg",
}
AUDIO_FORMATS = {"wav": ".wav", "mp3": ".mp3", "flac": ".flac", "ogg": ".ogg"}
DATA_URL_RE = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w-]+=[^;,]*)*)(;base64)?,(.*)$", re.S)


class ApiError(Exception):
    """An error the client gets back: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {
            401: "authentication_error",
            404: "not_found_error",
            413: "invalid_request_error",
            500: "server_error",
            503: "server_error",
        }.get(self.status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, f"{param}: {message}", param, code)


@dataclass
class ChatRequest:
    """One validated request."""

    model: str
    messages: list[dict]  # unified-record messages
    media: dict[str, list[str]]  # images / videos / audios: paths in placeholder order
    media_parts: list[tuple[str, str, str]]  # (modality, path, the part's field name) for decode errors
    tools: list | None
    tool_choice: Any  # "auto" | "none" | "required" | {"function": {"name"}}
    stream: bool
    include_usage: bool
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: list[str]
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex[:24])


# ------------------------------------------------------------------------------------------ fields
def _number(body: dict, key: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(key, f"must be a number, got {json.dumps(v)[:50]}")
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(key, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


def _int(body: dict, key: str, lo: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(key, f"must be an integer, got {json.dumps(v)[:50]}")
    if lo is not None and v < lo:
        raise bad(key, f"must be >= {lo}, got {v}")
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v) or len(v) > 4:
        raise bad("stop", "must be a string or a list of at most 4 strings")
    return [s for s in v if s]


def _tools(body: dict) -> list | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad("tools", "must be a list of function tools")
    out = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise bad(where, 'must be {"type": "function", "function": {...}}')
        fn = t["function"]
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"{where}.function.name", "must be a non-empty string")
        if "description" in fn and not isinstance(fn["description"], str):
            raise bad(f"{where}.function.description", "must be a string")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise bad(f"{where}.function.parameters", "must be a JSON-schema object")
        spec = {"name": fn["name"]}
        if "description" in fn:
            spec["description"] = fn["description"]
        if params is not None:
            spec["parameters"] = params
        out.append({"type": "function", "function": spec})  # API-only keys (strict) dropped
    return out or None


def _tool_choice(body: dict, tools: list | None):
    tc = body.get("tool_choice")
    if tc is None:
        return "auto"
    if tc in ("auto", "none", "required"):
        if tc == "required" and not tools:
            raise bad("tool_choice", "'required' needs `tools`")
        return tc
    if isinstance(tc, dict) and tc.get("type") == "function" and isinstance(tc.get("function"), dict):
        name = tc["function"].get("name")
        names = [t["function"]["name"] for t in tools or []]
        if name not in names:
            raise bad("tool_choice", f"function {name!r} is not among `tools` ({names})")
        return {"function": {"name": name}}
    raise bad("tool_choice", "must be 'auto', 'none', 'required' or {\"type\": \"function\", ...}")


# ------------------------------------------------------------------------------------------- media
class MediaStore:
    """Where a request's media end up: ``data:`` / base64 payloads are written into ``upload_dir``; paths
    must resolve inside ``media_root`` (None: paths are refused)."""

    def __init__(self, upload_dir: Path, media_root: Path | None):
        self.upload_dir = upload_dir
        self.media_root = media_root.resolve() if media_root else None
        self.n = 0

    def cleanup(self) -> None:
        """Remove the uploads (once the media are preprocessed, the files are no longer needed)."""
        import shutil

        shutil.rmtree(self.upload_dir, ignore_errors=True)

    def _write(self, data: bytes, suffix: str) -> str:
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        path = self.upload_dir / f"in_{self.n}{suffix}"
        self.n += 1
        path.write_bytes(data)
        return str(path)

    def from_url(self, url: Any, modality: str, where: str) -> str:
        if not isinstance(url, str) or not url:
            raise bad(where, "needs a `url` string (a data: URL or a file path)")
        if url.startswith("data:"):
            m = DATA_URL_RE.match(url)
            if not m or not m.group(3):
                raise bad(where, "a data: URL must be base64 (data:<mime>;base64,...)", "invalid_media")
            mime = (m.group(1) or "").lower()
            if mime and not mime.startswith(modality + "/"):
                raise bad(where, f"data: URL has type {mime!r}, expected {modality}/*", "invalid_media")
            return self._write(
                self._b64(m.group(4), where), SUFFIX_OF_MIME.get(mime, _default_suffix(modality))
            )
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url):
            raise bad(where, "only data: URLs and local file paths are accepted (nothing is fetched)")
        if self.media_root is None:
            raise bad(where, "file paths are refused (start the server with --media-root DIR to allow them)")
        p = Path(url)
        full = (p if p.is_absolute() else self.media_root / p).resolve()
        if not full.is_relative_to(self.media_root):
            raise bad(where, f"{url!r} is outside the media root")
        if not full.is_file():
            raise bad(where, f"{url!r}: no such file under the media root")
        return str(full)

    def from_audio(self, part: Any, where: str) -> str:
        if not isinstance(part, dict) or not isinstance(part.get("data"), str):
            raise bad(where, 'needs {"data": <base64>, "format": "wav"}')
        fmt = part.get("format", "wav")
        if fmt not in AUDIO_FORMATS:
            raise bad(f"{where}.format", f"must be one of {sorted(AUDIO_FORMATS)}")
        return self._write(self._b64(part["data"], where), AUDIO_FORMATS[fmt])

    @staticmethod
    def _b64(text: str, where: str) -> bytes:
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad(where, f"base64 payload does not decode ({e})", "invalid_media") from None


def _default_suffix(modality: str) -> str:
    return {"image": ".png", "video": ".mp4", "audio": ".wav"}[modality]


# ---------------------------------------------------------------------------------------- messages
def _text_of(content: Any, where: str, *, allow_media: bool, store: MediaStore | None, media: list) -> str:
    """A message's content as text; media parts (user messages) appended to ``media``."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(where, "must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        pw = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad(f"{pw}.text", "must be a string")
            texts.append(part["text"])
        elif kind in MEDIA_PARTS and allow_media:
            modality = MEDIA_PARTS[kind]
            if kind == "input_audio":
                path = store.from_audio(part.get("input_audio"), f"{pw}.input_audio")
            else:
                sub = part.get(kind)
                url = sub.get("url") if isinstance(sub, dict) else sub
                path = store.from_url(url, modality, f"{pw}.{kind}")
            media.append((modality, path, pw))
        else:
            allowed = ["text", *MEDIA_PARTS] if allow_media else ["text"]
            raise bad(f"{pw}.type", f"must be one of {allowed}, got {json.dumps(kind)}")
    return "\n".join(texts)


def _tool_calls(calls: Any, where: str, ids: dict[str, str]) -> list[dict]:
    if not isinstance(calls, list):
        raise bad(where, "must be a list")
    out = []
    for j, c in enumerate(calls):
        cw = f"{where}[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(cw, 'must be {"type": "function", "function": {"name", "arguments"}}')
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            parsed, err = call_from_value({"name": fn["name"], "arguments": args})
            if parsed is None:
                raise bad(f"{cw}.function.arguments", f"must be a JSON object ({err})")
            args = parsed["arguments"]
        if not isinstance(args, dict):
            raise bad(f"{cw}.function.arguments", "must be a JSON object")
        if isinstance(c.get("id"), str):
            ids[c["id"]] = fn["name"]
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def _ran_tools(raw: Any, where: str) -> list[dict]:
    """The ``tool_results`` extension of an assistant message (what a ``--run-tools`` server returned,
    echoed back by the client) -> the call and tool messages that precede the answer in the history, as
    ``ChatSession`` records a turn whose tools ran (a malformed call, name ``?``, was never in the
    history's form and is left out the same way), so the next turn renders the ids the model saw."""
    if not isinstance(raw, list):
        raise bad(where, "must be a list of {name, arguments, result, error} objects")
    out: list[dict] = []
    for j, r in enumerate(raw):
        w = f"{where}[{j}]"
        if not isinstance(r, dict) or not isinstance(r.get("name"), str):
            raise bad(w, "must be an object with a `name` string")
        for key in ("result", "error"):
            if r.get(key) is not None and not isinstance(r[key], str):
                raise bad(f"{w}.{key}", "must be a string or null")
        ran = ToolResult(r["name"], r.get("arguments"), r.get("result") or "", r.get("error"), 0.0)
        out += tool_messages(ran)
    return out


def parse_messages(raw: Any, store: MediaStore) -> tuple[list[dict], dict[str, list[str]], list]:
    if not isinstance(raw, list) or not raw:
        raise bad("messages", "must be a non-empty list of messages")
    msgs: list[dict] = []
    call_names: dict[str, str] = {}
    media_by_key: dict[str, list[str]] = {"images": [], "videos": [], "audios": []}
    parts_info: list[tuple[str, str, str]] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, "must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"must be one of {list(ROLES)}, got {json.dumps(role)}")
        if role in ("system", "developer"):
            if msgs:
                raise bad(where, "a system message may only come first")
            text = _text_of(m.get("content"), f"{where}.content", allow_media=False, store=None, media=[])
            msgs.append({"role": "system", "content": text})
        elif role == "user":
            media: list = []
            text = _text_of(m.get("content"), f"{where}.content", allow_media=True, store=store, media=media)
            msgs.append({"role": "user", "content": with_placeholders(text, [(k, p) for k, p, _ in media])})
            for modality, path, pw in media:
                media_by_key[modality + "s"].append(path)
                parts_info.append((modality, path, pw))
        elif role == "assistant":
            content = m.get("content")
            generated = []  # media this server returned in that turn: its signal span is in the history
            if isinstance(content, list):
                keep = []
                for part in content:
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind in ("image_url", "video_url"):
                        generated.append({"modality": MEDIA_PARTS[kind], "caption": ""})
                    else:
                        keep.append(part)
                content = keep
            if isinstance(m.get("audio"), dict):
                generated.append({"modality": "audio", "caption": ""})
            text = _text_of(content, f"{where}.content", allow_media=False, store=None, media=[])
            msg: dict = {"role": "assistant", "content": text}
            if generated:
                msg["generate"] = generated
            if m.get("tool_calls"):
                msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls", call_names)
            if m.get("tool_results") is not None:  # the calls a --run-tools server ran in this turn
                msgs += _ran_tools(m["tool_results"], f"{where}.tool_results")
            msgs.append(msg)
        else:  # tool
            text = _text_of(m.get("content"), f"{where}.content", allow_media=False, store=None, media=[])
            name = m.get("name") or call_names.get(m.get("tool_call_id") or "")
            if not isinstance(name, str) or not name:
                raise bad(
                    f"{where}.tool_call_id", "does not match a tool call of an earlier assistant message"
                )
            msgs.append({"role": "tool", "name": name, "content": text})
    return msgs, media_by_key, parts_info


def parse_chat_request(body: Any, store: MediaStore) -> ChatRequest:
    """Validate a ``/v1/chat/completions`` body (a parsed JSON value)."""
    if not isinstance(body, dict):
        raise bad("body", "must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "must be a non-empty string")
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise bad("n", f"only n=1 is supported, got {n}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "must be true or false")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise bad("stream_options", "must be an object")
    mt = _int(body, "max_completion_tokens", 1)
    mt = mt if mt is not None else _int(body, "max_tokens", 1)
    tools = _tools(body)
    choice = _tool_choice(body, tools)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, lo_open=True)
    seed = _int(body, "seed")
    stop = _stop(body)
    msgs, media, parts = parse_messages(body.get("messages"), store)
    return ChatRequest(
        model=model,
        messages=msgs,
        media=media,
        media_parts=parts,
        tools=tools,
        tool_choice=choice,
        stream=stream,
        include_usage=bool(so.get("include_usage")),
        max_tokens=mt,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop,
    )
