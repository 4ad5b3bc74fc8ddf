"""GPT4Tools: SR_t, SR_act, SR_args, SR and IoU, with the definitions of AILab-CVC/GPT4Tools
``eval/evaluate_result.py`` (``EvalTools.evaluate_item``), reimplemented:

* The reference is the record's source ``output`` text (rebuilt byte for byte by the converter), the
  prediction is the model's ReAct text (the prompt in front, if any, removed; then stripped).
* Per step, ``Thought: Do I need to use a tool? (.*)``, ``Action: (.*)`` and ``Action Input: (.*)`` are
  taken by regex (each stripped). Lists are aligned by position over the LONGER one: a position counts 1
  when both exist and agree, else 0; the score of a list is the mean over that longer length.
* Tool references (the output holds ``Action:`` and ``Action Input:``): the reference thoughts are cut to
  the number of actions (its closing "No" is not scored); a prediction with exactly one thought more than
  actions whose last thought is "No" drops it. Arguments: both inputs split on ``,``; a different count
  scores 0; per piece, a reference piece containing ``.png`` needs ``.png`` in the predicted piece (1, else
  the whole step scores 0) -- with ``strict``, the paths must be equal instead (1 or 0, the paper's
  formula); other pieces score BLEU-1 (pycocoevalcap). The step's score is the mean of its pieces.
  SR = 1 when SR_t and SR_act are 1 and SR_args >= 0.5. IoU = sum(flags x expected) /
  max(sum(max(flags, expected)), 1) over the three lists concatenated.
* No-tool references: SR_t is the thought list score, but 0 unless the first predicted thought is "No"
  and an ``AI: `` line exists; SR_act = SR_args = SR = 1 if SR_t is 1, else all 0; IoU from the thoughts.
* A reference without a prediction scores 0 everywhere when passed as ``None`` to :func:`score`
  (``compat`` / ``allow_missing``: skipped, as the published script).
  Validation (seen) and test (unseen) files are reported separately when both are given.
"""

from __future__ import annotations

import re

from toollmm.core.react import (
    DEFAULT_CALL_THOUGHT,
    DEFAULT_FINAL_THOUGHT,
    format_react_final,
    format_react_step,
)
from toollmm.data.convert.gpt4tools import to_source

from .common import BenchmarkSpec, Reference, ScoreOptions, register_benchmark, scored_pairs
from .metrics import bleu1, mean
from .toolcalls import batch_calls, calls_from_prediction

KEYS = ("SR_t", "SR_act", "SR_args", "SR", "IoU")
THOUGHT_RE = re.compile(r"Thought: Do I need to use a tool\? (.*)")
ACTION_RE = re.compile(r"Action: (.*)")
INPUT_RE = re.compile(r"Action Input: (.*)")
_TAIL = 100  # characters of the prompt's end looked for when the prompt in front is not byte-identical


def _found(regex: re.Pattern, text: str) -> list[str]:
    return [m.strip() for m in regex.findall(text)]


def positional(gt: list[str], pred: list[str]) -> tuple[list[float], list[float]]:
    """Flags (1 where both have the position and agree) and expectations (1 for reference positions),
    both as long as the longer list."""
    n = max(len(gt), len(pred))
    flags = [float(g == p) for g, p in zip(gt, pred)]
    return flags + [0.0] * (n - len(flags)), [1.0] * len(gt) + [0.0] * (n - len(gt))


def argument_score(gt: str, pred: str, strict: bool = False) -> float:
    """One step's Action Input: comma pieces compared as described in the module doc."""
    g, p = gt.split(","), pred.split(",")
    if len(g) != len(p):
        return 0.0
    scores = []
    for k, v in zip(g, p):
        if ".png" in k:
            if strict:
                scores.append(float(k.strip() == v.strip()))
            elif ".png" not in v:
                return 0.0
            else:
                scores.append(1.0)
        else:
            scores.append(bleu1(k, v))
    return mean(scores)


def argument_flags(gt: list[str], pred: list[str], strict: bool) -> tuple[list[float], list[float]]:
    n = max(len(gt), len(pred))
    flags = [argument_score(g, p, strict) for g, p in zip(gt, pred)]
    return flags + [0.0] * (n - len(flags)), [1.0] * len(gt) + [0.0] * (n - len(gt))


def _iou(flags: list[float], expected: list[float]) -> float:
    inter = sum(f * e for f, e in zip(flags, expected))
    union = max(sum(max(f, e) for f, e in zip(flags, expected)), 1.0)
    return inter / union


def _list_mean(flags: list[float]) -> float:
    return mean(flags, empty=1.0)  # nothing expected and nothing predicted


def score_item(gt_text: str, pred_text: str, strict: bool = False) -> dict[str, float]:
    """SR_t, SR_act, SR_args, SR, IoU of one prediction against one reference output."""
    pred_thought = _found(THOUGHT_RE, pred_text)
    gt_thought = _found(THOUGHT_RE, gt_text)
    if "Action:" in gt_text and "Action Input:" in gt_text:
        gt_action, gt_args = _found(ACTION_RE, gt_text), _found(INPUT_RE, gt_text)
        gt_thought = gt_thought[: len(gt_action)]
        pred_action, pred_args = _found(ACTION_RE, pred_text), _found(INPUT_RE, pred_text)
        act, act_exp = positional(gt_action, pred_action)
        args, args_exp = argument_flags(gt_args, pred_args, strict)
        if len(pred_thought) == len(pred_action) + 1 and pred_thought[-1] == "No":
            pred_thought = pred_thought[:-1]
        th, th_exp = positional(gt_thought, pred_thought)
        out = {"SR_t": _list_mean(th), "SR_act": _list_mean(act), "SR_args": _list_mean(args)}
        out["IoU"] = _iou(th + act + args, th_exp + act_exp + args_exp)
        ok = out["SR_t"] >= 1.0 and out["SR_act"] >= 1.0 and out["SR_args"] >= 0.5
        out["SR"] = float(ok)
        return out
    th, th_exp = positional(gt_thought, pred_thought)
    sr_t = _list_mean(th)
    if not pred_thought or pred_thought[0] != "No" or not re.search(r"AI: ", pred_text):
        sr_t = 0.0
    ok = float(sr_t >= 1.0)
    return {"SR_t": sr_t, "SR_act": ok, "SR_args": ok, "SR": ok, "IoU": _iou(th, th_exp)}


def strip_prompt(output: str, instruction: str) -> str:
    """The generated part of an output that may start with the prompt (GPT4Tools' inference decodes the
    whole sequence): the prompt removed when it is in front byte for byte, else everything after the
    last occurrence of the prompt's tail (decoding may change leading whitespace), else unchanged."""
    if output.startswith(instruction):
        return output[len(instruction) :]
    tail = instruction[-_TAIL:].strip()
    cut = output.rfind(tail) if tail else -1
    return output[cut + len(tail) :] if cut >= 0 else output


def prediction_text(pred: dict, instruction: str) -> str:
    """ReAct text of a prediction: GPT4Tools' ``{id, output}`` (a string, or a list whose first element
    is used) or the inference ``--batch`` form (its ``react`` text, ReAct ``text``, or text built from
    ``tool_calls`` and the answer)."""
    if "output" in pred:
        out = pred["output"]
        out = out[0] if isinstance(out, list) and out else out
        return strip_prompt(out if isinstance(out, str) else "", instruction).strip()
    if isinstance(pred.get("react"), str):
        return pred["react"].strip()
    text = pred.get("text") if isinstance(pred.get("text"), str) else ""
    if "Thought:" in text:
        return strip_prompt(text, instruction).strip()
    results = [c.get("result") for c in batch_calls(pred)]  # the entries calls_from_prediction reads
    parts = [
        format_react_step(name, raw, (results[i] if i < len(results) else None) or "", DEFAULT_CALL_THOUGHT)
        for i, (name, raw) in enumerate(calls_from_prediction(pred))
    ]
    answer = re.sub(r"<tool_call>.*?</tool_call>", "", text, flags=re.DOTALL).strip()
    if answer or not parts:
        parts.append(format_react_final(answer, DEFAULT_FINAL_THOUGHT))
    return "".join(parts).strip()


def _split_name(ref: Reference) -> str:
    return ref.record["eval"].get("split") or "all"


def score(refs: list[Reference], preds: list[dict | None], opts: ScoreOptions, all_refs=None) -> dict:
    per_split: dict[str, list[dict[str, float]]] = {}
    pairs, missing = scored_pairs(refs, preds, opts)
    for ref, pred in pairs:
        if pred is None:
            item = dict.fromkeys(KEYS, 0.0)
        else:
            src = to_source(ref.record)
            item = score_item(src["output"], prediction_text(pred, src["instruction"]), opts.strict)
        per_split.setdefault(_split_name(ref), []).append(item)
    agg = {name: _aggregate(items) for name, items in per_split.items()}
    everything = [i for items in per_split.values() for i in items]
    out = {**_aggregate(everything), "missing": missing}
    if len(agg) > 1 or (agg and "all" not in agg):
        out["by_split"] = agg
    return out


def _aggregate(items: list[dict[str, float]]) -> dict:
    return {**{k: mean([i[k] for i in items]) for k in KEYS}, "n": len(items)}


def rows(result: dict) -> list[tuple[str, dict]]:
    out = [(name, m) for name, m in result.get("by_split", {}).items()]
    return out + [("all", result)]


register_benchmark(
    BenchmarkSpec(
        name="gpt4tools",
        fmt="gpt4tools",
        ref_keys=lambda r: [r.id],
        pred_keys=lambda where, p: [str(p["id"])] if p.get("id") is not None else [],
        score=score,
        rows=rows,
        columns=(*KEYS, "n"),
        doc="GPT4Tools val/test: SR_t, SR_act, SR_args, SR, IoU (eval/evaluate_result.py; n = records)",
        answer_keys=("output", "react", "text", "tool_calls"),
        ref_options=(
            ("eval", "true"),
        ),  # files with only id/instruction/output, as the published scorer reads
    )
)
