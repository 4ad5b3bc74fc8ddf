"""Publish a stage folder to the Hugging Face Hub: the trained delta, its tokenizer and a model card.

    python code/release.py --checkpoint outputs/demo/stage_3 --repo-id me/toollmm-demo --dry-run --out /tmp/rel
    python code/release.py --checkpoint outputs/run/stage_3 --repo-id me/toollmm-7b --private [--merge]

Writes the release folder (default ``<checkpoint>/release``; see ``toollmm.release``), checks it (no base
weights, no empty tensors, no empty adapter), prints every file it holds, and unless ``--dry-run`` uploads
it with huggingface_hub (``create_repo`` + ``upload_folder``; the repo's files then equal the folder's).
The token is huggingface_hub's (``hf auth login`` or ``HF_TOKEN``); it is never printed or written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from _cli import add_checkpoint_arg, add_verbose_arg
from toollmm.checkpoint.bases import ROLES
from toollmm.core.errors import cli_errors
from toollmm.core.paths import cli_path, resolve
from toollmm.release.card import human_size
from toollmm.release.folder import ReleaseError, build_release
from toollmm.release.upload import upload


def _base_id(text: str) -> tuple[str, str]:
    role, sep, hub_id = text.partition("=")
    if not sep or role not in ROLES or hub_id.count("/") != 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected ROLE=OWNER/NAME with ROLE one of {', '.join(ROLES)}"
        )
    return role, hub_id


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="release.py", description=__doc__.split("\n\n")[0])
    add_checkpoint_arg(p, hub=False, help="stage folder (e.g. outputs/<run>/stage_3)")
    p.add_argument("--repo-id", required=True, help="Hub model repo, OWNER/NAME")
    p.add_argument("--private", action="store_true", help="create the repo private")
    add_verbose_arg(p)
    p.add_argument(
        "--dry-run", action="store_true", help="write and check the folder, list it, upload nothing"
    )
    p.add_argument(
        "--out", default=None, type=cli_path, help="release folder (default: <checkpoint>/release)"
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="also write merged/: the whole LLM with LoRA and token rows merged in (base-LLM size, its licence)",
    )
    p.add_argument(
        "--merge-dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="dtype of merged/ ('auto' = the base LLM's own)",
    )
    p.add_argument("--license", default="cc-by-nc-4.0", help="Hub licence id of the released delta")
    p.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="ID",
        help="Hub dataset id for the card (repeatable)",
    )
    p.add_argument(
        "--base-id",
        action="append",
        default=[],
        type=_base_id,
        metavar="ROLE=OWNER/NAME",
        help=f"Hub id of a base model trained from a local copy outside pretrained_checkpoint/ (roles: {', '.join(ROLES)})",
    )
    return p


def _print_listing(release, dry_run: bool, private: bool) -> None:
    files = release.files
    print(f"release folder {release.folder}: {len(files)} files, {human_size(sum(s for _, s in files))}")
    for rel, size in files:
        print(f"  {rel}\t{human_size(size)}")
    merged = release.merged_files
    if merged:
        llm = release.bases["llm"]
        print(
            f"WARNING: merged/ holds the whole LLM ({human_size(sum(s for _, s in merged))}), i.e. the base LLM's "
            f"weights ({llm['name']}, licence {llm.get('license')}) with LoRA and token rows merged in"
        )
    where = f"https://huggingface.co/{release.repo_id}" + (" (private)" if private else "")
    print(f"{'dry run: would upload to' if dry_run else 'uploading to'} {where}")


@cli_errors("release.py")
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if args.repo_id.count("/") != 1:
            raise HFValidationError("expected OWNER/NAME")
        validate_repo_id(args.repo_id)
    except HFValidationError as e:
        raise ReleaseError(f"--repo-id {args.repo_id!r}: {e}") from None
    from toollmm.eval.tables import eval_tables

    ckpt = resolve(args.checkpoint)
    out = resolve(args.out) if args.out else Path(ckpt) / "release"
    release = build_release(
        ckpt,
        out,
        args.repo_id,
        base_ids=dict(args.base_id),
        license=args.license,
        datasets=args.dataset,
        merge=args.merge,
        merge_dtype=args.merge_dtype,
        evaluation=eval_tables(ckpt),  # the card's Evaluation section: <checkpoint>/eval/*.json
    )
    _print_listing(release, args.dry_run, args.private)
    if not args.dry_run:
        url = upload(release.folder, args.repo_id, private=args.private)
        print(f"uploaded: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
