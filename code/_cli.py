"""The command-line flags the entry points share, each defined once (not an entry point itself).

Command-line parsing lives only in ``code/*.py``: every entry point builds its own parser and takes the
flags it shares with the others from here (``--checkpoint``, ``--host`` / ``--port``, ``--output-dir``,
``--verbose``, ``--config`` / ``--print-config`` / ``key=value``), and the subcommand table of
``prepare_data.py`` and ``evaluate.py``. The library (``toollmm``) owns no parser; it gives the flag
types that resolve command-line paths against the current directory (``toollmm.core.paths.cli_*``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from toollmm.core.paths import cli_checkpoint, cli_config_file, cli_path

__all__ = [
    "Subcommands",
    "add_bind_args",
    "add_checkpoint_arg",
    "add_config_args",
    "add_media_root_arg",
    "add_output_dir_arg",
    "add_verbose_arg",
]

Configure = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

CHECKPOINT_HELP = "stage folder, released folder or Hub id"


def add_checkpoint_arg(p: argparse.ArgumentParser, *, hub: bool = True, help: str = CHECKPOINT_HELP) -> None:
    """``--checkpoint`` (required): a folder, or with ``hub`` also a Hub id when no such folder exists."""
    p.add_argument("--checkpoint", required=True, type=cli_checkpoint if hub else cli_path, help=help)


def add_bind_args(p: argparse.ArgumentParser, *, port: int) -> None:
    """``--host`` (this machine only unless given) and ``--port``."""
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=port, help=f"port (default {port})")


def add_output_dir_arg(p: argparse.ArgumentParser) -> None:
    """``--output-dir``: where the runtime writes media (and, by default, the tools' workspace)."""
    p.add_argument(
        "--output-dir",
        default=None,
        type=cli_path,
        help="media folder (default outputs/inference/<timestamp>/)",
    )


def add_media_root_arg(p: argparse.ArgumentParser, help: str) -> None:
    """``--media-root DIR`` (taken from the cwd): where relative media paths start or must stay inside."""
    p.add_argument("--media-root", default=None, type=cli_path, help=help)


def add_verbose_arg(p: argparse.ArgumentParser, help: str = "print the traceback of an error") -> None:
    """``--verbose`` (``toollmm.core.errors.cli_errors`` prints the traceback of an error with it)."""
    p.add_argument("--verbose", action="store_true", help=help)


def add_config_args(parser: argparse.ArgumentParser, example: str = "train.optim.lr=2e-4") -> None:
    """The flags every entry point shares; ``example``: an override that makes sense for this entry point."""
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        type=cli_config_file,
        help="extra YAML layer (repeatable, in order; the file is taken from the current directory, the"
        " relative paths inside it from the repo root)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config with each value's source and exit",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted overrides, e.g. {example}")


class Subcommands(dict[str, tuple[Configure, Run]]):
    """``name -> (configure, run)``: ``@table(name, configure)`` registers ``run(args) -> exit code`` as a
    subcommand whose arguments ``configure(parser)`` sets up; ``table.add_to(parser)`` builds them."""

    def __call__(self, name: str, configure: Configure) -> Callable[[Run], Run]:
        def deco(run: Run) -> Run:
            self[name] = (configure, run)
            return run

        return deco

    def add_to(self, parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
        """One subparser per entry (help: the first lines of ``run``'s docstring), each with ``--verbose``
        unless it defines its own; returns the subparsers action."""
        sub = parser.add_subparsers(dest="command", required=True)
        for name, (configure, run) in self.items():
            p = sub.add_parser(name, help=(run.__doc__ or "").strip() or None)
            configure(p)
            p.set_defaults(run=run)
            if "--verbose" not in p._option_string_actions:
                add_verbose_arg(p)
        return sub
