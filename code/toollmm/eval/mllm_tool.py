"""MLLM-Tool (ToolMMBench, ``combined_data.json``): accuracy, hallucination rate, format accuracy.

MLLM-Tool trains its model to answer ``{'api_name': <id>}`` with the id unquoted (MLLM-Tool/MLLM-Tool
``code/model/openllama2.py`` ``build_one_instance``: ``"{'api_name': " + value + '}\\n###'``) and keeps the
first line of the generation (``code/inference_new_llama_7b_10.py``). An answer is *parsable* when it is

* ``{'api_name': X}`` -- X quoted or not, single or double quotes, as a Python literal
  (``ast.literal_eval``), JSON, or by pattern (never ``eval``); an optional ``###`` stop marker after it;
* one of our tool calls: ``<tool_call>{"name": X, "arguments": {}}</tool_call>`` or a ``--batch``
  ``tool_calls`` entry;
* ``unknown`` as a plain answer (our records' form of MLLM-Tool's no-tool label).

``unknown`` is an id like any other. Per record (all records are the denominator):
``accuracy`` = parsed id in the record's acceptable list; ``hallucination_rate`` = parsed, but the id is
in no acceptable list of the reference file(s); ``format_accuracy`` = parsed. A missing or unparsable
answer is a format failure, not a hallucination. Slices: ``by_modality`` (input medium),
``by_ambiguity`` (the ambiguity label; ``"-1"`` and ``-1`` are one label), ``by_onetomulti``.
"""

from __future__ import annotations

import ast
import json
import re

from .common import BenchmarkSpec, Reference, ScoreOptions, register_benchmark, scored_pairs, user_query
from .metrics import fraction
from .toolcalls import batch_calls, first_tool_call

KEYS = ("accuracy", "hallucination_rate", "format_accuracy")
UNKNOWN = "unknown"
_API = re.compile(r"""\{\s*(['"]?)api_name\1\s*:\s*(.*?)\s*,?\s*\}""", re.DOTALL)
_QUOTED = re.compile(r"""^(['"])(.+)\1$""", re.DOTALL)


def _from_literal(s: str) -> str | None:
    for load in (ast.literal_eval, json.loads):
        try:
            obj = load(s)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(obj, dict) and set(obj) == {"api_name"} and isinstance(obj["api_name"], str):
            return obj["api_name"].strip() or None
    return None


def parse_answer(text: str | None) -> str | None:
    """The tool id of an answer, or None when it is not parsable (see the module doc)."""
    if not isinstance(text, str):
        return None
    call, _ = first_tool_call(text)
    if call is not None:
        return call["name"]
    s = text.strip().split("\n", 1)[0].strip()
    s = s[: -len("###")].rstrip() if s.endswith("###") else s
    if s == UNKNOWN:
        return UNKNOWN
    found = _from_literal(s)
    if found is not None:
        return found
    m = _API.fullmatch(s)
    if m is None:
        return None
    value = m.group(2).strip()
    q = _QUOTED.match(value)
    if q:
        return q.group(2).strip() or None
    return value if value and not re.search(r"\s", value) else None


def predicted_id(pred: dict | None) -> str | None:
    """MLLM-Tool's ``{question_id, questions, response}`` or the inference ``--batch`` form."""
    if pred is None:
        return None
    if "response" in pred:
        return parse_answer(pred["response"])
    for c in batch_calls(pred):
        return c["name"]
    return parse_answer(pred.get("text"))


def modality(record: dict) -> str:
    for m in ("image", "video", "audio"):
        if record.get(m + "s"):
            return m
    return "text"


def _label(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        try:
            return str(int(v.strip()))
        except ValueError:
            return v.strip().lower()
    return "none" if v is None else str(v)


def score(
    refs: list[Reference],
    preds: list[dict | None],
    opts: ScoreOptions,
    all_refs: list[Reference] | None = None,
) -> dict:
    """``all_refs`` (default ``refs``): the whole reference file(s), whose acceptable ids are the known ones."""
    universe = {
        a for r in (all_refs or refs) for a in r.record["eval"].get("acceptable", []) if isinstance(a, str)
    }
    items: list[tuple[Reference, dict[str, bool]]] = []
    pairs, missing = scored_pairs(refs, preds, opts)
    for ref, pred in pairs:
        got = predicted_id(pred)
        acceptable = ref.record["eval"].get("acceptable", [])
        items.append(
            (
                ref,
                {
                    "accuracy": got is not None and got in acceptable,
                    "hallucination_rate": got is not None and got not in universe,
                    "format_accuracy": got is not None,
                },
            )
        )
    out = {**_aggregate([i for _, i in items]), "missing": missing}
    slices = {
        "by_modality": lambda r: modality(r.record),
        "by_ambiguity": lambda r: _label(r.record["eval"].get("ambiguity")),
        "by_onetomulti": lambda r: _label(r.record["eval"].get("onetomulti")),
    }
    for key, label in slices.items():
        groups: dict[str, list[dict[str, bool]]] = {}
        for ref, item in items:
            groups.setdefault(label(ref), []).append(item)
        out[key] = {g: _aggregate(v) for g, v in sorted(groups.items())}
    return out


def _aggregate(items: list[dict[str, bool]]) -> dict:
    return {**{k: fraction(i[k] for i in items) for k in KEYS}, "n": len(items)}


def rows(result: dict) -> list[tuple[str, dict]]:
    out = [("all", result)]
    for key in ("by_modality", "by_ambiguity", "by_onetomulti"):
        out += [(f"{key[3:]}={name}", m) for name, m in result.get(key, {}).items()]
    return out


def _ref_keys(r: Reference) -> list[str]:
    raw_id = r.id.split("-", 1)[1] if "-" in r.id else r.id
    return [r.id, f"{raw_id}\x1f{user_query(r.record)}"]


def _pred_keys(where: str, p: dict) -> list[str]:
    keys = [str(p["id"])] if p.get("id") is not None else []
    if p.get("question_id") is not None:
        keys.append(f"{p['question_id']}\x1f{str(p.get('questions', '')).strip()}")
    return keys


register_benchmark(
    BenchmarkSpec(
        name="mllm-tool",
        fmt="mllm-tool",
        ref_keys=_ref_keys,
        pred_keys=_pred_keys,
        score=score,
        rows=rows,
        columns=(*KEYS, "n"),
        doc="MLLM-Tool combined_data.json: accuracy, hallucination rate, format accuracy (n = records)",
        answer_keys=("response", "text", "tool_calls"),
        id_keys=("id", "question_id + questions"),
    )
)
