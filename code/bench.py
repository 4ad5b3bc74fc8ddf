"""Benchmarks: speed side by side and how close training comes to the machine's limit.

    python code/bench.py run [--quick] [--out outputs/bench]     # every figure, each in its own process
    python code/bench.py figure mfu --work outputs/bench/work     # one figure (what `run` spawns)
    python code/bench.py scaling [--bench outputs/bench/bench.json] [--out docs/scaling.md]

``bash scripts/bench.sh [--quick]`` is the usual entry (it runs ``run`` then ``scaling`` into the output
folder). See docs/benchmarks.md for what each figure measures and how.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from toollmm.core.paths import cli_path, repo_default, resolve


def _figure(args) -> int:
    from toollmm.perf import world as W

    sizes = W.SIZES[args.sizes]
    work = resolve(args.work)
    if args.name == "setup":
        w = W.World.ensure(work, sizes)
        for name in ("tools", "x2t_image", "x2t_audio", "x2t_video"):
            w.token_stats(name)
        result = w.describe()
    else:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
        result = _run_named(args.name, W.World(work, sizes), Path(args.out).parent)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    return 0


def _run_named(name: str, world, out_dir: Path) -> dict:
    from toollmm.perf import cache_fig, hf_baseline, infer_fig, serve_fig, train_figs

    if name == "mfu":
        return train_figs.mfu(world, profile_to=out_dir / "profile_mfu.txt" if world.sizes.profile else None)
    if name in ("mfu_stage1", "mfu_stage2"):
        prof = out_dir / f"profile_{name}.txt" if world.sizes.profile else None
        return train_figs.mfu_stage(world, int(name[-1]), profile_to=prof)
    if name == "ours":
        return train_figs.trainer_tokens(world)
    if name == "hf":
        return hf_baseline.hf_trainer_tokens(world)
    if name == "tokens":
        return train_figs.real_tokens(world)
    if name == "loader":
        return train_figs.loader_vs_trainer(world)
    if name == "inference":
        return infer_fig.inference(world)
    if name == "serve":
        return serve_fig.serving(world)
    if name.startswith("cache_"):
        return cache_fig.feature_cache(world, name.removeprefix("cache_"))
    raise SystemExit(f"bench.py figure: unknown figure {name!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="every figure -> bench.json + bench.md")
    r.add_argument("--quick", action="store_true", help="shrunk models and few steps (CI; under 3 minutes)")
    r.add_argument("--sizes", choices=["full", "quick", "vicuna7b"], help="explicit size set (GPU: vicuna7b)")
    r.add_argument(
        "--out",
        default=repo_default("outputs/bench"),
        type=cli_path,
        help="output folder (bench.json, bench.md, logs)",
    )
    r.add_argument(
        "--work", default=None, type=cli_path, help="workspace (default: <out>/work; reused between runs)"
    )
    r.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per process")
    f = sub.add_parser("figure", help="one figure (run by `run` in its own process)")
    f.add_argument("name")
    f.add_argument("--work", required=True, type=cli_path)
    f.add_argument("--sizes", default="full")
    f.add_argument("--out", required=True, type=cli_path)
    i = sub.add_parser("infer-once", help="load a stage folder and answer one request (cold process)")
    i.add_argument("--stage", required=True, type=cli_path)
    i.add_argument("--request", required=True)
    i.add_argument("--new-tokens", type=int, default=32)
    lv = sub.add_parser("levers", help="paired A/B of the stage-3 step's levers (toollmm.perf.levers)")
    lv.add_argument("--work", default=repo_default("outputs/bench/work"), type=cli_path)
    lv.add_argument("--sizes", default="full", choices=["full", "quick"])
    lv.add_argument("--variants", default="unfused,fused,fused_concat,shared")
    lv.add_argument("--rounds", type=int, default=3)
    s = sub.add_parser("scaling", help="docs/scaling.md from the configs and bench.json")
    s.add_argument("--bench", default=repo_default("outputs/bench/bench.json"), type=cli_path)
    s.add_argument("--out", default=repo_default("docs/scaling.md"), type=cli_path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.cmd == "run":
        from toollmm.perf import harness, report
        from toollmm.perf.world import SIZES

        sizes = SIZES[args.sizes or ("quick" if args.quick else "full")]
        out = resolve(args.out)
        bench, problems = harness.run(
            out, sizes, resolve(args.work) if args.work else out / "work", args.threads
        )
        print((out / "bench.md").read_text())
        if problems:
            print("bench: figures failed the check:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        n = len(report.required(bench))
        print(
            f"bench: {n} figures present, finite and positive ({bench['wall_s']:.0f} s) -> {out / 'bench.json'}"
        )
        return 0
    if args.cmd == "figure":
        return _figure(args)
    if args.cmd == "levers":
        import torch

        from toollmm.perf import world as W
        from toollmm.perf.levers import paired_levers

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
        world = W.World.ensure(resolve(args.work), W.SIZES[args.sizes])
        print(json.dumps(paired_levers(world, args.variants.split(","), args.rounds), indent=1))
        return 0
    if args.cmd == "infer-once":
        from toollmm.perf.infer_fig import infer_once

        print(json.dumps(infer_once(args.stage, args.request, args.new_tokens)))
        return 0
    from toollmm.perf.scaling import write_scaling

    path = write_scaling(resolve(args.bench), resolve(args.out))
    print(f"scaling projection -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
