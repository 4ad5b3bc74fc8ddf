"""The web demo: chat with a trained toollmm model, upload images / audio / video, see tool calls and media.

    python code/app.py --checkpoint outputs/demo/stage_3                 # http://127.0.0.1:7860
    python code/app.py --checkpoint outputs/demo/stage_3 --port 7861 inference.temperature=0.7

The same runtime as ``code/inference.py`` (``toollmm.load``: config/inference.yaml on the checkpoint's
config, then ``--config`` files and ``key=value`` overrides); one conversation per browser session. Binds
127.0.0.1 unless ``--host`` says otherwise; gradio's analytics are off. API (``gradio_client``):
``/chat`` takes ``{"text": ..., "files": [...]}`` and returns (cleared box, chat messages, the turn's
``--json`` result); ``/clear`` starts a new conversation.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from _cli import add_bind_args, add_checkpoint_arg, add_config_args, add_output_dir_arg, add_verbose_arg  # noqa: E402
from toollmm.core.errors import UserError, as_user_error, cli_errors  # noqa: E402

TITLE = "toollmm: chat, tools and any-to-any generation"


@dataclass
class AppState:
    """One browser session: its conversation and what the chat window shows."""

    session: object = None  # toollmm.infer.session.ChatSession, created on the first message
    messages: list[dict] = field(default_factory=list)


def chat_messages(text: str, files: list[str], out: dict) -> list[dict]:
    """One turn as gradio chat messages: uploads, the user text, each tool call (a titled, collapsible
    message), the answer, then the generated media."""
    msgs = [{"role": "user", "content": {"path": f}} for f in files]
    msgs += [{"role": "user", "content": text}] if text else []
    for c in out["tool_calls"]:
        body = f"arguments: {json.dumps(c['arguments'], ensure_ascii=False)}\n"
        body += f"error: {c['error']}" if c["error"] else f"result: {c['result']}"
        title = f"🛠️ {c['name']} ({c['duration_s']:.2f}s)"
        msgs.append({"role": "assistant", "content": body, "metadata": {"title": title, "status": "done"}})
    if out["text"].strip() or not out["media"]:
        msgs.append({"role": "assistant", "content": out["text"].strip() or "(no answer)"})
    msgs += [{"role": "assistant", "content": {"path": m["path"]}} for m in out["media"]]
    if out["errors"]:
        title = "⚠️ problems"
        msgs.append({"role": "assistant", "content": "\n".join(out["errors"]), "metadata": {"title": title}})
    return msgs


def build_app(runtime):
    """The gradio Blocks app around a loaded ``Runtime``."""
    import gradio as gr

    from toollmm.infer.media import INPUT_SUFFIXES, modality_of

    def respond(message: dict | None, state: AppState | None):
        state = state or AppState()
        if state.session is None:
            state.session = runtime.session()
        message = message or {}
        text, files = (message.get("text") or "").strip(), list(message.get("files") or [])
        if not text and not files:
            return {"text": "", "files": []}, state.messages, None, state
        try:
            media = [(modality_of(f), f) for f in files]
        except ValueError as e:
            raise gr.Error(str(e)) from None
        out = state.session.send(text, media)
        state.messages = [*state.messages, *chat_messages(text, files, out)]
        return {"text": "", "files": []}, state.messages, out, state

    def clear(state: AppState | None):
        return [], None, AppState()

    suffixes = [s for v in INPUT_SUFFIXES.values() for s in v]
    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(f"## {TITLE}\nCheckpoint: `{runtime.stage.path}` · outputs: `{runtime.output_dir}`")
        chatbot = gr.Chatbot(label="conversation", height=480)
        box = gr.MultimodalTextbox(
            file_count="multiple",
            file_types=suffixes,
            placeholder="Ask, request a tool or an image / video / sound; attach media with the clip",
            show_label=False,
        )
        with gr.Accordion("last turn as JSON (code/inference.py --json)", open=False):
            result = gr.JSON(label="result")
        reset = gr.Button("new conversation")
        state = gr.State(None)
        box.submit(respond, [box, state], [box, chatbot, result, state], api_name="chat")
        reset.click(clear, [state], [chatbot, result, state], api_name="clear")
    return app


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="app.py", description=__doc__.split("\n\n")[0])
    add_checkpoint_arg(p)
    add_bind_args(p, port=7860)
    add_output_dir_arg(p)
    add_verbose_arg(p)
    add_config_args(p, example="inference.temperature=0.7")
    return p.parse_args(argv)


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be served (checked before the model loads), or None."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        return f"--host {host}: cannot resolve it ({e})"
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if os.name != "nt":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server sets it
        try:
            s.bind(addr)
        except OSError as e:
            why = "already in use (another app.py or program?)" if e.errno == errno.EADDRINUSE else e.strerror
            return f"cannot serve on {host}:{port}: {why}; choose another port with --port N (e.g. --port {port + 1})"
    return None


def launch(runtime, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve the app; ``block=False`` returns the running app (tests: ``app.close()`` stops it)."""
    app = build_app(runtime)
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        allowed_paths=[str(Path(runtime.output_dir).resolve())],
        quiet=not block,
        show_error=True,
    )
    return app


@cli_errors("app.py")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = None if args.print_config else port_problem(args.host, args.port)
    if problem:
        raise UserError(problem)
    import toollmm
    from toollmm.infer.runtime import INFERENCE_YAML

    files = [INFERENCE_YAML, *args.config]
    try:
        if args.print_config:
            from toollmm.checkpoint.stage import describe_stage_config

            print(describe_stage_config(args.checkpoint, args.overrides, files))
            return 0
        from toollmm.core.console import quiet_library_progress

        quiet_library_progress()
        print(f"app.py: loading {args.checkpoint}", file=sys.stderr, flush=True)
        runtime = toollmm.load(
            args.checkpoint, overrides=args.overrides, config_files=files, output_dir=args.output_dir
        )
    except UserError:
        raise
    except (ValueError, OSError) as e:  # the loaders' own errors are about what the user gave them
        raise as_user_error(e) from e
    try:
        launch(runtime, args.host, args.port)
    except OSError as e:  # the port was taken between the check and the launch
        raise UserError(f"cannot serve on {args.host}:{args.port}: {e}; choose another with --port N") from e
    return 0


if __name__ == "__main__":
    sys.exit(main())
