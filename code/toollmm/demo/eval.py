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
* ``multiturn`` (stage 3): held-out 2-3 turn chats (tool calls, a medium attached in a later turn,
  generation) played turn by turn through real chat sessions (``toollmm.infer.session``: each turn's
  prompt holds the model's own earlier turns, tool results included). Every assistant turn is scored:
  a tool turn by its first call (``same_call``), a caption turn by the exact caption, a generation turn by
  an answer that names the requested caption (training answers word it two ways) plus a complete signal
  span of the right modality (the span is what the output
  projection reads; decoding it with the tiny random diffusion decoders would cost seconds per turn and
  say nothing about the LM, so the engine's signal hook here records the span without decoding, and the
  session writes it back into the history as it writes a decoded one). ``turn_accuracy`` is over all turns;
  ``single_turn_accuracy`` scores the same turns each sent alone to a fresh session, and ``ratio`` =
  turn_accuracy / single_turn_accuracy (the demo's target: >= 0.9).

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

TASKS = ("x2t", "t2x", "tools", "multiturn")
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


# ------------------------------------------------------------------------------------- multi-turn
def chat_turns(rec: dict, data_dir: Path, where: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """A record's user turns as ``(text, [(modality, path)])``: each turn takes the next media of every
    placeholder it holds (the record's media lists are in placeholder order), paths under ``data_dir``."""
    from ..core.tokens import PLACEHOLDER_RE

    used = dict.fromkeys(REPORT_ORDER, 0)
    turns = []
    for msg in rec["messages"]:
        if msg["role"] != "user":
            continue
        media = []
        for m in PLACEHOLDER_RE.findall(msg["content"]):
            items = rec.get(MEDIA_KEY[m]) or []
            if used[m] >= len(items):
                raise EvalError(
                    f"{where}: record {rec.get('id')}: more <{m}> placeholders than {MEDIA_KEY[m]}"
                )
            media.append((m, str(data_dir / items[used[m]])))
            used[m] += 1
        turns.append((msg["content"], media))
    return turns


def turn_correct(ref: dict, out: dict, row) -> bool:
    """One assistant turn against its reference (``records.multi_turn``'s ``eval.reference`` entries)."""
    if row is None:
        return False
    if ref["kind"] == "tool":
        call, _ = first_tool_call(row.raw_text)
        return call is not None and same_call(call, ref["call"])
    if ref["kind"] == "generate":  # the answer names what was asked for (its wording varies in training)
        said = out["text"].strip()
        named = ref["caption"] in said if ref.get("caption") else said == ref["answer"]
        return named and any(ev.modality == ref["modality"] and ev.error is None for ev in row.signals)
    return out["text"].strip() == ref["answer"]


def _with_captions(rec: dict, ref: list[dict]) -> list[dict]:
    """``ref`` with each generation turn's caption (from the record's ``generate`` entry) filled in."""
    caps, turn = [], -1
    for msg in rec["messages"]:
        if msg["role"] == "user":
            turn += 1
            caps.append(None)
        elif msg.get("generate") and turn >= 0 and caps[turn] is None:
            caps[turn] = msg["generate"][0].get("caption")
    return [
        {**t, "caption": t.get("caption") or c} if t.get("kind") == "generate" else t
        for t, c in zip(ref, caps)
    ]


def span_marker(*, row: int, modality: str, positions: list[int], hidden, state) -> dict:
    """A signal hook that decodes nothing: the span's entry as the session stores it (no file written)."""
    return {"modality": modality, "path": f"{modality}_span_{positions[0]}_not_decoded"}


def _play(runtime, convs: list[list[tuple[str, list]]], batch_size: int) -> list[list[tuple[dict, object]]]:
    """Each conversation's turns sent in order to its own chat session (``send_turns``: the history the
    app and ``inference.py --chat`` keep), ``batch_size`` sessions per generate call; ``(output, row)``
    per turn."""
    from ..infer.session import send_turns

    sessions = [runtime.session() for _ in convs]
    results: list[list] = [[] for _ in convs]
    for k in range(max((len(c) for c in convs), default=0)):
        active = [i for i, c in enumerate(convs) if len(c) > k]
        for j in range(0, len(active), batch_size):
            idx = active[j : j + batch_size]
            outs, rows = send_turns([sessions[i] for i in idx], [convs[i][k] for i in idx])
            for i, out, row in zip(idx, outs, rows):
                results[i].append((out, row))
    return results


def evaluate_multiturn(runtime, data_dir: Path, limit: int | None, batch_size: int) -> dict:
    path = data_dir / "heldout" / "multiturn.jsonl"
    recs = read_jsonl(path, limit)
    refs, convs = [], []
    for r in recs:
        ref = (r.get("eval") or {}).get("reference")
        turns = chat_turns(r, data_dir, str(path))
        if not isinstance(ref, list) or len(ref) != len(turns) or len(turns) < 2:
            raise EvalError(
                f"{path}: record {r.get('id')}: eval.reference needs one entry per user turn (>= 2)"
            )
        refs.append(_with_captions(r, ref))
        convs.append(turns)
    hook, runtime.engine.signal_hook = runtime.engine.signal_hook, span_marker
    try:
        multi = _play(runtime, convs, batch_size)
        alone = _play(runtime, [[t] for c in convs for t in c], batch_size)
    finally:
        runtime.engine.signal_hook = hook
    flat_refs = [t for ref in refs for t in ref]
    m_ok = [[turn_correct(t, o, row) for t, (o, row) in zip(ref, res)] for ref, res in zip(refs, multi)]
    s_ok = [turn_correct(t, o, row) for t, [(o, row)] in zip(flat_refs, alone)]
    m_flat = [x for c in m_ok for x in c]
    per_kind: dict = defaultdict(lambda: {"multi": [], "single": []})
    per_index: dict = defaultdict(list)
    for t, mo, so in zip(flat_refs, m_flat, s_ok):
        per_kind[t["kind"]]["multi"].append(mo)
        per_kind[t["kind"]]["single"].append(so)
    for c in m_ok:
        for k, ok in enumerate(c):
            per_index[f"turn_{k + 1}"].append(ok)
    misses = []
    for rec, ref, res, oks in zip(recs, refs, multi, m_ok):
        for k, (t, (o, _), ok) in enumerate(zip(ref, res, oks)):
            if not ok and len(misses) < 5:
                want = t["call"] if t["kind"] == "tool" else t["answer"]
                misses.append({"id": rec["id"], "turn": k + 1, "kind": t["kind"], "expected": want,
                               "text": o["text"][:200], "errors": o["errors"][:2]})  # fmt: skip
    mt, st = _mean(m_flat), _mean(s_ok)
    return {
        "turn_accuracy": mt,
        "single_turn_accuracy": st,
        "ratio": mt / st if st else None,  # undefined (not 0) when no turn sent alone was right
        "conversation_exact": _mean(all(c) for c in m_ok),
        "per_kind": {
            k: {"multi": _mean(v["multi"]), "single": _mean(v["single"]), "n": len(v["multi"])}
            for k, v in sorted(per_kind.items())
        },
        "per_turn_index": {k: _mean(v) for k, v in sorted(per_index.items())},
        "n_conversations": len(recs),
        "n_turns": len(m_flat),
        "misses": misses,
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
    workers: int = 1,
) -> dict:
    """Load ``checkpoint`` with ``toollmm.load`` and compute the held-out metrics of ``tasks``. With
    ``workers`` >= 2 the tool calls (the longest task) are scored in a second process while this one runs
    the other tasks; the result is the same dict (``eval_s.total`` is then the wall time, not the sum)."""
    import toollmm

    from ..checkpoint.stage import read_manifest, stage_config
    from ..train.build import seed_all

    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise EvalError(f"unknown demo task(s) {bad}; known: {list(TASKS)}")
    if workers > 1 and "tools" in tasks and len(tasks) > 1:
        return _evaluate_in_two(checkpoint, data_dir, tasks, limit, batch_size, max_new_tokens)
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
        elif task == "multiturn":
            out[task] = evaluate_multiturn(runtime, data, limit, batch_size)
        else:
            out[task] = evaluate_tools(runtime, data, limit, batch_size)
        out.setdefault("eval_s", {})[task] = round(time.perf_counter() - t1, 2)
        log.info("%s: %s", task, headline(out[task]))
    out["eval_s"]["total"] = round(time.perf_counter() - t0, 2)
    return out


def _evaluate_in_two(checkpoint, data_dir, tasks: tuple[str, ...], limit, batch_size, max_new_tokens) -> dict:
    """:func:`evaluate_stage` of ``tasks`` with the tool calls in a child process; one merged result."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    rest = tuple(t for t in tasks if t != "tools")
    args = (checkpoint, data_dir)
    kw = {"limit": limit, "batch_size": batch_size, "max_new_tokens": max_new_tokens}
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        child = pool.submit(evaluate_stage, *args, ("tools",), **kw)
        result = evaluate_stage(*args, rest, **kw)
        tools = child.result()
    times = result["eval_s"] | {"tools": tools["eval_s"]["tools"]}
    times["total"] = max(result["eval_s"]["total"], tools["eval_s"]["total"])  # wall time, not the sum
    result |= {"tools": tools["tools"], "eval_s": {t: times[t] for t in (*tasks, "total")}}
    return {k: result[k] for k in ("checkpoint", "stage", *tasks, "eval_s")}
