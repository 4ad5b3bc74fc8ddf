"""MLLM-Tool (MLLM-Tool/MLLM-Tool data/IT_data_ins/T+X-T_data/*.json).

Training records ``{id, image_path, video_path, audio_path, input_modality, output_modality,
conversations: [{from: human, value, input_modality}, {from: gpt, value: <HF model id>, ambiguity,
output_modality}]}``; the evaluation file combined_data.json has a list of acceptable ids as the gpt
value and record-level ``ifambiguity``, ``onetomulti``, ``ambiguity`` (an int, sometimes a string).

The tool is the Hugging Face model id, called with empty arguments; ``unknown`` is an answer without a
tool. Media paths follow the loader (dataset/T+X-T_instruction_dataset.py): images and audios live under
``image/`` and ``audio/`` of the media root, ``video_path`` already starts with ``video/``. Training records
that repeat a query once per acceptable tool stay separate; ``--opt merge=true`` merges them into one
evaluation record with an ``acceptable`` list (evaluation files already carry the list).
"""

from __future__ import annotations

from toollmm.core.tokens import MODALITIES, PLACEHOLDER

from .base import Context, check_media, leftovers, make_record, need, register, tool_call

UNKNOWN = "unknown"
_PREFIX = {"image": "image/", "audio": "audio/", "video": ""}


def _int_label(v):
    """Ambiguity labels: '-1' and -1 are the same label."""
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            return v
    return v


def _answer(model_id: str) -> dict:
    if model_id == UNKNOWN:
        return {"role": "assistant", "content": UNKNOWN}
    return {"role": "assistant", "content": "", "tool_calls": [tool_call(model_id)]}


def _media(raw: dict, ctx: Context) -> tuple[str | None, str | None]:
    mod = raw.get("input_modality")
    if mod in (None, "", "text"):
        return None, None
    if mod not in MODALITIES:
        raise ctx.fail(f"unknown input_modality {mod!r}")
    path = need(raw, f"{mod}_path", ctx)
    if not path:
        raise ctx.fail(f"input_modality is {mod!r} but {mod}_path is empty")
    full = _PREFIX[mod] + path if not path.startswith(_PREFIX[mod]) else path
    check_media(full, ctx)
    return mod, full


def merge_repeats(records: list[dict], ctx: Context) -> list[dict]:
    """Training files repeat a query once per acceptable tool; for evaluation, merge records with the
    same query and media into one whose ``eval.acceptable`` lists every answer (first-seen order)."""
    if not ctx.flag("merge", default=False):
        return records
    merged: dict[tuple, dict] = {}
    for rec in records:
        key = (
            rec["messages"][0]["content"],
            tuple(rec.get("images", []) + rec.get("videos", []) + rec.get("audios", [])),
        )
        answer = rec["messages"][1]
        name = answer["tool_calls"][0]["function"]["name"] if answer.get("tool_calls") else answer["content"]
        names = rec.get("eval", {}).get("acceptable", [name])
        if key not in merged:
            first = merged[key] = rec
            first.setdefault("eval", {}).setdefault("acceptable", [])
            first["eval"]["acceptable"] = list(dict.fromkeys(first["eval"]["acceptable"] + names))
            if "ambiguity" in first.get("meta", {}):
                first["eval"]["ambiguity"] = first["meta"].pop("ambiguity")
            continue
        acc = merged[key]["eval"]["acceptable"]
        acc.extend(n for n in names if n not in acc)
        merged[key].setdefault("meta", {}).setdefault("merged_ids", []).append(rec["id"])
    return list(merged.values())


@register(
    "mllm-tool",
    options={"merge": "true: merge records repeating a query into one eval record (default false)"},
    finish=merge_repeats,
)
def convert_mllm_tool(raw: dict, ctx: Context) -> list[dict]:
    """MLLM-Tool training records and the combined_data.json evaluation file."""
    conv = need(raw, "conversations", ctx, list)
    if len(conv) != 2 or not all(isinstance(t, dict) for t in conv):
        raise ctx.fail(f"expected one human and one gpt turn, got {len(conv)} turns")
    human, gpt = conv
    if human.get("from") != "human" or gpt.get("from") != "gpt":
        raise ctx.fail("expected turns from 'human' then 'gpt'")
    query = human.get("value")
    if not isinstance(query, str):
        raise ctx.fail("human value must be a string")
    answers = gpt.get("value")
    answers = [answers] if isinstance(answers, str) else answers
    if not answers or not all(isinstance(a, str) and a for a in answers):
        raise ctx.fail(f"gpt value must be a model id or a non-empty list of ids, got {gpt.get('value')!r}")
    mod, path = _media(raw, ctx)
    user = {"role": "user", "content": (PLACEHOLDER[mod] + "\n" if mod else "") + query}
    evaluation: dict = {}
    if isinstance(gpt["value"], list):
        evaluation["acceptable"] = list(answers)
        for k in ("ifambiguity", "onetomulti", "modality"):
            if k in raw:
                evaluation[k] = raw[k]
        evaluation["ambiguity"] = _int_label(raw.get("ambiguity", gpt.get("ambiguity")))
    used = {
        "id",
        "image_path",
        "video_path",
        "audio_path",
        "input_modality",
        "output_modality",
        "conversations",
    }
    used |= {"ifambiguity", "onetomulti", "modality", "ambiguity"} if evaluation else set()
    meta = leftovers(raw, used)
    if not evaluation and "ambiguity" in gpt:
        meta["ambiguity"] = _int_label(gpt["ambiguity"])
    rid = f"{raw.get('input_modality') or 'text'}-{raw.get('id', ctx.index)}"
    media = {mod + "s": [path]} if mod else {}
    return [make_record(rid, ctx, [user, _answer(answers[0])], eval=evaluation or None, meta=meta, **media)]
