"""Serve a trained toollmm model over the OpenAI Chat Completions API (any OpenAI / LangChain client works).

    python code/serve.py --checkpoint outputs/demo/stage_3                      # http://127.0.0.1:8000/v1
    python code/serve.py --checkpoint <you>/toollmm-7b --port 8001 --api-key sk-local serve.max_batch_size=16

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` (messages with text / image /
audio / video parts, ``tools`` + ``tool_choice``, ``stream``, ``max_tokens``, ``temperature``, ``top_p``,
``seed``, ``stop``). The model loads once through ``toollmm.load`` (config/inference.yaml on the
checkpoint's config, then ``--config`` files and ``key=value`` overrides). Tool calls come back to the
client as ``tool_calls`` and are not run unless ``--run-tools``; generated media are returned as data URLs
and saved under ``--output-dir``. Binds 127.0.0.1 unless ``--host`` says otherwise; one log line per request.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from _cli import (
    add_bind_args,
    add_checkpoint_arg,
    add_config_args,
    add_media_root_arg,
    add_output_dir_arg,
    add_verbose_arg,
)
from toollmm.core.errors import UserError, as_user_error, cli_errors


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="serve.py", description=__doc__.split("\n\n")[0])
    add_checkpoint_arg(p)
    add_bind_args(p, port=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("TOOLLMM_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $TOOLLMM_API_KEY; unset = no key)",
    )
    p.add_argument(
        "--model-name", default=None, help="the model id clients send (default: from --checkpoint)"
    )
    add_output_dir_arg(p)
    add_media_root_arg(p, "folder that file paths in media parts must stay inside")
    p.add_argument(
        "--run-tools",
        action="store_true",
        help="run the checkpoint's own tools server-side (sandboxed registry) instead of returning tool_calls",
    )
    add_verbose_arg(p)
    add_config_args(p)
    return p.parse_args(argv)


def model_name(checkpoint: str) -> str:
    """A Hub id as given; a folder as its last two path parts (``demo/stage_3``)."""
    p = Path(checkpoint)
    if not p.exists():
        return checkpoint
    return "/".join(p.resolve().parts[-2:])


@cli_errors("serve.py")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import toollmm
    from toollmm.infer.runtime import INFERENCE_YAML
    from toollmm.serve.app import Server, serve

    files = [INFERENCE_YAML, *args.config]
    try:
        if args.print_config:
            from toollmm.checkpoint.stage import stage_config
            from toollmm.core.config import to_yaml
            from toollmm.core.paths import resolve

            print(to_yaml(stage_config(resolve(args.checkpoint), args.overrides, files)), end="")
            return 0
        if args.media_root is not None and not Path(args.media_root).is_dir():
            raise UserError(f"--media-root {args.media_root}: not a folder")
        runtime = toollmm.load(
            args.checkpoint, overrides=args.overrides, config_files=files, output_dir=args.output_dir
        )
        server = Server(
            runtime,
            model_name=args.model_name or model_name(args.checkpoint),
            api_key=args.api_key,
            media_root=args.media_root,
            run_tools=args.run_tools,
        )
    except UserError:
        raise
    except (ValueError, OSError) as e:  # the loaders' own errors are about what the user gave them
        raise as_user_error(e) from e
    print(
        f"serve.py: {server.model_name} on http://{args.host}:{args.port}/v1 "
        f"(batch <= {server.batcher.max_batch_size}, media -> {runtime.output_dir})",
        flush=True,
    )
    serve(server, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
