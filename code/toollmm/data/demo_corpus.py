"""The demo corpus generator's command line: ``python code/prepare_data.py demo --output data/demo``.

Deterministic for a seed; the full corpus (a few thousand records) takes well under a minute on 2 cores,
``--small`` (a few hundred records) a few seconds. See ``toollmm.data.demo.corpus`` for the layout.
"""

from __future__ import annotations

import argparse
import logging

from ..paths import cli_path, repo_default
from .demo import DEMO_TOOLS, FULL, SMALL, TOOL_NAMES, DemoSizes, generate_demo_corpus, run_demo_tool

__all__ = [
    "DEMO_TOOLS", "FULL", "SMALL", "TOOL_NAMES", "DemoSizes", "add_arguments", "generate_demo_corpus",
    "main", "run", "run_demo_tool",
]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``demo`` subcommand's options (for ``prepare_data.py``'s subparser)."""
    parser.add_argument(
        "--output",
        default=repo_default("data/demo"),
        type=cli_path,
        help="corpus folder (default: the repo's data/demo)",
    )
    parser.add_argument("--small", action="store_true", help="a few hundred records, for tests")
    parser.add_argument("--seed", type=int, default=0, help="everything random derives from it")
    parser.add_argument("--vocab-size", type=int, default=1000, help="sentencepiece vocabulary size")
    return parser


def run(args: argparse.Namespace) -> dict:
    return generate_demo_corpus(args.output, seed=args.seed, small=args.small, vocab_size=args.vocab_size)


def main(argv: list[str] | None = None) -> dict:
    parser = add_arguments(
        argparse.ArgumentParser(prog="prepare_data.py demo", description=__doc__.split("\n")[0])
    )
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run(args)


if __name__ == "__main__":
    main()
