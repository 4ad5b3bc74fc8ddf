"""Train one stage of toollmm: the same recipe for every stage; what differs lives in config/stage_N.yaml.

    python code/train.py --stage 1                       # usually through: bash scripts/train.sh --stage 1
    python code/train.py --stage 3 --config config/demo.yaml run.name=demo train.max_steps=50
    python code/train.py --stage 2 --resume              # continue from outputs/<run>/stage_2/ckpt/latest
    python code/train.py --stage 1 --print-config        # the resolved config, each value with its source

Writes outputs/<run.name>/stage_N/ (loadable, cumulative over stages; metrics.jsonl, loss.png, ranks.json)
and stage_N/ckpt/ (resume state). ``--resume`` without a checkpoint yet starts the stage from step 0 (so a
restarted job can always pass it); without ``--resume`` an existing checkpoint is replaced (a warning says
so). A second run on a stage folder that a run is writing is refused at once (exit 2, naming the
holder). Stage 0 is the LM pretraining of a stand-in model (the demo); stages 1-3 are the system's.
``main(argv)`` runs in-process (tests, notebooks: the process group is kept for the next stage);
run as a script, the process group is destroyed before the interpreter exits.
"""

from __future__ import annotations

import argparse
import os
import sys

from _cli import add_config_args, add_verbose_arg
from toollmm.core.config import load_config
from toollmm.core.errors import cli_errors


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, required=True, choices=[0, 1, 2, 3], help="stage to train")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the stage's newest resume checkpoint (none yet: start from step 0)",
    )
    add_verbose_arg(parser)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    add_config_args(parser)
    return parser.parse_args(argv)


@cli_errors("train.py")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loaded = load_config(stage=args.stage, config_files=args.config, overrides=args.overrides)
    if args.print_config:
        print(loaded.describe())
        return 0
    announce(loaded.config)
    from toollmm.checkpoint.stage import BaseMismatchError
    from toollmm.core.console import quiet_library_progress
    from toollmm.train.lock import StageLockedError
    from toollmm.train.loop import run_stage

    quiet_library_progress()  # our own bar and lines say what happens; theirs would break them up
    try:
        run_stage(loaded, resume=args.resume)
    except (StageLockedError, BaseMismatchError) as e:  # folder held by another run / other bases
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    return 0


def announce(cfg) -> None:
    """The first line, at once (before torch and DeepSpeed load, which takes a while): what runs, where."""
    if os.environ.get("RANK", "0") != "0":
        return
    from toollmm.core.paths import resolve

    out = resolve(cfg.run.output_root) / cfg.run.name / f"stage_{cfg.run.stage}"
    print(
        f"train.py: stage {cfg.run.stage} of run {cfg.run.name!r} -> {out}; loading torch and DeepSpeed, "
        "then the models, the data and the caches",
        file=sys.stderr,
        flush=True,
    )


def cli() -> int:
    """``main`` for a process of its own: the process group is destroyed before the interpreter exits."""
    ok = False
    try:
        code = main()
        ok = code == 0  # a user error on one rank (exit 2) must not wait for the others at a barrier
        return code
    finally:
        if "torch" in sys.modules:
            from toollmm.train.ds import shutdown_distributed

            shutdown_distributed(barrier=ok)


if __name__ == "__main__":
    sys.exit(cli())
