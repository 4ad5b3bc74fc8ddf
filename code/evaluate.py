"""Tool-use benchmarks: score predictions, or generate them with a checkpoint and score.

    python code/evaluate.py score --benchmark gpt4tools \\
        --references gpt4tools_val_seen.json gpt4tools_test_unseen.json \\
        --predictions val_preds.json test_preds.json [--json] [--compat] [--strict]
    python code/evaluate.py run --benchmark mllm-tool --checkpoint outputs/run/stage_3 \\
        --data combined_data.json --media-root /data/mllm-tool [--limit N] [--mode teacher-forced|free]
    python code/evaluate.py benchmarks          # the benchmarks and their metrics
    python code/evaluate.py demo --checkpoint outputs/demo/stage_1 [--tasks x2t,t2x,tools]   # demo held-out
    python code/evaluate.py demo-report --run outputs/demo      # the demo's metrics.json + summary table

References are the benchmarks' own files (read through ``toollmm.data.convert``) or our unified JSONL of
them; predictions are the anchors' output files or the inference ``--batch`` JSONL. ``run`` writes
``<checkpoint>/eval/<benchmark>.json`` and ``<benchmark>.predictions.jsonl``. ``--output DIR`` means the
same in every subcommand: the folder the results go to (``score``: ``DIR/<benchmark>.json``; ``run``: the
results, predictions and media; ``demo``: ``DIR/demo.json``).
A reference that gets no prediction (``run``: its request could not run, e.g. media not found; ``score``:
no prediction matches it) fails the command (exit 1, listing them) unless ``--allow-missing``: then it is
excluded from every metric and reported with its reason. Paths typed here are taken from the current
directory.
Each subcommand is a small function that parses its arguments and calls ``toollmm.eval``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from _cli import Subcommands, add_checkpoint_arg, add_media_root_arg
from toollmm.core.errors import UserError, cli_errors
from toollmm.core.paths import cli_path, repo_default
from toollmm.eval import (
    BENCHMARKS,
    MODES,
    EvalError,
    Generator,
    MissingError,
    ScoreOptions,
    format_results,
    run_benchmark,
    score_files,
)

#: ``evaluate.py <name>``: ``@subcommand(name, configure)`` on ``run(args) -> exit code``
subcommand = Subcommands()

#: ``(checkpoint, benchmark) -> Generator``; tests and tools may replace it (see ``main``)
GeneratorFactory = Callable[[str, str], Generator]


def load_generator(checkpoint: str, benchmark: str, output_dir: str | Path | None = None) -> Generator:
    """The model's ``generate(prompts) -> outputs`` for ``evaluate.py run`` (see toollmm.eval.run).

    Connects ``toollmm.load(checkpoint)`` (media and tool files go to ``output_dir``): the runtime's
    ``eval_generator(benchmark)`` returns that callable (ReAct text for gpt4tools / viot checkpoints trained
    in ReAct form, tool-call tokens otherwise; stopping at the first call, not run, when a prompt asks
    ``stop_at_tool_call``)."""
    import toollmm

    try:
        model = toollmm.load(checkpoint, output_dir=output_dir)
    except (ImportError, AttributeError) as e:
        raise EvalError(
            f"evaluate.py run needs the inference layer (toollmm.load), which this build lacks: {e}"
        ) from e
    except (OSError, ValueError) as e:
        raise EvalError(f"--checkpoint {checkpoint}: cannot load: {e}") from e
    if not hasattr(model, "eval_generator"):
        raise EvalError(f"{checkpoint}: the loaded model has no eval_generator(benchmark)")
    return model.eval_generator(benchmark)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS), help="which benchmark")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument(
        "--compat",
        action="store_true",
        help="skip references without a prediction (the published GPT4Tools script) instead of failing them",
    )
    p.add_argument(
        "--strict", action="store_true", help="gpt4tools: image-path arguments must match exactly (the paper)"
    )
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="score the references that got a prediction and report the others (count, reasons), excluded"
        " from every denominator; without it such references fail the command (exit 1)",
    )


def _opts(args: argparse.Namespace) -> ScoreOptions:
    return ScoreOptions(compat=args.compat, strict=args.strict, allow_missing=args.allow_missing)


def _configure_score(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument(
        "--references", required=True, nargs="+", type=cli_path, help="the benchmark's reference file(s)"
    )
    p.add_argument(
        "--predictions",
        required=True,
        nargs="+",
        type=cli_path,
        help="one predictions file, or one per references file",
    )
    p.add_argument(
        "--output", default=None, type=cli_path, metavar="DIR", help="also write DIR/<benchmark>.json"
    )


def _print(result: dict, as_json: bool) -> None:
    print(json.dumps(result, indent=2, ensure_ascii=False) if as_json else format_results(result))


@subcommand("score", _configure_score)
def run_score(args: argparse.Namespace) -> int:
    """Score an existing predictions file against the benchmark's references."""
    result = score_files(args.benchmark, args.references, args.predictions, _opts(args))
    if args.output:
        out = Path(args.output) / f"{args.benchmark}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _print(result, args.json)
    return 0


def _configure_run(p: argparse.ArgumentParser) -> None:
    _common(p)
    add_checkpoint_arg(p)
    p.add_argument(
        "--data", required=True, nargs="+", type=cli_path, help="the benchmark's reference file(s)"
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="teacher-forced",
        help="feed back reference observations, or run free",
    )
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    add_media_root_arg(
        p, "folder that relative media paths in --data are taken from (default: each --data file's folder)"
    )
    p.add_argument(
        "--output",
        default=None,
        type=cli_path,
        metavar="DIR",
        help="results folder: DIR/<benchmark>.json, .predictions.jsonl, media/ (default: <checkpoint>/eval)",
    )


def results_dir(args: argparse.Namespace) -> Path:
    if args.output is None and not Path(args.checkpoint).is_dir():
        raise EvalError(
            f"--checkpoint {args.checkpoint} is not a local folder: give --output for the results"
        )
    return Path(args.output) if args.output else Path(args.checkpoint) / "eval"


@subcommand("run", _configure_run)
def run_run(args: argparse.Namespace) -> int:
    """Generate with a checkpoint, score, and write <checkpoint>/eval/<benchmark>.json."""
    if args.limit is not None and args.limit < 1:
        raise EvalError(f"--limit must be >= 1, got {args.limit}")
    out = results_dir(args)
    generate = args.generator_factory(args.checkpoint, args.benchmark)
    result = run_benchmark(
        args.benchmark,
        args.data,
        generate,
        out,
        args.limit,
        args.mode,
        args.batch_size,
        _opts(args),
        media_root=args.media_root,
    )
    _print(result, args.json)
    return 0


def _configure_demo(p: argparse.ArgumentParser) -> None:
    from toollmm.demo.eval import TASKS

    add_checkpoint_arg(p, hub=False, help="a demo stage folder, e.g. outputs/demo/stage_1")
    p.add_argument(
        "--data",
        default=repo_default("data/demo"),
        type=cli_path,
        help="the demo corpus (python code/prepare_data.py demo; default: the repo's data/demo)",
    )
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--limit", type=int, default=None, help="only the first N held-out records per file")
    p.add_argument(
        "--output",
        default=None,
        type=cli_path,
        metavar="DIR",
        help="results folder: DIR/demo.json (default: <checkpoint>/eval)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes: with 2, the tool calls are scored in a second process while the other tasks run "
        "(each loads the checkpoint; demo.sh uses 2 on a host with >= 2 cores)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")


@subcommand("demo", _configure_demo)
def run_demo(args: argparse.Namespace) -> int:
    """Held-out metrics of a demo stage folder (captions, signal alignment, tool calls)."""
    from toollmm.core.paths import resolve
    from toollmm.demo.eval import evaluate_stage, headline

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    result = evaluate_stage(args.checkpoint, args.data, tasks, limit=args.limit, workers=args.workers)
    out = (resolve(args.output) if args.output else resolve(args.checkpoint) / "eval") / "demo.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(result, indent=1, ensure_ascii=False))
    else:
        for task in tasks:
            print(f"[demo-eval] {task}: {json.dumps(headline(result[task]))}")
        print(f"[demo-eval] results: {out}")
    return 0


def _configure_demo_report(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run",
        dest="run_dir",
        default=repo_default("outputs/demo"),
        type=cli_path,
        help="the demo run folder (holds stage_0..stage_3; default: the repo's outputs/demo)",
    )
    p.add_argument("--small", action="store_true", help="record that the corpus was --small")
    p.add_argument("--total-wall-s", type=float, default=None, help="the whole demo's wall time")


@subcommand("demo-report", _configure_demo_report)
def run_demo_report(args: argparse.Namespace) -> int:
    """Write <run>/metrics.json from the demo's stage folders and print the summary table."""
    from toollmm.core.paths import resolve
    from toollmm.demo.report import format_table, write_metrics

    path = write_metrics(resolve(args.run_dir), args.small, args.total_wall_s)
    print(format_table(json.loads(path.read_text(encoding="utf-8"))))
    print(f"metrics: {path}")
    return 0


def _configure_demo_probe(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", type=cli_path, default=repo_default("data/demo"), help="demo corpus folder")
    p.add_argument("--modalities", nargs="+", default=["image", "audio", "video"])
    p.add_argument("--out-dim", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="at most this many renders per split")


@subcommand("demo-probe", _configure_demo_probe)
def run_demo_probe(args: argparse.Namespace) -> int:
    """Linear probe: can a frozen, random tiny ImageBind see the demo corpus's attributes?"""
    from toollmm.demo.probe import probe_corpus

    res = probe_corpus(
        str(args.corpus), args.modalities, args.limit, out_dim=args.out_dim, width=args.width,
        blocks=args.blocks, seed=args.seed,
    )  # fmt: skip
    print(json.dumps(res, indent=1))
    return 0


@subcommand("benchmarks", lambda p: None)
def run_benchmarks(args: argparse.Namespace) -> int:
    """List the benchmarks and their metrics."""
    for name, spec in sorted(BENCHMARKS.items()):
        print(
            f"{name:10s} {spec.doc}\n{'':10s} reads --format {spec.fmt} references; keys {', '.join(spec.columns)}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    subcommand.add_to(parser)
    return parser


@cli_errors("evaluate.py")
def main(argv: list[str] | None = None, *, generator_factory: GeneratorFactory | None = None) -> int:
    """``generator_factory`` replaces :func:`load_generator` for ``run`` (a scripted model in tests)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.generator_factory = generator_factory or (
        lambda checkpoint, benchmark: load_generator(checkpoint, benchmark, results_dir(args) / "media")
    )
    try:
        return args.run(args)  # other user errors (EvalError ...): one line, exit 2 (cli_errors)
    except MissingError as e:  # references not run / not predicted: exit 1 with the list
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
