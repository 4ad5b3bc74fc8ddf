"""The OpenAI-compatible HTTP server (FastAPI): ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``.

``Server(runtime, ...)`` wraps a loaded ``toollmm.Runtime``: requests are validated (``protocol``), rendered by
the training renderer (the request's ``tools`` passed as a record's ``tools``), their media preprocessed,
and decoded by the runtime's engine in shared batches (``batcher``). The model's tool calls come back as
``message.tool_calls`` (``finish_reason: "tool_calls"``) and are not run unless ``run_tools``; the call text
goes through the engine's one parser and is never evaluated. Media the model generates through its signal
tokens are saved under the runtime's output folder and returned as content parts (``image_url`` /
``video_url`` with a ``data:`` URL) or, for audio, as the API's ``message.audio`` object. Errors use the
API's error shape; nothing a client sends stops the server.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import Request

from toollmm.core.tokens import TOOL_CALL_START

from ..agent.engine import RowOptions
from .batcher import Batcher, Job
from .protocol import ApiError, ChatRequest, MediaStore, bad, parse_chat_request

log = logging.getLogger("toollmm.serve")

FINISH = {
    "eos": "stop",
    "stop_string": "stop",
    "max_new_tokens": "length",
    "tool_call": "tool_calls",
    "tool_limit": "stop",
    "runaway": "stop",
    "cancelled": "stop",
    "error": "stop",
}
MIME = {".png": "image/png", ".mp4": "video/mp4", ".wav": "audio/wav"}


def context_length(model) -> int | None:
    cfg = getattr(model.llm, "config", None)
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def cut_at_stop(text: str, stops: list[str]) -> str:
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[: min(cuts)] if cuts else text


class Server:
    def __init__(
        self,
        runtime,
        *,
        model_name: str,
        api_key: str | None = None,
        media_root: str | Path | None = None,
        run_tools: bool = False,
        max_batch_size: int | None = None,
        batch_wait_ms: float | None = None,
        batched_decode: bool | None = None,
        continuous: bool | None = None,
        max_request_mb: float | None = None,
    ):
        from toollmm.core.paths import resolve

        from ..infer.batched_step import BatchedStepModel
        from ..infer.step import ToolLMMStepModel

        self.rt = runtime
        scfg = runtime.cfg.serve
        self.model_name = model_name
        self.api_key = api_key or None
        if media_root is not None:  # typed on the command line: the caller resolved it
            self.media_root = Path(media_root).resolve()
        else:  # from the config: against the repo root
            self.media_root = resolve(scfg.media_root).resolve() if scfg.media_root else None
        self.run_tools = run_tools
        batched = scfg.batched_decode if batched_decode is None else batched_decode
        if batched and type(runtime.step_model) is ToolLMMStepModel:
            runtime.set_step_model(BatchedStepModel(runtime.model))
        self.max_request_bytes = int((max_request_mb or scfg.max_request_mb) * 2**20)
        self._arriving = 0
        self._arriving_lock = threading.Lock()
        self.batcher = Batcher(
            lambda: self.rt.engine,
            scfg.max_batch_size if max_batch_size is None else max_batch_size,
            scfg.batch_wait_ms if batch_wait_ms is None else batch_wait_ms,
            arriving=lambda: self._arriving,
            continuous=scfg.continuous if continuous is None else continuous,
        )
        self.ctx = context_length(runtime.model)
        self.created = int(time.time())
        self.tool_start = runtime.tokenizer.convert_tokens_to_ids(TOOL_CALL_START)

    # ------------------------------------------------------------------------------ request -> job
    def check_key(self, authorization: str | None) -> None:
        if self.api_key is None:
            return
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not given or not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(
                401, "missing or wrong API key (send 'Authorization: Bearer <key>')", None, "invalid_api_key"
            )

    def arriving(self, delta: int) -> None:
        with self._arriving_lock:
            self._arriving += delta

    def prepare(self, raw: bytes) -> tuple[ChatRequest, list[int], dict, RowOptions]:
        """Everything before the model (runs in a worker thread): parse, render, preprocess, budget."""
        if len(raw) > self.max_request_bytes:
            raise ApiError(413, f"request body larger than {self.max_request_bytes} bytes", "body")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad("body", f"not valid JSON ({e})") from None
        store = MediaStore(Path(self.rt.output_dir) / "uploads" / uuid.uuid4().hex[:12], self.media_root)
        try:
            return self._prepare(body, store)
        finally:
            store.cleanup()

    def _prepare(self, body, store: MediaStore) -> tuple[ChatRequest, list[int], dict, RowOptions]:
        from toollmm.core.tokens import MODALITIES
        from toollmm.data.preprocess import load_media

        from ..infer.requests import Request

        req = parse_chat_request(body, store)
        if req.model != self.model_name:
            raise ApiError(
                404,
                f"model {req.model!r} not found (this server serves {self.model_name!r})",
                "model",
                "model_not_found",
            )
        if self.rt.react and req.tool_choice not in ("auto",):
            raise bad("tool_choice", "only 'auto' is supported with this checkpoint's ReAct tool format")
        r = Request(messages=req.messages, tools=req.tools, id=req.id, **req.media)
        try:
            prompt = self.rt.prompt(r)
        except ValueError as e:
            raise bad("messages", str(e)) from None
        media = {}
        for m in MODALITIES:
            items = [(p, pw) for k, p, pw in req.media_parts if k == m]
            if not items:
                continue
            tensors = []
            for path, where in items:
                try:
                    tensors.append(load_media(m, path, self.rt.cfg.model.preprocess))
                except Exception as e:
                    raise bad(
                        where, f"the {m} does not decode ({type(e).__name__}: {e})", "invalid_media"
                    ) from None
            import torch

            from toollmm.core.batch import MediaInputs

            media[m] = MediaInputs(pixels=torch.stack(tensors).to(self.rt.device), keys=[p for p, _ in items])
        budget = self.rt.cfg.inference.max_new_tokens if req.max_tokens is None else req.max_tokens
        if self.ctx is not None:
            if len(prompt) >= self.ctx or (
                req.max_tokens is not None and len(prompt) + req.max_tokens > self.ctx
            ):
                asked = (
                    f" + {req.max_tokens} completion tokens requested" if req.max_tokens is not None else ""
                )
                raise ApiError(
                    400,
                    f"This model's maximum context length is {self.ctx} tokens; the request has "
                    f"{len(prompt)} prompt tokens{asked}",
                    "messages",
                    "context_length_exceeded",
                )
            budget = min(budget, self.ctx - len(prompt))
        opts = RowOptions(
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed if req.seed is not None else self.rt.cfg.inference.seed,
            max_new_tokens=budget,
            stop=req.stop,
        )
        if req.tool_choice == "none":
            opts.banned = [self.tool_start]
        elif req.tool_choice == "required":
            opts.prefix = [self.tool_start]
        elif isinstance(req.tool_choice, dict):
            name = json.dumps(req.tool_choice["function"]["name"], ensure_ascii=False)
            text = TOOL_CALL_START + '{"name":' + name + ',"arguments":'
            opts.prefix = self.rt.tokenizer.encode(text, add_special_tokens=False)
        return req, prompt, media, opts

    # ------------------------------------------------------------------------------ results
    def stops(self, req: ChatRequest) -> list[str]:
        return [*self.rt.engine.stop_strings, *req.stop]

    def visible_text(self, ids: list[int]) -> str:
        return self.rt.tokenizer.decode(self.rt.engine.visible_ids(ids), skip_special_tokens=True)

    def message(self, req: ChatRequest, row) -> tuple[dict, str]:
        # the visible text up to the first stop string (the template's or the request's), kept as written
        text = cut_at_stop(self.visible_text(row.token_ids), self.stops(req))
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        finish = FINISH.get(row.finish_reason, "stop")
        calls = []
        if not self.run_tools and row.finish_reason == "tool_call":
            for r in row.tool_results[:1]:
                if not r.ok:
                    continue
                args = r.arguments if isinstance(r.arguments, dict) else {"input": r.arguments}
                calls.append(
                    {
                        "id": f"call_{uuid.uuid4().hex[:24]}",
                        "type": "function",
                        "function": {"name": r.name, "arguments": json.dumps(args, ensure_ascii=False)},
                    }
                )
            if calls:
                msg["tool_calls"] = calls
                msg["content"] = text or None
            else:
                finish = "stop"
        parts, audio, saved = [], None, []
        for ev in row.signals:
            if not (isinstance(ev.result, dict) and "path" in ev.result):
                continue
            path = Path(ev.result["path"])
            saved.append({"modality": ev.modality, "path": str(path), "seed": ev.result.get("seed")})
            data = base64.b64encode(path.read_bytes()).decode()
            if ev.modality == "audio":
                audio = {
                    "id": f"audio_{uuid.uuid4().hex[:16]}",
                    "data": data,
                    "expires_at": 0,
                    "transcript": "",
                }
            else:
                kind = f"{ev.modality}_url"
                parts.append(
                    {
                        "type": kind,
                        kind: {
                            "url": f"data:{MIME.get(path.suffix, 'application/octet-stream')};base64,{data}"
                        },
                    }
                )
        if parts:
            msg["content"] = ([{"type": "text", "text": text}] if text else []) + parts
        if audio is not None:
            msg["audio"] = audio
        if saved:
            msg["media"] = saved  # toollmm extension: where the files were saved (--output-dir)
        if self.run_tools and row.tool_results:
            msg["tool_results"] = [  # toollmm extension: the calls the server ran
                {"name": r.name, "arguments": r.arguments, "result": r.result, "error": r.error}
                for r in row.tool_results
            ]
        return msg, finish

    def usage(self, prompt: list[int], row) -> dict:
        c = len(row.token_ids) if row is not None else 0
        return {"prompt_tokens": len(prompt), "completion_tokens": c, "total_tokens": len(prompt) + c}


def build_app(server: Server):
    """The FastAPI app around ``server``."""
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="toollmm", docs_url=None, redoc_url=None, openapi_url=None)

    def err(e: ApiError, path: str, t0: float) -> JSONResponse:
        log.info("%s %d %.3fs %s", path, e.status, time.perf_counter() - t0, e.message[:200])
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        e = ApiError(exc.status_code, str(exc.detail), None)
        return err(e, request.url.path, time.perf_counter())

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return err(bad("body", str(exc)[:500]), request.url.path, time.perf_counter())

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return err(
            ApiError(500, f"internal error: {type(exc).__name__}"), request.url.path, time.perf_counter()
        )

    @app.get("/health")
    async def health():
        b = server.batcher
        return {
            "status": "ok",
            "model": server.model_name,
            "waiting": b.q.qsize(),
            "batches": len(b.batch_sizes),
            "rows": sum(b.batch_sizes),  # requests decoded so far (rows / batches = mean batch size)
            "steps": b.steps,  # continuous batching: decode steps run and the rows they carried
            "step_rows": b.step_rows,
        }

    @app.get("/v1/models")
    async def models(request: Request):
        t0 = time.perf_counter()
        try:
            server.check_key(request.headers.get("authorization"))
        except ApiError as e:
            return err(e, "/v1/models", t0)
        card = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "toollmm"}
        log.info("/v1/models 200 %.3fs", time.perf_counter() - t0)
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str, request: Request):
        t0 = time.perf_counter()
        try:
            server.check_key(request.headers.get("authorization"))
            if model_id != server.model_name:
                raise ApiError(404, f"model {model_id!r} not found", "model", "model_not_found")
        except ApiError as e:
            return err(e, "/v1/models", t0)
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "toollmm"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.perf_counter()
        path = "/v1/chat/completions"
        server.arriving(1)  # tells the batcher a batch-mate is on its way
        try:
            server.check_key(request.headers.get("authorization"))
            raw = await request.body()
            req, prompt, media, opts = await run_in_threadpool(server.prepare, raw)
        except ApiError as e:
            server.arriving(-1)
            return err(e, path, t0)
        except BaseException:
            server.arriving(-1)
            raise
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(kind, payload):
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        job = Job(prompt, media, opts, server.run_tools, on_event, stream=req.stream)
        server.batcher.submit(job)
        server.arriving(-1)
        created = int(time.time())

        def done_line(status: int, row, stream: bool) -> None:
            u = server.usage(prompt, row)
            log.info(
                "%s %d prompt=%d completion=%d finish=%s stream=%s %.3fs",
                path,
                status,
                u["prompt_tokens"],
                u["completion_tokens"],
                row.finish_reason if row is not None else "-",
                stream,
                time.perf_counter() - t0,
            )

        if not req.stream:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(events.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled.set()
                        log.info("%s client went away; request cancelled", path)
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "done":
                    break
                if kind == "error":
                    return err(ApiError(500, f"generation failed: {payload}"), path, t0)
                if kind == "cancelled":
                    return JSONResponse({}, status_code=499)
            row = payload
            msg, finish = server.message(req, row)
            body = {
                "id": req.id,
                "object": "chat.completion",
                "created": created,
                "model": server.model_name,
                "choices": [{"index": 0, "message": msg, "finish_reason": finish, "logprobs": None}],
                "usage": server.usage(prompt, row),
            }
            if row.errors:
                body["toollmm_errors"] = row.errors  # extension: what went wrong in the decode, if anything
            done_line(200, row, False)
            return JSONResponse(body)

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
            c = {
                "id": req.id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": server.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
            if usage is not None:
                c["usage"] = usage
            return f"data: {json.dumps(c, ensure_ascii=False)}\n\n"

        stops = server.stops(req)
        hold = max((len(s) for s in stops), default=1) - 1

        async def sse():
            ids: list[int] = []
            sent = ""
            row = None
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, payload = await events.get()
                    if kind == "tokens":
                        ids.extend(payload)
                        text = server.visible_text(ids)
                        if text.endswith("\ufffd"):
                            continue
                        cut = cut_at_stop(text, stops)
                        safe = cut if cut != text or not hold else text[: max(0, len(text) - hold)]
                        if safe.startswith(sent) and len(safe) > len(sent):
                            yield chunk({"content": safe[len(sent) :]})
                            sent = safe
                        continue
                    if kind == "error":
                        e = ApiError(500, f"generation failed: {payload}")
                        yield f"data: {json.dumps(e.body())}\n\n"
                        break
                    if kind == "cancelled":
                        break
                    row = payload
                    msg, finish = server.message(req, row)
                    content = msg.get("content")
                    final = (
                        content
                        if isinstance(content, str)
                        else cut_at_stop(server.visible_text(row.token_ids), stops)
                    )
                    if final and final.startswith(sent) and len(final) > len(sent):
                        yield chunk({"content": final[len(sent) :]})
                    for k, call in enumerate(msg.get("tool_calls") or []):
                        yield chunk({"tool_calls": [{"index": k, **call}]})
                    extra = {}
                    if isinstance(content, list):
                        extra["media_parts"] = [p for p in content if p.get("type") != "text"]  # extension
                    if "audio" in msg:
                        extra["audio"] = msg["audio"]
                    if extra:
                        yield chunk(extra)
                    yield chunk({}, finish, server.usage(prompt, row))
                    if req.include_usage:
                        c = {
                            "id": req.id,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": server.model_name,
                            "choices": [],
                            "usage": server.usage(prompt, row),
                        }
                        yield f"data: {json.dumps(c)}\n\n"
                    yield "data: [DONE]\n\n"
                    break
            finally:
                if row is None:
                    job.cancelled.set()  # the client went away (or the batch failed): free the row
                    log.info("%s stream ended early; request cancelled", path)
                else:
                    done_line(200, row, True)

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


def serve(server: Server, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn until interrupted (one log line per request; no access log)."""
    import uvicorn

    uvicorn.run(build_app(server), host=host, port=port, log_level="warning", access_log=False)
