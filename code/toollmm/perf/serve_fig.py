"""Serving figure: requests/s and latency of ``code/serve.py`` with 8 concurrent clients vs one at a time.

The server runs as its own process (``python code/serve.py``, the command users run) on a free localhost
port; this process is the clients (plain HTTP, ``httpx``). The same 8 chat requests (held-out demo
instructions, greedy, the same ``max_tokens``) are sent (a) one at a time, ``rounds`` times over, and (b) by 8
client threads at once, each sending its request ``rounds`` times back to back (closed loop). Requests/s =
requests / wall time; latency percentiles are per request. ``mean_batch_size``: rows per decode step
(continuous batching), or per generate call (static batches). ``SERVE_FIG_ARGS`` (environment) adds
``key=value`` overrides to the server's command line (e.g. ``serve.continuous=false`` to measure static
batches). The checkpoint is the demo's
(``outputs/demo/stage_3``) in the full run when it exists, else the bench's own stage folder (recorded).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from toollmm.core.paths import DATA_DIR, OUTPUTS_DIR, REPO_ROOT
from toollmm.perf.world import World

CLIENTS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _heldout(world: World) -> Path:
    """The held-out split the prompts come from: the workspace's corpus, else the repo's demo corpus
    (``data/demo``, what the demo checkpoint trained on), else the workspace's corpus built now."""
    for folder in (world.demo, DATA_DIR / "demo"):
        if (folder / "heldout" / "instruct.jsonl").is_file():
            return folder / "heldout"
    return World.ensure(world.work, world.sizes).demo / "heldout"


def _prompts(world: World, n: int) -> list[str]:
    out = []
    heldout = _heldout(world)
    for name in ("instruct", "tools"):
        with open(heldout / f"{name}.jsonl", encoding="utf-8") as f:
            for rec in map(json.loads, f):
                text = rec["messages"][0]["content"]
                if not rec.get("images") and not rec.get("videos") and not rec.get("audios"):
                    out.append(text)
                if len(out) >= n:
                    return out
    while len(out) < n:
        out.append(f"Tell me about request {len(out)}.")
    return out


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def serving(world: World) -> dict:
    import httpx

    from toollmm.perf.infer_fig import prepare

    demo = OUTPUTS_DIR / "demo" / "stage_3"
    if world.sizes.name != "quick" and (demo / "stage.json").is_file():
        stage = demo
    else:
        stage = prepare(world)[0]
    new_tokens = max(16, world.sizes.new_tokens)
    rounds = 4 if world.sizes.name == "quick" else 6
    world.work.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    out_dir = world.work / "serve_out"
    cmd = [sys.executable, str(REPO_ROOT / "code" / "serve.py"), "--checkpoint", str(stage)]
    cmd += ["--port", str(port), "--output-dir", str(out_dir), "--model-name", "bench"]
    cmd += [f"inference.max_new_tokens={new_tokens}", "inference.temperature=0.0"]
    cmd += [f"serve.max_batch_size={CLIENTS}", *os.environ.get("SERVE_FIG_ARGS", "").split()]
    log_path = world.work / "serve_fig_server.log"
    # The server's compute on one thread (as scripts/demo.sh runs the tiny demo model): the clients of this
    # figure and the server's HTTP loop share the machine's cores, and on 2 cores two intra-op threads
    # made both the sequential and the concurrent side slower and the batch's step ~4x a single row's
    # (2.0x vs 3.9x speedup, measured). SERVE_FIG_THREADS overrides it.
    server_threads = os.environ.get("SERVE_FIG_THREADS", "1")
    env = {**os.environ, "OMP_NUM_THREADS": server_threads, "MKL_NUM_THREADS": server_threads}
    with open(log_path, "w", encoding="utf-8") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=600) as c:
            for _ in range(1200):
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited:\n{log_path.read_text()[-3000:]}")
                try:
                    if c.get(base + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
        prompts = _prompts(world, CLIENTS)
        errors: list[str] = []
        tokens: list[int] = []

        def ask(client, text: str) -> float:
            body = {"model": "bench", "messages": [{"role": "user", "content": text}], "temperature": 0}
            t0 = time.perf_counter()
            r = client.post(base + "/v1/chat/completions", json=body)
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                errors.append(f"{r.status_code}: {r.text[:200]}")
            else:
                tokens.append(r.json()["usage"]["completion_tokens"])
            return dt

        with httpx.Client(timeout=600) as c:
            for p in prompts[:2]:  # warm-up
                ask(c, p)
            t0 = time.perf_counter()
            seq = [ask(c, p) for _ in range(rounds) for p in prompts]
            seq_wall = time.perf_counter() - t0
        conc: list[float] = []
        lock = threading.Lock()

        def client_loop(text: str) -> None:
            with httpx.Client(timeout=600) as c:
                for _ in range(rounds):
                    dt = ask(c, text)
                    with lock:
                        conc.append(dt)

        threads = [threading.Thread(target=client_loop, args=(p,)) for p in prompts]
        with httpx.Client(timeout=60) as c:
            h0 = c.get(base + "/health").json()
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conc_wall = time.perf_counter() - t0
        with httpx.Client(timeout=60) as c:
            h1 = c.get(base + "/health").json()
        if h1.get("steps", 0) > h0.get("steps", 0):  # continuous batching: mean rows per decode step
            mean_batch = (h1["step_rows"] - h0["step_rows"]) / (h1["steps"] - h0["steps"])
        else:  # static batches: mean rows per generate call
            mean_batch = (h1["rows"] - h0["rows"]) / max(1, h1["batches"] - h0["batches"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    seq_rps = len(seq) / seq_wall
    conc_rps = len(conc) / conc_wall
    return {
        "speedup": conc_rps / seq_rps,
        "concurrent_rps": conc_rps,
        "sequential_rps": seq_rps,
        "concurrent_p50_s": _pct(conc, 0.5),
        "concurrent_p95_s": _pct(conc, 0.95),
        "sequential_p50_s": _pct(seq, 0.5),
        "sequential_p95_s": _pct(seq, 0.95),
        "errors": len(errors),
        "error_samples": errors[:3],
        "requests": len(seq) + len(conc),
        "clients": CLIENTS,
        "mean_batch_size": mean_batch,
        "max_new_tokens": new_tokens,
        "mean_completion_tokens": statistics.mean(tokens) if tokens else 0.0,
        "checkpoint": str(Path(stage)),
        "server_args": os.environ.get("SERVE_FIG_ARGS", ""),
        "server_threads": int(server_threads),
    }
