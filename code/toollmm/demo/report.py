"""The demo's ``metrics.json`` and summary table, assembled from a run folder.

Reads ``<run>/stage_N/stage.json`` (wall time), ``<run>/stage_N/metrics.jsonl`` (real tokens/s per
logged window) and ``<run>/stage_N/eval/demo.json`` (``toollmm.demo.eval``), and writes::

    {"stage1": {"heldout": {<modality>: {exact, chance, per_attribute: {<attr>: {acc, chance}}}}, wall_s, ...},
     "stage2": {"heldout_align_l2": {initial, final, mean_predictor}, "heldout_retrieval_top1", wall_s, ...},
     "stage3": {"heldout_tool_name_accuracy", "heldout_tool_call_exact", "heldout_multiturn": {turn_accuracy,
                single_turn_accuracy, ratio, ...}, wall_s, ...},
     "chat": {"turns": [{user, images, output}]}   (demo.sh's 3-turn chat, <run>/chat.json, when present)
     "stage0": {...}, "targets": {...}, "total_wall_s", "small"}

``initial`` is stage 2's metric on stage 1's folder (stage 2's starting point), ``final`` on stage 2's.
``targets`` checks the demo's learning targets and says which are met.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

EXACT_X_CHANCE = 5.0  # stage 1: exact caption >= 5x chance, per modality
ATTR_X_CHANCE = 1.5  # ... and at least two attributes >= 1.5x their chance
L2_FRACTION = 0.5  # stage 2: final L2 <= half the mean predictor's
RETRIEVAL_MIN = 0.8
TOOL_NAME_MIN = 0.95  # stage 3
TOOL_EXACT_MIN = 0.9
MULTITURN_RATIO_MIN = 0.9  # every turn of a held-out chat, against the same turns sent alone


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def stage_timing(stage_dir: Path) -> dict:
    """``wall_s`` (stage.json) and mean real tokens/s over the logged windows (metrics.jsonl)."""
    manifest = _read_json(stage_dir / "stage.json") or {}
    rates, lm = [], None
    log_file = stage_dir / "metrics.jsonl"
    if log_file.is_file():
        for line in log_file.read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else {}
            if "tok_s" in row:
                rates.append(float(row["tok_s"]))
                lm = row.get("lm", lm)
    out = {
        "wall_s": manifest.get("wall_s"),
        "real_tokens_per_s": round(sum(rates) / len(rates), 1) if rates else None,
        "steps": manifest.get("steps"),
        "final_train_lm_loss": lm,
    }
    val = manifest.get("val") or {}
    if val:
        out["heldout_loss"] = {k: v for k, v in val.items() if k == "lm" or k.startswith("align_")}
    return out


def _eval(run: Path, stage: int) -> dict:
    return _read_json(run / f"stage_{stage}" / "eval" / "demo.json") or {}


def build_metrics(run_dir: str | Path, small: bool, total_wall_s: float | None = None) -> dict:
    run = Path(run_dir)
    ev = {n: _eval(run, n) for n in range(4)}
    out: dict = {"stage0": stage_timing(run / "stage_0")}
    s1 = {"heldout": _drop_examples(ev[1].get("x2t"))}
    out["stage1"] = s1 | stage_timing(run / "stage_1")
    t_init, t_final = ev[1].get("t2x") or {}, ev[2].get("t2x") or {}
    out["stage2"] = {
        "heldout_align_l2": {
            "initial": t_init.get("l2"),
            "final": t_final.get("l2"),
            "mean_predictor": t_final.get("mean_predictor", t_init.get("mean_predictor")),
        },
        "heldout_retrieval_top1": t_final.get("retrieval_top1"),
        "heldout_retrieval_top1_initial": t_init.get("retrieval_top1"),
        "per_modality": t_final.get("per_modality"),
    } | stage_timing(run / "stage_2")
    tools = ev[3].get("tools") or {}
    out["stage3"] = {
        "heldout_tool_name_accuracy": tools.get("tool_name_accuracy"),
        "heldout_tool_call_exact": tools.get("tool_call_exact"),
        "per_tool_exact": tools.get("per_tool_exact"),
    } | stage_timing(run / "stage_3")
    mt = ev[3].get("multiturn")
    if mt:
        out["stage3"]["heldout_multiturn"] = {k: v for k, v in mt.items() if k != "misses"}
    if ev[3].get("x2t"):
        out["stage3"]["after_stage3"] = {"x2t": _drop_examples(ev[3]["x2t"])}
    if ev[3].get("t2x"):
        t3 = ev[3]["t2x"]
        out["stage3"].setdefault("after_stage3", {})["t2x"] = {
            k: t3.get(k) for k in ("l2", "mean_predictor", "retrieval_top1")
        }
    chat = _read_json(run / "chat.json")
    if chat:
        out["chat"] = chat
    out["targets"] = check_targets(out)
    out["total_wall_s"] = round(total_wall_s, 1) if total_wall_s is not None else None
    out["small"] = bool(small)
    return out


def _drop_examples(x2t: dict | None) -> dict | None:
    if not x2t:
        return x2t
    return {m: {k: v for k, v in d.items() if k != "examples"} for m, d in x2t.items()}


def check_targets(metrics: dict) -> dict:
    """Each learning target of the demo: ``{value, target, met}`` (``met`` None when not evaluated)."""
    out: dict = {}
    for m, d in (metrics["stage1"].get("heldout") or {}).items():
        out[f"stage1.{m}.exact"] = _target(d["exact"], EXACT_X_CHANCE * d["chance"], ">=")
        good = [a for a, v in d["per_attribute"].items() if v["acc"] >= ATTR_X_CHANCE * v["chance"]]
        out[f"stage1.{m}.attributes_over_1.5x_chance"] = _target(len(good), 2, ">=")
    s2 = metrics["stage2"]
    l2 = s2["heldout_align_l2"]
    mp = l2.get("mean_predictor")
    out["stage2.final_l2"] = _target(l2.get("final"), None if mp is None else L2_FRACTION * mp, "<=")
    out["stage2.retrieval_top1"] = _target(s2.get("heldout_retrieval_top1"), RETRIEVAL_MIN, ">=")
    s3 = metrics["stage3"]
    out["stage3.tool_name_accuracy"] = _target(s3.get("heldout_tool_name_accuracy"), TOOL_NAME_MIN, ">=")
    out["stage3.tool_call_exact"] = _target(s3.get("heldout_tool_call_exact"), TOOL_EXACT_MIN, ">=")
    mt = s3.get("heldout_multiturn") or {}
    out["stage3.multiturn_ratio"] = _target(mt.get("ratio"), MULTITURN_RATIO_MIN, ">=")
    return out


def _target(value, threshold, op: str) -> dict:
    if value is None or threshold is None:
        return {"value": value, "target": f"{op} {threshold}", "met": None}
    met = value >= threshold if op == ">=" else value <= threshold
    return {"value": value, "target": f"{op} {round(threshold, 4)}", "met": bool(met)}


def _f(x, nd: int = 3) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def format_table(metrics: dict) -> str:
    """The summary the demo prints: one line per held-out result, with its chance level and target."""
    t = metrics["targets"]
    rows = [("stage", "held-out metric", "value", "chance / baseline", "target", "met")]

    def met(key):
        m = t.get(key, {}).get("met")
        return "-" if m is None else ("yes" if m else "NO")

    for m, d in (metrics["stage1"].get("heldout") or {}).items():
        k = f"stage1.{m}.exact"
        rows.append(("1", f"{m} caption exact", _f(d["exact"]), _f(d["chance"]), t[k]["target"], met(k)))
        for a, v in d["per_attribute"].items():
            rows.append(("1", f"{m} {a} accuracy", _f(v["acc"]), _f(v["chance"]), "", ""))
    s2 = metrics["stage2"]
    l2 = s2["heldout_align_l2"]
    rows.append(("2", "align L2 initial -> final", f"{_f(l2['initial'])} -> {_f(l2['final'])}",
                 f"mean predictor {_f(l2['mean_predictor'])}", t["stage2.final_l2"]["target"],
                 met("stage2.final_l2")))  # fmt: skip
    rows.append(("2", "caption retrieval top-1", _f(s2["heldout_retrieval_top1"]),
                 f"initial {_f(s2.get('heldout_retrieval_top1_initial'))}",
                 t["stage2.retrieval_top1"]["target"], met("stage2.retrieval_top1")))  # fmt: skip
    s3 = metrics["stage3"]
    rows.append(("3", "tool name accuracy", _f(s3["heldout_tool_name_accuracy"]), "",
                 t["stage3.tool_name_accuracy"]["target"], met("stage3.tool_name_accuracy")))  # fmt: skip
    rows.append(("3", "tool call exact (canonical JSON)", _f(s3["heldout_tool_call_exact"]), "",
                 t["stage3.tool_call_exact"]["target"], met("stage3.tool_call_exact")))  # fmt: skip
    mt = s3.get("heldout_multiturn") or {}
    rows.append(("3", "multi-turn chats: every turn / same turns alone",
                 f"{_f(mt.get('turn_accuracy'))} / {_f(mt.get('single_turn_accuracy'))} = {_f(mt.get('ratio'))}",
                 "", t["stage3.multiturn_ratio"]["target"], met("stage3.multiturn_ratio")))  # fmt: skip
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    times = ", ".join(
        f"stage {n}: {_f(metrics[f'stage{n}'].get('wall_s'), 1)} s "
        f"({_f(metrics[f'stage{n}'].get('real_tokens_per_s'), 0)} tok/s)"
        for n in range(4)
    )
    lines.append(f"training wall time: {times}; whole demo: {_f(metrics.get('total_wall_s'), 1)} s")
    lines += chat_lines(metrics.get("chat"))
    return "\n".join(lines)


def chat_lines(chat: dict | None) -> list[str]:
    """demo.sh's 3-turn chat, one line per user turn and one per answer (tool calls and media named)."""
    if not chat:
        return []
    lines = ["3-turn chat (code/inference.py --chat):"]
    for t in chat.get("turns", []):
        o = t.get("output") or {}
        image = f"  [image {t['images'][0]}]" if t.get("images") else ""
        calls = "".join(f"  [{c['name']}({json.dumps(c['arguments'])}) -> {c['result']}]"
                        for c in o.get("tool_calls", []))  # fmt: skip
        media = "".join(f"  [{m['modality']}: {m['path']}]" for m in o.get("media", []))
        errors = f"  errors: {o['errors']}" if o.get("errors") else ""
        lines += [f"  user: {t.get('user')}{image}", f"  model: {o.get('text')!r}{calls}{media}{errors}"]
    return lines


def write_metrics(run_dir: str | Path, small: bool, total_wall_s: float | None = None) -> Path:
    """Write ``<run>/metrics.json`` and return its path."""
    metrics = build_metrics(run_dir, small, total_wall_s)
    path = Path(run_dir) / "metrics.json"
    path.write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    log.info("wrote %s", path)
    return path
