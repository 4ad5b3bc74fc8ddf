"""Raw public datasets -> unified records -> webdataset shards; the demo corpus.

    python code/prepare_data.py convert --format llava --input llava_v1_5_mix665k.json \\
        --output data/llava665k.jsonl --media-root /data/llava --on-error skip
    python code/prepare_data.py formats          # every format and its options
    python code/prepare_data.py embed-captions --input data/t2x.jsonl --output data/t2x_emb.jsonl
    python code/prepare_data.py shard --input data/llava.jsonl --output data/shards/llava --shard-size 1000
    python code/prepare_data.py demo --output data/demo [--small]
    python code/prepare_data.py demo-base --config config/demo.yaml --output outputs/demo/base
    python code/prepare_data.py encode --config config/demo.yaml --stage 1   # fill the feature cache

Each subcommand is a small function that parses its arguments and calls the library
(``toollmm.data.convert``, ``toollmm.data.shards``, ``toollmm.data.captions``, ...); add one with
``@subcommand``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from _cli import Subcommands, add_config_args, add_media_root_arg
from toollmm.core.errors import cli_errors
from toollmm.core.paths import cli_config_file, cli_path, repo_default
from toollmm.data.convert import REGISTRY, ConversionError, convert_file
from toollmm.data.convert.base import COMMON_OPTIONS

#: ``prepare_data.py <name>``: ``@subcommand(name, configure)`` on ``run(args) -> exit code``
subcommand = Subcommands()


def _parse_opts(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise ConversionError(f"--opt {p!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _configure_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", required=True, choices=sorted(REGISTRY), help="source format")
    p.add_argument("--input", required=True, type=cli_path, help="source file (JSON array or JSONL)")
    p.add_argument("--output", required=True, type=cli_path, help="unified JSONL to write")
    add_media_root_arg(p, "check that every referenced media file exists under DIR")
    p.add_argument(
        "--on-error", choices=("raise", "skip"), default="raise", help="bad record: stop or count it"
    )
    p.add_argument(
        "--check-media",
        action="store_true",
        help="decode every referenced medium (relative to --media-root, else the input's folder); bad "
        "ones stop the conversion naming each file, or with --on-error skip drop their records",
    )
    p.add_argument("--workers", type=int, default=0, help="--check-media processes (0: one per CPU, <= 8)")
    p.add_argument("--source", default=None, help="record 'source' field (default: FORMAT/<input stem>)")
    p.add_argument(
        "--opt", action="append", default=[], metavar="KEY=VALUE", help="format option (see 'formats')"
    )


@subcommand("convert", _configure_convert)
def run_convert(args: argparse.Namespace) -> int:
    """Convert one source file into unified JSONL (validated; prints a summary)."""
    stats = convert_file(
        args.format,
        args.input,
        args.output,
        media_root=args.media_root,
        on_error=args.on_error,
        options=_parse_opts(args.opt),
        source=args.source,
        check_media=args.check_media,
        media_workers=args.workers,
        progress=_media_progress if args.check_media else None,
    )
    print(stats.summary())
    return 0


def _media_progress(checked: int, total: int, bad: int) -> None:
    print(f"check-media: {checked}/{total} media decoded, {bad} bad", file=sys.stderr, flush=True)


@subcommand("formats", lambda p: None)
def run_formats(args: argparse.Namespace) -> int:
    """List the source formats and their --opt options."""
    for name in sorted(REGISTRY):
        spec = REGISTRY[name]
        print(f"{name:14s} {spec.doc}")
        for key, help_text in {**spec.options, **COMMON_OPTIONS}.items():
            print(f"{'':14s}   --opt {key}=...  {help_text}")
    return 0


def _configure_embed_captions(p: argparse.ArgumentParser) -> None:

    p.add_argument("--input", required=True, type=cli_path, help="unified-record JSONL")
    p.add_argument(
        "--output", required=True, type=cli_path, help="JSONL written with generate[].embedding keys set"
    )
    p.add_argument(
        "--store",
        default=repo_default(".cache/captions"),
        type=cli_path,
        help="caption-embedding store (default: the repo's .cache/captions)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="captions per encoder call")
    add_config_args(p)


@subcommand("embed-captions", _configure_embed_captions)
def run_embed_captions(args: argparse.Namespace, build_encoders=None) -> int:
    """Compute decoder caption embeddings for text->X targets (cached, skipped when present)."""
    # build_encoders(cfg) -> (encoders, decoder ids); default: the config's decoders
    from toollmm.core.config import load_config
    from toollmm.data.captions import CaptionStore, embed_captions_jsonl
    from toollmm.train.targets import decoder_encoders

    cfg = load_config(config_files=args.config, overrides=args.overrides).config
    encoders, ids = (build_encoders or decoder_encoders)(cfg)
    store = CaptionStore(args.store)
    counts = embed_captions_jsonl(args.input, args.output, encoders, ids, store, args.batch_size)
    print(f"embed-captions: {args.input} -> {args.output} ({counts['computed']} computed, "
          f"{counts['cached']} already stored in {args.store})")  # fmt: skip
    return 0


def _configure_shard(p: argparse.ArgumentParser) -> None:
    p.description = "Write webdataset shards holding each record, its media bytes and caption embeddings."
    p.add_argument("--input", required=True, type=cli_path, help="unified-record JSONL (output of `convert`)")
    p.add_argument("--output", required=True, type=cli_path, help="shard folder, e.g. data/shards/NAME/")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--shard-bytes", type=float, default=3e9, help="bytes per shard at most (default 3e9)")
    add_media_root_arg(p, "folder media paths are relative to (default: input's folder)")
    p.add_argument(
        "--captions",
        default=None,
        type=cli_path,
        help="caption-embedding store written by `embed-captions` (copied into shards)",
    )
    p.add_argument(
        "--on-error", choices=["raise", "skip"], default="raise", help="bad record: stop, or skip and count"
    )
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --output")


@subcommand("shard", _configure_shard)
def run_shard(args: argparse.Namespace) -> int:
    """Unified JSONL + media -> webdataset tar shards with an index (records validated, bad ones named or
    counted)."""
    import json

    from toollmm.data.captions import CaptionStore
    from toollmm.data.shards import write_shards
    from toollmm.data.sources import JsonlSource

    store = CaptionStore(args.captions) if args.captions else None
    src = JsonlSource(args.input, media_root=args.media_root, captions=store)
    summary = write_shards(
        src,
        args.output,
        args.shard_size,
        shard_bytes=args.shard_bytes,
        on_error=args.on_error,
        overwrite=args.overwrite,
    )
    print(f"shard summary: {json.dumps(summary)}")
    return 0


def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--output",
        default=repo_default("data/demo"),
        type=cli_path,
        help="corpus folder (default: the repo's data/demo)",
    )
    p.add_argument("--small", action="store_true", help="a few hundred records, for tests")
    p.add_argument("--seed", type=int, default=0, help="everything random derives from it")
    p.add_argument("--vocab-size", type=int, default=1000, help="sentencepiece vocabulary size")


@subcommand("demo", _configure_demo)
def run_demo(args: argparse.Namespace) -> int:
    """Write the deterministic demo corpus (media, train/heldout JSONL, tokenizer) to --output."""
    # deterministic for a seed; the full corpus (a few thousand records) takes well under a minute on 2
    # cores, --small (a few hundred records) a few seconds; layout: toollmm.demo.corpus
    from toollmm.demo.corpus import generate_demo_corpus

    summary = generate_demo_corpus(args.output, seed=args.seed, small=args.small, vocab_size=args.vocab_size)
    print(f"demo corpus: {summary['records_total']} records -> {args.output}")
    return 0


def _configure_demo_base(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="FILE", type=cli_config_file,
                   help="config layer(s) giving the encoder dims (default: config/demo.yaml)")  # fmt: skip
    p.add_argument(
        "--corpus",
        default=repo_default("data/demo"),
        type=cli_path,
        help="the demo corpus (its tokenizer and training media)",
    )
    p.add_argument(
        "--output", default=repo_default("outputs/demo/base"), type=cli_path, help="where the base models go"
    )
    p.add_argument("--llm-hidden", type=int, default=None, help="stand-in Llama width (default 128)")
    p.add_argument("--llm-layers", type=int, default=None, help="stand-in Llama layers (default 4)")
    p.add_argument("--llm-heads", type=int, default=None, help="stand-in Llama attention heads (default 4)")
    p.add_argument(
        "--llm-intermediate", type=int, default=None, help="stand-in Llama MLP width (default 344)"
    )
    p.add_argument(
        "--llm-tied", choices=("yes", "no"), default=None,
        help="stand-in Llama with the lm_head tied to the input embeddings (default no)",
    )  # fmt: skip


@subcommand("demo-base", _configure_demo_base)
def run_demo_base(args: argparse.Namespace) -> int:
    """Write the demo's base models (tiny ImageBind, random Llama, tiny decoders) to --output."""
    import dataclasses

    from toollmm.demo.base import DEMO_LLM, build_demo_base

    given = {"hidden_size": args.llm_hidden, "num_hidden_layers": args.llm_layers,
             "num_attention_heads": args.llm_heads, "num_key_value_heads": args.llm_heads,
             "intermediate_size": args.llm_intermediate,
             "tie_word_embeddings": None if args.llm_tied is None else args.llm_tied == "yes"}  # fmt: skip
    # flags change only their field of DEMO_LLM (before, a TinyLlama of the flags' defaults replaced it)
    shape = dataclasses.replace(DEMO_LLM, **{k: v for k, v in given.items() if v is not None})
    paths = build_demo_base(args.config or ["config/demo.yaml"], args.corpus, args.output, llm=shape)
    print(f"demo base models -> {args.output}: {', '.join(sorted(paths))}")
    return 0


def _configure_encode(p: argparse.ArgumentParser) -> None:
    from toollmm.core.paths import cli_config_file

    p.add_argument("--config", action="append", default=[], metavar="FILE", type=cli_config_file,
                   help="config layer(s), as for train.py (repeatable; taken from the current directory)")  # fmt: skip
    p.add_argument("--stage", type=int, action="append", choices=[0, 1, 2, 3], default=None,
                   help="stage whose data to encode (repeatable; default: 1, 2 and 3)")  # fmt: skip
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: this rank's GPU, else cpu)")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="encoder dtype; part of the cache key, so it must match the training run's "
        "(auto: what training on this host uses: the DeepSpeed config's precision on a GPU, fp32 on CPU)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="media per forward (default: config's)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


@subcommand("encode", _configure_encode)
def run_encode(args: argparse.Namespace) -> int:
    """Fill the feature cache with the encoder outputs of a stage's media (resumable; run under torchrun
    for several GPUs); training then reads them and never loads the encoder."""
    import json
    import os

    import torch

    from toollmm.core.config import load_config
    from toollmm.train.build import has_media
    from toollmm.train.features import encoder_placement, precompute_features

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
    summary = {}
    try:
        for stage in args.stage or [1, 2, 3]:
            cfg = load_config(stage=stage, config_files=args.config, overrides=args.overrides).config
            if not cfg.model.feature_cache.enabled:
                print(
                    f"stage {stage}: model.feature_cache.enabled is false; nothing to fill", file=sys.stderr
                )
                return 2
            if not has_media(cfg):
                if rank == 0:
                    print(f"stage {stage}: no media in its data; nothing to encode")
                continue
            device, dtype = encoder_placement(cfg, world)
            if args.device:
                device = torch.device(args.device)
                if device.type == "cpu" and args.dtype == "auto":
                    dtype = torch.float32
            if args.dtype != "auto":
                dtype = getattr(torch, args.dtype)
            cache, stats = precompute_features(cfg, rank, world, device=device, dtype=dtype,
                                               batch_size=args.batch_size)  # fmt: skip
            summary[f"stage_{stage}"] = {"cache": str(cache.root / cache.encoder.identity), **stats.as_dict()}
            if rank == 0:
                print(f"stage {stage}: {cache.root / cache.encoder.identity} ({dtype}, {device})")
                for m, c in stats.as_dict()["media"].items():
                    print(
                        f"  {m:6s} encoded {c['encoded']:7d}  cached {c['cached']:7d}  failed {c['failed']:5d}"
                    )
                print(f"  {stats.encoder_forwards} encoder forwards in {stats.seconds:.1f} s; "
                      f"{stats.duplicates} repeated media, {stats.bad_samples} bad records")  # fmt: skip
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        print(json.dumps(summary))
    return 0  # failed media are counted above and left to the stream's data.on_error policy


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prepare_data.py", description=__doc__.split("\n\n")[0])
    subcommand.add_to(parser)
    return parser


@cli_errors("prepare_data.py")
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.run(args)  # user errors (ConversionError ...): one line, exit 2 (cli_errors)


if __name__ == "__main__":
    sys.exit(main())
