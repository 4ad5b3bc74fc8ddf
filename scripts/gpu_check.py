"""Driver of scripts/gpu_check.sh: each section of toollmm.perf.gpu_check in its own process with its
own timeout, the JSON rewritten after every section (a hung or crashed section is recorded, the file is
always written), a short summary printed, and the JSON + log copied to $OUT when set.

    python scripts/gpu_check.py [--cpu] [--out DIR] [--budget SECONDS]
    python scripts/gpu_check.py --section NAME --work DIR --result FILE [--cpu]   # one section (internal)

Exit status: 0 when every kernel invariant (and the fused kernels' numerics, where they ran) holds and every
section ran; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "code"))

ORDER = ("env", "gemm", "invariants", "stage_1", "stage_3", "encoder", "stage_2", "fused_kernels")
TIMEOUT = {  # seconds per section: GPU, CPU
    "env": (60, 60),
    "gemm": (60, 30),
    "invariants": (120, 90),
    "stage_1": (210, 150),
    "stage_3": (150, 150),
    "encoder": (90, 90),
    "stage_2": (150, 150),
    "fused_kernels": (150, 60),  # GPU: numerics at a small shape + 2 x 4 Vicuna-7B steps, ~90-120 s
}

PRE_TIMEOUT = 300  # seconds for the op build before the sections (~20 s on 2 CPU cores; 0 once built)

CHILD: list = [None]  # the running section (its own process group), ended with the driver


def _stop(signum, frame):
    """SIGTERM / SIGINT: end the running section's whole process group, then exit (the JSON written so
    far stays)."""
    proc = CHILD[0]
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


def run_one(name: str, work: Path, cpu: bool, timeout: float, log) -> dict:
    result = work / f"section_{name}.json"
    partial = result.with_name(result.name + ".partial")
    result.unlink(missing_ok=True)
    partial.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--section", name, "--work", str(work), "--result", str(result)]
    cmd += ["--cpu"] if cpu else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOOLLMM_NO_TQDM": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    t0, started = time.perf_counter(), time.time()
    log.write(f"\n===== {name} (timeout {timeout:.0f} s)\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    CHILD[0] = proc
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # a JIT build killed half-way leaves its lock, and every later section would wait on it to its own
        # timeout: the killed group is gone, so the locks it took go with it
        from toollmm.core.paths import clear_build_locks

        cleared = [str(p) for p in clear_build_locks(since=started)]
        if cleared:
            log.write(f"===== {name}: removed the build locks it left: {cleared}\n")
        return {
            "ok": False,
            "error": f"timed out after {timeout:.0f} s",
            "wall_s": round(time.perf_counter() - t0, 1),
            **({"build_locks_removed": cleared} if cleared else {}),
            **_partial(partial),
        }
    wall = round(time.perf_counter() - t0, 1)
    if rc != 0 or not result.is_file():
        return {
            "ok": False,
            "error": f"exit status {rc} (see gpu_check.log)",
            "wall_s": wall,
            **_partial(partial),
        }
    return {"ok": True, "wall_s": wall, **json.loads(result.read_text())}


def _partial(path: Path) -> dict:
    """What a section that did not finish had recorded (e.g. the kernels checked before one hung)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def derived(report: dict) -> None:
    """MFU of each stage step against the measured GEMM rate; peak memory over the estimate."""
    gemm = report["sections"].get("gemm", {}).get("tflops")
    for name in ("stage_1", "stage_2", "stage_3"):
        s = report["sections"].get(name, {})
        if not s.get("ok"):
            continue
        s["mfu"] = s["model_tflop_per_s"] / gemm if gemm else None
        if s.get("peak_gib") is not None and s.get("memory_estimate_gib"):
            s["peak_over_estimate"] = s["peak_gib"] / s["memory_estimate_gib"]
    speed = report["sections"].get("fused_kernels", {}).get("speed")
    if speed:
        for variant in ("unfused", "off", "on"):
            if variant not in speed:
                continue
            speed[variant]["mfu"] = speed[variant]["model_tflop_per_s"] / gemm if gemm else None


def summary(report: dict) -> list[str]:
    lines = [f"gpu_check ({report['mode']}): {report['status']} in {report['wall_s']:.0f} s"]
    ops = report.get("ops")
    if ops is not None and not ops.get("ok"):
        lines.append(f"  ops        FAILED (the sections build them instead): {ops.get('error')}")
    elif ops is not None and ops.get("cpu_comm_op_s") is not None:
        lines.append(f"  ops        DeepSpeed's CPU all-reduce op ready in {ops['cpu_comm_op_s']:.0f} s")
    for name in ORDER:
        s = report["sections"].get(name)
        if s is None:
            continue
        if not s.get("ok"):
            lines.append(f"  {name:10s} FAILED: {s.get('error')}")
            continue
        if name == "gemm":
            lines.append(f"  gemm       {s['tflops']:.1f} TFLOP/s ({s['dtype']})")
        elif name == "invariants":
            for k in ("sdpa", "eager", "flash_attention_2", "flex_attention"):
                r = s.get(k, {})
                if "skipped" in r or "error" in r:
                    lines.append(f"  {k:18s} {r.get('skipped') or r.get('error')}")
                else:
                    cases = " ".join(f"{c}={'ok' if v.get('pass') else 'FAIL'}" for c, v in r.items())
                    lines.append(f"  {k:18s} {cases}")
        elif name.startswith("stage"):
            mfu = f"{s['mfu']:.2f}" if s.get("mfu") is not None else "-"
            lines.append(
                f"  {name}    {s['tokens_per_s']:.0f} real tok/s, MFU {mfu}, peak {s.get('peak_gib')} GiB "
                f"(estimate {s['memory_estimate_gib']} GiB), loss finite {s['loss_finite']}"
            )
        elif name == "encoder":
            rates = ", ".join(f"{m} {s[m]['media_per_s']}/s" for m in ("image", "audio", "video"))
            lines.append(f"  encoder    {s['preset']}: {rates}")
        elif name == "fused_kernels":
            if "skipped" in s:
                lines.append(f"  fused_kernels skipped: {s['skipped']}")
                continue
            num = s.get("numerics", {})
            lines.append(
                f"  fused_kernels numerics {'ok' if s.get('pass') else 'FAIL ' + str(num.get('failed'))} "
                f"(max rel on/off {num.get('max_rel_on_off', float('nan')):.2e}), liger-kernel {s['liger_kernel']}"
            )
            sp = s.get("speed")
            if sp:
                for v in [v for v in ("unfused", "off", "on") if v in sp]:
                    mfu = f"{sp[v]['mfu']:.2f}" if sp[v].get("mfu") is not None else "-"
                    lines.append(
                        f"    {v:7s} {sp[v]['tokens_per_s']:.0f} real tok/s, MFU {mfu}, peak {sp[v]['peak_gib']} GiB"
                    )
        elif name == "env":
            lines.append(
                f"  env        torch {s['versions']['torch']}, deepspeed {s['versions']['deepspeed']}"
            )
    return lines


def finish(report: dict) -> None:
    """``invariants_pass`` (the kernel invariants, and the fused kernels' numerics where they ran: a CPU run
    records that section as skipped), ``sections_ok`` and ``status``."""
    inv = report["sections"].get("invariants", {})
    fused = report["sections"].get("fused_kernels", {})
    invariants_ok = bool(inv.get("ok") and inv.get("pass")) and ("pass" not in fused or bool(fused["pass"]))
    sections_ok = all(s.get("ok") for s in report["sections"].values())
    report["invariants_pass"] = invariants_ok
    report["sections_ok"] = sections_ok
    report["status"] = "pass" if invariants_ok and sections_ok else "fail"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (fp32, gloo)")
    ap.add_argument("--out", default=str(REPO / "outputs" / "gpu_check"), help="where gpu_check.json goes")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all sections (GPU 440, CPU 600)")
    ap.add_argument("--only", default=None, help="comma-separated sections to run (default: all)")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.section:
        import logging

        from toollmm.perf.gpu_check import run_section

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

        run_section(args.section, Path(args.work), args.cpu, Path(args.result))
        return 0
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / ("work_cpu" if args.cpu else "work")
    work.mkdir(parents=True, exist_ok=True)
    budget = args.budget or (600 if args.cpu else 440)
    report = {"mode": "cpu" if args.cpu else "gpu", "status": "running", "sections": {}, "wall_s": 0.0}
    path, log_path = out / "gpu_check.json", out / "gpu_check.log"
    t0 = time.perf_counter()
    names = [n for n in ORDER if not args.only or n in args.only.split(",")]

    def write():
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        os.replace(tmp, path)

    with open(log_path, "w") as log:
        from toollmm.perf.gpu_check import prepare

        try:
            report["workspace"] = prepare(work)
        except Exception as e:
            report["workspace"] = {"error": f"{type(e).__name__}: {e}"}
        write()
        # DeepSpeed's JIT ops are built here, with time to spare, rather than inside a timed section
        report["ops"] = run_one("ops", work, args.cpu, PRE_TIMEOUT, log)
        write()
        for name in names:
            left = budget - (time.perf_counter() - t0)
            if left < 10:
                report["sections"][name] = {"ok": False, "error": "skipped: the time budget is spent"}
            else:
                timeout = min(TIMEOUT[name][1 if args.cpu else 0], left)
                report["sections"][name] = run_one(name, work, args.cpu, timeout, log)
            derived(report)
            write()
    finish(report)
    write()
    print("\n".join(summary(report)))
    print(f"-> {path} (log {log_path})")
    dest = os.environ.get("OUT")
    if dest and Path(dest).is_dir():
        for f in (path, log_path):
            shutil.copy(f, Path(dest) / f.name)
    return 0 if report["status"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
