"""Held-out evaluation of a demo stage folder: does the model do what each stage taught it, on data it
never saw? Everything goes through the one loader (``toollmm.load``) and the one generation path.

* ``x2t`` (stage 1): greedy caption of each held-out medium. ``exact`` = the caption equals the
  reference; ``chance`` = 1 / distinct held-out captions of the modality; ``per_attribute``: the
  attribute value the caption names (each value's words, whole-word) against the truth, chance =
  1 / distinct held-out values.
* ``t2x`` (stage 2): teacher-forced held-out text->X records; the hidden states of the signal span go
  through ``toollmm.infer.step.project_signal`` (as at inference) and are compared with the caption's
  conditioning computed by the decoder's own text encoder (``DecoderPool.encode_captions``).
  ``l2`` = NExT-GPT's alignment distance (Euclidean per conditioning token, mean), ``mean_predictor`` =
  the same distance for always predicting the mean TRAINING caption conditioning, ``retrieval_top1`` =
  the nearest of the distinct held-out captions (same distance) is the right one.
* ``tools`` (stage 3): greedy answer to each held-out request (unseen argument values and phrasings)
  with the demo tools really run; the first ``<tool_call>`` is scored with ``same_call`` (canonical
  JSON equality, the benchmarks' scorer) and by tool name.

``evaluate_stage(checkpoint, data_dir, tasks)`` returns ``{task: metrics}``; ``code/evaluate.py demo``
writes it to ``<checkpoint>/eval/demo.json``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

from toollmm.core.errors import NotUtf8, iter_text_lines
from toollmm.core.paths import resolve

from ..eval.common import EvalError
from ..eval.toolcalls import first_tool_call, same_call
from .media import ATTRIBUTES
from .text import PULSE_WORDS

log = logging.getLogger(__name__)

TASKS = ("x2t", "t2x", "tools")
REPORT_ORDER = ("image", "audio", "video")
MEDIA_KEY = {"image": "images", "audio": "audios", "video": "videos"}


# ------------------------------------------------------------------------------------- inputs
def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    if not path.is_file():
        raise EvalError(f"{path}: no such file (generate the corpus: python code/prepare_data.py demo)")
    out = []
    for n, line in iter_text_lines(path):
        if isinstance(line, NotUtf8):
            raise EvalError(str(line))
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError as e:
            raise EvalError(f"{path}: line {n}: not JSON ({e})") from None
        if limit and len(out) >= limit:
            break
    return out


def _reference(rec: dict, path: Path) -> dict:
    ref = (rec.get("eval") or {}).get("reference")
    if not isinstance(ref, dict) or "caption" not in ref:
        raise EvalError(f"{path}: record {rec.get('id')}: no eval.reference.caption (is this held-out data?)")
    return ref


def _prompt_request(rec: dict, data_dir: Path):
    """The record up to (not including) its first assistant message, as a generation request."""
    from ..infer.requests import Request

    req = Request.from_record(rec, media_root=data_dir)
    first = next((i for i, m in enumerate(rec["messages"]) if m["role"] == "assistant"), None)
    if first is None:
        raise EvalError(f"record {rec.get('id')}: no assistant message to evaluate")
    req.messages = rec["messages"][:first]
    return req


def _generate(runtime, requests: list, batch_size: int) -> list:
    out = []
    for i in range(0, len(requests), batch_size):
        out += runtime.generate(requests[i : i + batch_size])
    return out


# ------------------------------------------------------------------------------------- stage 1
def value_words(modality: str, attr: str, value: str) -> str:
    return PULSE_WORDS[value] if (modality, attr) == ("audio", "pulse") else value


def named_value(text: str, modality: str, attr: str) -> str | None:
    """The one value of ``attr`` that ``text`` names (whole words); None if none or several."""
    found = [
        v
        for v in ATTRIBUTES[modality][attr]
        if re.search(r"\b" + re.escape(value_words(modality, attr, v)) + r"\b", text)
    ]
    # "fast pulsing" also contains no other value's words; "slow pulsing" likewise: no overlaps to resolve
    return found[0] if len(found) == 1 else None


def caption_metrics(texts: list[str], refs: list[dict], modality: str) -> dict:
    captions = [r["caption"] for r in refs]
    exact = [t.strip() == c for t, c in zip(texts, captions)]
    per_attr = {}
    for attr in ATTRIBUTES[modality]:
        truth = [r["attributes"][attr] for r in refs]
        hits = [named_value(t, modality, attr) == v for t, v in zip(texts, truth)]
        per_attr[attr] = {"acc": _mean(hits), "chance": 1.0 / len(set(truth))}
    return {
        "exact": _mean(exact),
        "chance": 1.0 / len(set(captions)),
        "per_attribute": per_attr,
        "n": len(refs),
        "examples": [{"reference": c, "generated": t} for t, c in list(zip(texts, captions))[:3]],
    }


def evaluate_x2t(runtime, data_dir: Path, limit: int | None, batch_size: int) -> dict:
    out = {}
    for m in REPORT_ORDER:
        path = data_dir / "heldout" / f"x2t_{m}.jsonl"
        recs = read_jsonl(path, limit)
        refs = [_reference(r, path) for r in recs]
        results = _generate(runtime, [_prompt_request(r, data_dir) for r in recs], batch_size)
        out[m] = caption_metrics([r.text for r in results], refs, m)
    return out


# ------------------------------------------------------------------------------------- stage 2
def _distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """NExT-GPT's alignment distance (``toollmm.model.losses.l2_alignment``), broadcast over leading dims."""
    return torch.linalg.vector_norm(pred.float() - target.float(), dim=-1).mean(-1)


@torch.no_grad()
def projected_signals(model, renderer, recs: list[dict], where: str) -> torch.Tensor:
    """Teacher-forced: each record's first signal span -> ``project_signal`` -> ``[N, n_query, cond_dim]``."""
    from toollmm.core.batch import Batch

    from ..infer.step import project_signal

    device = next(model.parameters()).device
    outs = []
    for rec in recs:
        sample = renderer.render(rec, where=where)
        if sample is None or not sample.signals:
            raise EvalError(f"{where}: record {rec.get('id')}: renders without a signal span")
        span = sample.signals[0]
        ids = torch.tensor([sample.input_ids], device=device)
        batch = Batch(ids, torch.full_like(ids, -100), torch.ones_like(ids))
        hidden = model.run_llm(batch).hidden_states[-1][0]
        n = len(model.bundle.token_ids.signal[span.modality])
        outs.append(project_signal(model, span.modality, hidden[span.start : span.start + n]))
    return torch.stack(outs)


def _generate_captions(rec: dict) -> list[str]:
    return [g["caption"] for m in rec["messages"] for g in m.get("generate") or []]


def alignment_metrics(pred: torch.Tensor, target: torch.Tensor, mean_target: torch.Tensor, caps: list[str]):
    """L2 of predictions / of the mean predictor, and top-1 retrieval among the distinct captions."""
    distinct = sorted(set(caps))
    index = {c: i for i, c in enumerate(distinct)}
    by_caption = torch.stack([target[caps.index(c)] for c in distinct])
    dist = _distance(pred[:, None], by_caption[None])  # [N, distinct]
    right = torch.tensor([index[c] for c in caps])
    return {
        "l2": float(_distance(pred, target).mean()),
        "mean_predictor": float(_distance(mean_target[None], target).mean()),
        "retrieval_top1": float((dist.argmin(1) == right).float().mean()),
        "retrieval_chance": 1.0 / len(distinct),
        "n": len(caps),
    }


def evaluate_t2x(stage, data_dir: Path, limit: int | None) -> dict:
    from ..data.render import Renderer
    from ..model.decoders import DecoderPool

    model, cfg = stage.model, stage.config
    renderer = Renderer.from_config(cfg, stage.tokenizer)
    pool = DecoderPool(cfg.model.decoders)
    per, totals = {}, defaultdict(float)
    for m in REPORT_ORDER:
        if m not in model.output_proj:
            continue
        path = data_dir / "heldout" / f"t2x_{m}.jsonl"
        recs = read_jsonl(path, limit)
        caps = [_generate_captions(r)[0] for r in recs]
        train_caps = [
            c for r in read_jsonl(data_dir / "train" / f"t2x_{m}.jsonl") for c in _generate_captions(r)
        ]
        targets = pool.encode_captions(m, caps)
        mean_target = pool.encode_captions(m, train_caps).mean(0)
        pred = projected_signals(model, renderer, recs, str(path)).cpu()
        per[m] = alignment_metrics(pred, targets, mean_target, caps)
        for k in ("l2", "mean_predictor", "retrieval_top1"):
            totals[k] += per[m][k] * per[m]["n"]
        totals["n"] += per[m]["n"]
    n = max(1.0, totals["n"])
    summary = {k: totals[k] / n for k in ("l2", "mean_predictor", "retrieval_top1")}
    return {**summary, "n": int(totals["n"]), "per_modality": per}


# ------------------------------------------------------------------------------------- stage 3
def demo_registry():
    """The demo's tools (``toollmm.demo.toolset``) with their in-process reference backends."""
    from ..agent.registry import Registry
    from .toolset import TOOL_FUNCTIONS

    reg = Registry()
    for fn in TOOL_FUNCTIONS:
        reg.add(fn)
    return reg


def evaluate_tools(runtime, data_dir: Path, limit: int | None, batch_size: int) -> dict:
    path = data_dir / "heldout" / "tools.jsonl"
    recs = read_jsonl(path, limit)
    refs = []
    for r in recs:
        acceptable = (r.get("eval") or {}).get("acceptable")
        if not acceptable:
            raise EvalError(f"{path}: record {r.get('id')}: no eval.acceptable tool call")
        refs.append(acceptable)
    results = _generate(runtime, [_prompt_request(r, data_dir) for r in recs], batch_size)
    names, exact, per_tool, examples = [], [], defaultdict(list), []
    for rec, ref, res in zip(recs, refs, results):
        call, _ = first_tool_call(res.raw_text)
        ok = call is not None and any(same_call(call, a) for a in ref)
        names.append(call is not None and call["name"] == ref[0]["name"])
        exact.append(ok)
        per_tool[ref[0]["name"]].append(ok)
        if not ok and len(examples) < 5:
            examples.append({"request": rec["messages"][0]["content"], "generated": res.raw_text[:300]})
    return {
        "tool_name_accuracy": _mean(names),
        "tool_call_exact": _mean(exact),
        "per_tool_exact": {k: _mean(v) for k, v in sorted(per_tool.items())},
        "n": len(recs),
        "misses": examples,
    }


# ------------------------------------------------------------------------------------- driver
def headline(result: dict) -> dict:
    """The numbers worth a log line: top-level scalars, and each modality's exact / per-attribute acc."""
    out = {k: round(v, 4) for k, v in result.items() if isinstance(v, float)}
    for m, d in result.items():
        if isinstance(d, dict) and "exact" in d:
            out[m] = {"exact": round(d["exact"], 3)} | {
                a: round(v["acc"], 3) for a, v in d["per_attribute"].items()
            }
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs)) / len(xs) if xs else 0.0


def evaluate_stage(
    checkpoint: str | Path,
    data_dir: str | Path = "data/demo",
    tasks: tuple[str, ...] = TASKS,
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 48,
) -> dict:
    """Load ``checkpoint`` with ``toollmm.load`` and compute the held-out metrics of ``tasks``."""
    import toollmm

    from ..checkpoint.stage import read_manifest, stage_config
    from ..train.build import seed_all

    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise EvalError(f"unknown demo task(s) {bad}; known: {list(TASKS)}")
    data = resolve(data_dir)
    ckpt = resolve(checkpoint)
    manifest = read_manifest(ckpt, verify=False)
    # parts a stage has not trained yet (stage 1's output projections) start from the run seed, as in training
    seed_all(stage_config(ckpt).run.seed)
    t0 = time.perf_counter()
    runtime = toollmm.load(
        str(ckpt),
        overrides=[f"inference.max_new_tokens={max_new_tokens}", "inference.temperature=0.0"],
        registry=demo_registry(),
        output_dir=ckpt / "eval" / "media",  # decoded signal spans stay with the run (made only if any)
    )
    out: dict = {"checkpoint": str(checkpoint), "stage": manifest.get("stage")}
    for task in tasks:
        t1 = time.perf_counter()
        if task == "x2t":
            out[task] = evaluate_x2t(runtime, data, limit, batch_size)
        elif task == "t2x":
            out[task] = evaluate_t2x(runtime.stage, data, limit)
        else:
            out[task] = evaluate_tools(runtime, data, limit, batch_size)
        out.setdefault("eval_s", {})[task] = round(time.perf_counter() - t1, 2)
        log.info("%s: %s", task, headline(out[task]))
    out["eval_s"]["total"] = round(time.perf_counter() - t0, 2)
    return out
