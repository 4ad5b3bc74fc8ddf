"""The evaluation results of a stage folder as Markdown tables (the release card's Evaluation section).

``eval_tables(stage_dir)`` renders each ``<stage>/eval/<benchmark>.json`` written by ``code/evaluate.py run`` /
``score`` with its benchmark's columns, and ``eval/demo.json`` (``code/evaluate.py demo``) as the held-out
table. ``code/release.py`` passes the result to ``toollmm.release``, which knows no benchmark.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .common import BENCHMARKS

log = logging.getLogger(__name__)


def _pct(v) -> str:
    return f"{100 * float(v):.1f}" if isinstance(v, (int, float)) else "-"


def demo_table(result: dict) -> str:
    """The held-out metrics of ``evaluate.py demo`` (``eval/demo.json``) as a Markdown table."""
    rows = ["| task | metric | value | chance / baseline | n |", "|---|---|---:|---:|---:|"]
    tools = result.get("tools") or {}
    if tools:
        n = tools.get("n", "-")
        rows.append(f"| tools | tool name accuracy (%) | {_pct(tools.get('tool_name_accuracy'))} | | {n} |")
        rows.append(f"| tools | tool call exact (%) | {_pct(tools.get('tool_call_exact'))} | | {n} |")
        for name, v in sorted((tools.get("per_tool_exact") or {}).items()):
            rows.append(f"| tools | {name}: call exact (%) | {_pct(v)} | | |")
    for modality, r in (result.get("x2t") or {}).items():
        if not isinstance(r, dict) or "exact" not in r:
            continue
        n = r.get("n", "-")
        rows.append(
            f"| {modality} -> text | caption exact (%) | {_pct(r['exact'])} | {_pct(r.get('chance'))} | {n} |"
        )
        for attr, a in (r.get("per_attribute") or {}).items():
            rows.append(
                f"| {modality} -> text | {attr} (%) | {_pct(a.get('acc'))} | {_pct(a.get('chance'))} | {n} |"
            )
    t2x = result.get("t2x") or {}
    for modality, r in (t2x.get("per_modality") or {}).items():
        n = r.get("n", "-")
        l2, mean = r.get("l2"), r.get("mean_predictor")
        if isinstance(l2, (int, float)):
            base = f"{mean:.3f} (mean predictor)" if isinstance(mean, (int, float)) else "-"
            rows.append(f"| text -> {modality} | signal alignment L2 | {l2:.3f} | {base} | {n} |")
        rows.append(
            f"| text -> {modality} | caption retrieval top-1 (%) | {_pct(r.get('retrieval_top1'))} "
            f"| {_pct(r.get('retrieval_chance'))} | {n} |"
        )
    return "\n".join(rows)


def eval_tables(stage_dir: str | Path) -> list[str]:
    """One Markdown table per ``eval/<benchmark>.json`` written by ``code/evaluate.py run`` / ``score``,
    and the held-out table of ``eval/demo.json`` (``code/evaluate.py demo``)."""
    tables = []
    for f in sorted((Path(stage_dir) / "eval").glob("*.json")):
        try:
            result = json.loads(f.read_text(encoding="utf-8"))
            if f.name == "demo.json" and "benchmark" not in result:
                tables.append(
                    f"**demo held-out split** (`code/evaluate.py demo` on stage {result.get('stage')}: "
                    "greedy generation on records unseen in training)\n\n" + demo_table(result)
                )
                continue
            spec = BENCHMARKS[result["benchmark"]]
            if result.get("metrics") is None:
                log.warning("%s: a run that computed no metrics (requests not run), left out of the card", f)
                continue
            rows = spec.rows(result["metrics"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("%s: not an evaluate.py result, left out of the card (%s)", f, e)
            continue
        head = ["| |", *(f" {c} |" for c in spec.columns)]
        lines = ["".join(head), "|---|" + "---:|" * len(spec.columns)]
        for name, metrics in rows:
            cells = []
            for c in spec.columns:
                v = metrics.get(c)
                if v is None:
                    cells.append("-")
                elif c == "n" or (isinstance(v, int) and not isinstance(v, bool)):
                    cells.append(str(v))
                else:
                    cells.append(f"{100 * float(v):.2f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        mode = result.get("mode", "scored predictions")
        limit = f", first {result['limit']} records" if result.get("limit") else ""
        skipped = [
            f"{info['count']} of {info['of']} {what} excluded"
            for key, what in (("not_run", "requests not run"), ("missing", "references without a prediction"))
            if (info := result.get(key) or {}).get("count")
        ]
        note = f"; {', '.join(skipped)}" if skipped else ""
        tables.append(
            f"**{spec.name}** ({spec.doc}; {mode}{limit}{note}; metrics in %)\n\n" + "\n".join(lines)
        )
    return tables
