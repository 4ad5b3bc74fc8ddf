"""VIoT-Tool (zhongyy/VIoTGPT ``VIoT_tool/test_*.json``, all three schemas): step and chain accuracy.

The reference chain is the record's ``eval.reference`` (the converter normalises the test files' tool
spellings to the names VIoTGPT registers: ``toollmm.data.convert.viot.ALIASES`` / ``normalize_tool``,
sourced in data/README.md, "VIoT tool names"). Predicted steps come from VIoTGPT's own output
(JSONL ``{id: <query>, chains: [<agent step log>...] | <error text>, result}``, written by
``test_VIoTGPT_noupload.py`` / ``_upload.py`` / ``_uploadvideo.py``) or the inference ``--batch`` form; their
tool names are normalised the same way. Steps are aligned by position:

* ``step_action_acc``: reference steps whose predicted step (same position) names the same tool;
* ``step_action_input_acc``: ... and has the same input -- inputs compared as comma-separated pieces with
  surrounding spaces removed, then as canonical tool calls (``same_call``). A reference piece
  ``{query_upload_img_path}`` / ``{query_upload_video_path}`` stands for the uploaded file: it matches the
  record's media path, a path the prediction declares (``image_name_GT``, ``uploads``), the name
  VIoTGPT gives an upload (``image/<8 hex>.png`` / ``video/<8 hex>.mp4``, ``run_image`` / ``run_video``),
  or the placeholder itself;
* ``chain_success``: records whose prediction has exactly the reference's steps, all right;
* ``by_tool``: the two step metrics per reference tool (``n`` = steps).

Step fractions are over all reference steps; a reference without a prediction scores 0 (``compat``: skipped).
"""

from __future__ import annotations

import os
import re

from toollmm.data.convert.viot import normalize_tool

from .common import BenchmarkSpec, Reference, ScoreOptions, register_benchmark, scored_pairs, user_query
from .metrics import fraction
from .toolcalls import calls_from_prediction, same_call

KEYS = ("step_action_acc", "step_action_input_acc", "chain_success")
UPLOAD = {
    "{query_upload_img_path}": ("images", re.compile(r"image/[0-9a-f]{8}\.png")),
    "{query_upload_video_path}": ("videos", re.compile(r"video/[0-9a-f]{8}\.mp4")),
}

#: langchain ConversationalAgent's output parser (the agent VIoTGPT's test scripts run)
_LANGCHAIN_ACTION = re.compile(r"Action: (.*?)[\n]*Action Input: (.*)", re.DOTALL)


def _pieces(text: str) -> list[str]:
    return [p.strip() for p in text.split(",")]


def _norm_path(p: str) -> str:
    return os.path.normpath(p) if p else p


def uploads(record: dict, pred: dict | None) -> dict[str, set[str]]:
    """Per placeholder, the paths that stand for the uploaded file of this record."""
    out = {}
    declared = []
    if pred is not None:
        declared = [pred.get("image_name_GT")] + list(pred.get("uploads") or [])
    for ph, (key, _) in UPLOAD.items():
        paths = [p for p in record.get(key, []) if isinstance(p, str)]
        out[ph] = {_norm_path(p) for p in paths + [d for d in declared if isinstance(d, str)]}
    return out


def substitute(ref_input: str, pred_input: str, known: dict[str, set[str]]) -> str:
    """The reference input with each upload placeholder replaced by the predicted piece at the same
    position when that piece names the upload (else left as the placeholder, which cannot match)."""
    ref, pred = _pieces(ref_input), _pieces(pred_input)
    out = []
    for i, r in enumerate(ref):
        if r in UPLOAD and i < len(pred):
            p = pred[i]
            if _norm_path(p) in known[r] or UPLOAD[r][1].fullmatch(p):
                out.append(p)
                continue
        out.append(r)
    return ",".join(out)


def _log_step(log: str) -> tuple[str, str] | None:
    """Action and input of one agent step log, by langchain's conversational-agent rule."""
    m = _LANGCHAIN_ACTION.search(log)
    return (m.group(1).strip(), m.group(2).strip(" ").strip('"')) if m else None


def predicted_steps(pred: dict) -> list[tuple[str, str]]:
    """``[(registered tool name, input)]`` of a VIoTGPT output or a ``--batch`` prediction."""
    if isinstance(pred.get("chains"), list):  # one langchain AgentAction.log per step
        steps = [_log_step(log) for log in pred["chains"] if isinstance(log, str)]
        steps = [s for s in steps if s is not None]
    elif "chains" in pred:  # a ReAct string (the test files' own form) or VIoTGPT's error text
        steps = calls_from_prediction({"text": pred["chains"] if isinstance(pred["chains"], str) else ""})
    else:
        steps = calls_from_prediction(pred)
    return [(normalize_tool(name.strip(), raw), raw.strip()) for name, raw in steps]


def score_record(reference: list[dict], steps: list[tuple[str, str]], known: dict[str, set[str]]):
    """Per reference step ``(tool, action right, input right)`` and the chain's success."""
    out = []
    for i, ref in enumerate(reference):
        name, ref_input = ref["name"], ref["arguments"].get("input", "")
        if i >= len(steps):
            out.append((name, False, False))
            continue
        p_name, p_input = steps[i]
        action = p_name == name
        want = {"name": name, "arguments": {"input": _pieces(substitute(ref_input, p_input, known))}}
        got = {"name": p_name, "arguments": {"input": _pieces(p_input)}}
        out.append((name, action, action and same_call(want, got)))
    success = len(steps) == len(reference) and all(ok for _, _, ok in out)
    return out, success


def score(refs: list[Reference], preds: list[dict | None], opts: ScoreOptions, all_refs=None) -> dict:
    step_rows: list[tuple[str, bool, bool]] = []
    chains: list[bool] = []
    pairs, missing = scored_pairs(refs, preds, opts)
    for ref, pred in pairs:
        reference = ref.record["eval"].get("reference") or []
        steps = predicted_steps(pred) if pred is not None else []
        rows_, success = score_record(reference, steps, uploads(ref.record, pred))
        step_rows += rows_
        chains.append(success)
    out = {
        "step_action_acc": fraction(a for _, a, _ in step_rows),
        "step_action_input_acc": fraction(b for _, _, b in step_rows),
        "chain_success": fraction(chains),
        "n": len(chains),
        "steps": len(step_rows),
        "missing": missing,
    }
    by_tool: dict[str, list[tuple[bool, bool]]] = {}
    for name, a, b in step_rows:
        by_tool.setdefault(name, []).append((a, b))
    out["by_tool"] = {
        name: {
            "step_action_acc": fraction(a for a, _ in v),
            "step_action_input_acc": fraction(b for _, b in v),
            "n": len(v),
        }
        for name, v in sorted(by_tool.items())
    }
    return out


def rows(result: dict) -> list[tuple[str, dict]]:
    return [("all", result)] + list(result.get("by_tool", {}).items())


register_benchmark(
    BenchmarkSpec(
        name="viot",
        fmt="viot",
        ref_keys=lambda r: [r.id, user_query(r.record)],
        pred_keys=lambda where, p: [str(p["id"]).strip()] if p.get("id") is not None else [],
        score=score,
        rows=rows,
        columns=(*KEYS, "n"),
        doc="VIoT-Tool test files: step action / action-input accuracy, chain success (n = records;"
        " per-tool rows: n = reference steps)",
        answer_keys=("chains", "text", "tool_calls"),
    )
)
