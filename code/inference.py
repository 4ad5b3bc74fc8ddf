"""Chat with a trained toollmm model: text + image/audio/video in -> text, executed tools, generated media out.

    python code/inference.py --checkpoint outputs/demo/stage_3 --prompt "What is 12 plus 30?"
    python code/inference.py --checkpoint outputs/demo/stage_3 --image cat.png --prompt "Describe it." --json
    python code/inference.py --checkpoint outputs/demo/stage_3 --chat            # multi-turn, see /help
    python code/inference.py --checkpoint outputs/demo/stage_3 --batch in.jsonl --out out.jsonl
    python code/inference.py --checkpoint outputs/demo/stage_3 --prompt "hi" inference.temperature=0.7

Loads a stage folder, a released folder or a Hub id through ``toollmm.load`` (the one loader), with
defaults from config/inference.yaml layered on the checkpoint's saved config, then ``--config`` files, then
``key=value`` overrides. Media are written to --output-dir (default outputs/inference/<timestamp>/),
which is also the tools' workspace. ``--json`` prints one object per turn:
{"text", "tool_calls": [{"name", "arguments", "result", "error", "duration_s"}], "media": [{"modality",
"path", "seed"}], "errors", "timings": {"load_s", "first_token_s", "total_s"}}; ``--batch`` writes one
such object per input line, plus its ``id``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from _cli import add_checkpoint_arg, add_config_args, add_media_root_arg, add_output_dir_arg, add_verbose_arg
from toollmm.core.errors import UserError, as_user_error, cli_errors
from toollmm.core.paths import cli_path

MEDIA_FLAGS = ("image", "video", "audio")
CHAT_HELP = (
    "/image PATH, /video PATH, /audio PATH attach media to your next message; /reset clears the history; "
    "/help shows this; /quit (or end of input) leaves; a message that starts with '/' is written '//...'"
)
CHAT_COMMANDS = ("/image", "/video", "/audio", "/reset", "/help", "/quit", "/exit")


class AddMedia(argparse.Action):
    """``--image/--video/--audio P``: one ordered list of (modality, path) across the three flags."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.media = [*(namespace.media or []), (self.dest, value)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="inference.py", description=__doc__.split("\n\n")[0])
    add_checkpoint_arg(p)
    p.add_argument("--prompt", default=None, help="the user message (media placeholders optional)")
    for m in MEDIA_FLAGS:
        p.add_argument(f"--{m}", action=AddMedia, metavar="P", help=f"{m} input (repeatable, in order)")
    add_output_dir_arg(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object per turn")
    p.add_argument("--chat", action="store_true", help="multi-turn chat on stdin")
    p.add_argument("--tools", default=None, help="comma-separated tool names to enable (default: all)")
    p.add_argument("--batch", default=None, type=cli_path, metavar="IN.jsonl", help="one request per line")
    p.add_argument("--out", default=None, type=cli_path, metavar="OUT.jsonl", help="--batch results")
    add_media_root_arg(p, "--batch: relative media paths start here (default: its folder)")
    p.add_argument("--batch-size", type=int, default=8, help="--batch: requests per generate call")
    p.add_argument("--resume", action="store_true", help="--batch: continue a killed batch from OUT.partial")
    add_verbose_arg(p, help="log the library's progress (INFO); tracebacks for errors")
    add_config_args(p, example="inference.temperature=0.7")
    p.set_defaults(media=[])
    args = p.parse_args(argv)
    if args.batch and (args.prompt is not None or args.chat or args.media):
        p.error("--batch takes its prompts and media from the file (no --prompt, --chat or media flags)")
    if args.resume and not args.batch:
        p.error("--resume continues a --batch run")
    if bool(args.batch) != bool(args.out):
        p.error("--batch and --out go together")
    if not (args.batch or args.chat or args.prompt is not None or args.media or args.print_config):
        p.error("give --prompt (and/or media), --chat, or --batch IN --out OUT")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def tool_names(args: argparse.Namespace) -> list[str]:
    return [t.strip() for t in (args.tools or "").split(",") if t.strip()]


def check_media(media: list[tuple[str, str]], flag: str = "--") -> list[tuple[str, str]]:
    """Absolute paths of the media arguments (relative to the current folder, as users expect); an error
    names the argument as the user typed it (``--image P`` on the command line, ``/image P`` in a chat)."""
    out = []
    for modality, path in media:
        p = Path(path).expanduser().resolve()
        if not p.is_file():
            raise FileNotFoundError(f"{flag}{modality} {path}: file not found")
        out.append((modality, str(p)))
    return out


# ----------------------------------------------------------------------------------------- printing
def stream_to(out) -> Callable[[int, str], None]:
    def on_text(row: int, delta: str) -> None:
        out.write(delta)
        out.flush()

    return on_text


def show(result: dict, as_json: bool, out=None) -> None:
    """After a streamed turn: tool calls, media and errors; or the whole result as one JSON line."""
    out = out or sys.stdout
    if as_json:
        out.write(json.dumps(result, ensure_ascii=False) + "\n")
        out.flush()
        return
    out.write("\n")
    for c in result["tool_calls"]:
        args = json.dumps(c["arguments"], ensure_ascii=False)
        got = f"error: {c['error']}" if c["error"] else c["result"]
        out.write(f"  [tool] {c['name']}({args}) -> {got} ({c['duration_s']:.2f}s)\n")
    for m in result["media"]:
        out.write(f"  [{m['modality']}] {m['path']} (seed {m['seed']})\n")
    for e in result["errors"]:
        out.write(f"  [error] {e}\n")
    out.flush()


# ----------------------------------------------------------------------------------------- modes
def run_prompt(rt, args) -> int:
    from toollmm.infer.requests import prompt_request

    req = prompt_request(args.prompt or "", check_media(args.media), tools=offered_tools(rt, args))
    [result], [row] = rt.run_rows([req], on_text=None if args.json else stream_to(sys.stdout))
    show(result, args.json)
    return 0 if row is not None else 1


def run_chat(rt, args, stdin=None) -> int:
    stdin = stdin or sys.stdin
    pending = check_media(args.media)
    rt.conversation.tools = offered_tools(rt, args)
    interactive = stdin.isatty() and not args.json
    if interactive:
        print(f"toollmm chat ({rt.stage.path}); {CHAT_HELP}", file=sys.stderr)
    first = args.prompt
    while True:
        if first is not None:
            line, first = first, None
        else:
            if interactive:
                print("\nyou> ", end="", file=sys.stderr, flush=True)
            line = stdin.readline()
            if not line:
                return 0
        line = line.strip()
        cmd, _, rest = line.partition(" ")
        if cmd in ("/quit", "/exit"):
            return 0
        if cmd == "/help":
            print(CHAT_HELP, file=sys.stderr)
        elif cmd == "/reset":
            rt.new_chat()
            pending = []
        elif cmd.lstrip("/") in MEDIA_FLAGS and cmd.startswith("/"):
            try:
                pending += check_media([(cmd[1:], rest.strip())], flag="/")
            except FileNotFoundError as e:
                print(f"error: {e}", file=sys.stderr)
        elif line.startswith("/") and not line.startswith("//"):
            print(f"error: unknown command {cmd}; commands: {', '.join(CHAT_COMMANDS)}", file=sys.stderr)
        elif line or pending:
            line = line[1:] if line.startswith("//") else line
            on_text = None if args.json else stream_to(sys.stdout)
            result = rt.conversation.send(line, pending, on_text=on_text)
            pending = []
            show(result, args.json)


def partial_path(out: Path) -> Path:
    """Where ``--batch`` results go while it runs (renamed to ``--out`` once every request is done)."""
    return out.with_name(out.name + ".partial")


def resumable(partial: Path, requests) -> int:
    """How many leading requests ``partial`` already holds complete results for (its last, torn line is
    cut off); the ids must match the batch's, or the partial file belongs to another batch."""
    if not partial.is_file():
        return 0
    data = partial.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]  # complete lines only: a kill mid-write leaves a torn last line
    done = 0
    for n, line in enumerate(keep.splitlines(), 1):
        try:
            rid = json.loads(line)["id"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{partial}:{n}: not a result line; delete the file to start over") from None
        if n > len(requests) or rid != requests[n - 1].id:
            raise UserError(
                f"{partial}:{n}: result for id {rid!r}, but request {n} of the batch has id "
                f"{requests[n - 1].id if n <= len(requests) else None!r}: it is from another batch; "
                "delete it to start over"
            )
        done = n
    with open(partial, "r+b") as f:
        f.truncate(len(keep))
    return done


def _not_run(res: dict) -> bool:
    """A result line of a request that could not run (``toollmm.infer.output.error_output``)."""
    return bool(res["errors"]) and not res["text"] and res["timings"].get("total_s") == 0.0


def run_batch(rt, args, requests) -> int:
    """Results go to ``OUT.partial`` (flushed after each group of requests) and are renamed to ``OUT``
    only when all are done, so a killed batch never leaves a complete-looking ``OUT`` nor destroys the
    previous one; ``--resume`` continues from the partial file's last complete result."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out)
    offered = offered_tools(rt, args)
    done = resumable(partial, requests) if args.resume else 0
    if args.resume:
        print(
            f"inference.py: --resume: {done} of {len(requests)} results already in {partial}", file=sys.stderr
        )
    failed = 0
    if done:
        failed = sum(_not_run(json.loads(x)) for x in partial.read_text(encoding="utf-8").splitlines())
    with open(partial, "a" if done else "w", encoding="utf-8") as f:
        for i in range(done, len(requests), args.batch_size):
            part = requests[i : i + args.batch_size]
            for r in part:
                r.tools = r.tools if r.tools is not None else offered
            outs, rows = rt.run_rows(part)
            for r, res, row in zip(part, outs, rows):
                failed += row is None
                f.write(json.dumps({"id": r.id, **res}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    os.replace(partial, out)
    print(f"inference.py: {len(requests)} results -> {out} ({failed} could not run)", file=sys.stderr)
    return 0 if failed == 0 else 1


def offered_tools(rt, args) -> list | None:
    """The enabled tools as HF function specs (the prompt's ``tools``), when --tools names them."""
    names = tool_names(args)
    if not names:
        return None
    return [
        {
            "type": "function",
            "function": {"name": s.name, "description": s.description, "parameters": s.parameters},
        }
        for s in (rt.registry.get(n) for n in names)
    ]


# ----------------------------------------------------------------------------------------- main
@cli_errors("inference.py")
def main(argv: list[str] | None = None, *, loader: Callable | None = None, stdin=None) -> int:
    """``loader(checkpoint, **kwargs) -> Runtime`` replaces ``toollmm.load`` (tests)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    import toollmm
    from toollmm.core.console import quiet_library_progress
    from toollmm.infer.requests import read_batch
    from toollmm.infer.runtime import INFERENCE_YAML

    overrides = list(args.overrides)
    if tool_names(args):
        overrides.append(f"inference.tools={json.dumps(tool_names(args))}")
    files = [INFERENCE_YAML, *args.config]
    try:
        if args.print_config:
            from toollmm.checkpoint.stage import describe_stage_config

            print(describe_stage_config(args.checkpoint, overrides, files))
            return 0
        requests = read_batch(args.batch, args.media_root) if args.batch else None
        check_media(args.media)
        quiet_library_progress()  # their bars would land on the streamed answer (a decoder loads mid-turn)
        if not args.json:
            print(f"inference.py: loading {args.checkpoint}", file=sys.stderr, flush=True)
        rt = (loader or toollmm.load)(
            args.checkpoint, overrides=overrides, config_files=files, output_dir=args.output_dir
        )
    except UserError:
        raise
    except (ValueError, OSError) as e:  # the loaders' own errors are about what the user gave them
        raise as_user_error(e) from e
    if not args.json:
        print(f"inference.py: loaded in {rt.load_s:.1f} s; outputs in {rt.output_dir}", file=sys.stderr)
    if args.batch:
        return run_batch(rt, args, requests)
    if args.chat:
        return run_chat(rt, args, stdin)
    return run_prompt(rt, args)


if __name__ == "__main__":
    sys.exit(main())
