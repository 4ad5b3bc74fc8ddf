"""The delta checkpoint: exactly what toollmm trains on top of the frozen base models, loaded strictly.

Layout of a delta folder (format ``toollmm-delta/1``)::

    <dir>/delta.safetensors      token rows + projections; header metadata: format, parts, token_ids, tied
    <dir>/adapter/               peft's own ``save_pretrained`` output (adapter_config.json +
                                 adapter_model.safetensors, LoRA A/B only); present iff "lora" in parts
                                 (a release keeps these two files at its root instead: ``adapter_dir``)

``parts`` are names of the model's one vocabulary of trainable parts (``toollmm.model.toollmm_model.PARTS``,
the names of ``train.trainable``). Keys of ``delta.safetensors``::

    token_rows.embed.{placeholder,signal,tool}   [n_group, H]  new input-embedding rows (always saved)
    token_rows.head.{placeholder,signal,tool}    [n_group, H]  new lm_head rows (untied heads only)
    input_proj.<param>                           part "input_proj"
    output_proj.<modality>.<param>               part "output_proj.<modality>"
    llm.<param>                                  part "llm" (the demo's fully trained stand-in LM only)

Parts are cumulative: a stage saves what it trained plus what it loaded (``ToolLMM.delta_parts``);
every new token row is saved whatever the parts (43 x H numbers per matrix by default; parts
``token_rows.signal`` / ``token_rows.tool`` only record that those rows were trained) because even
untrained new lm_head rows shape the LM's softmax. Files written before the vocabulary was one list
the part ``token_rows`` (all rows, always present): it is still read, as "no part" (:data:`LEGACY_PARTS`). The base vocabulary is never saved (NExT-GPT saved 2 x 131M embedding numbers),
and peft is told ``save_embedding_layers=False`` (its "auto" mode would save the resized matrices).

Size bound (without the "llm" part), checked by the tests: the two weight files together hold at most
``itemsize x (n_lora + n_rows + n_proj) + 64 KiB`` bytes, n_rows = (1 + untied) x n_new_tokens x H.

Loading is strict: the saved token ids must equal the model's (NExT-GPT #47); every key of every saved part
must exist in the model with the same shape, and every model key of a saved part must be in the file (an
error names the key); parts the file does not hold are the expected-missing keys, listed in the report.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from toollmm.core.errors import UserError
from toollmm.core.files import respect_umask
from toollmm.core.safefiles import naming_refused_pickles, save_safetensors_file

from ..model.toollmm_model import PARTS, ToolLMM

log = logging.getLogger(__name__)

FORMAT = "toollmm-delta/1"
DELTA_FILE = "delta.safetensors"
ADAPTER_DIR = "adapter"
#: part names of older delta files and stage manifests, read as: nothing beyond the always-saved rows
LEGACY_PARTS = ("token_rows",)
HEADER_SLACK = 64 * 1024


class DeltaError(UserError, ValueError):
    """A delta that does not fit the model it is loaded into."""


@dataclass
class DeltaLoadReport:
    parts: list[str]  # parts loaded from the file
    expected_missing: list[str]  # model keys of parts the file does not hold (they keep their init)


def row_tensors(model: ToolLMM) -> dict[str, torch.Tensor]:
    """Every new token row, by its key in ``delta.safetensors`` (saved in every delta)."""
    rows = model.bundle.rows
    sd = {f"token_rows.embed.{g}": p for g, p in rows["embed"].rows.items()}
    if not model.bundle.tied:
        sd.update({f"token_rows.head.{g}": p for g, p in rows["head"].rows.items()})
    return sd


def part_tensors(model: ToolLMM, parts) -> dict[str, torch.Tensor]:
    """The tensors of ``delta.safetensors`` that ``parts`` add to the token rows (LoRA lives in the
    adapter folder; ``token_rows.*`` parts add nothing: their rows are always saved)."""
    sd: dict[str, torch.Tensor] = {}
    if "input_proj" in parts:
        sd.update(dict(model.input_proj.named_parameters(prefix="input_proj")))
    for m, proj in model.output_proj.items():
        if f"output_proj.{m}" in parts:
            sd.update(dict(proj.named_parameters(prefix=f"output_proj.{m}")))
    if "llm" in parts:  # everything else in the LLM (token rows stay under their own keys)
        seen = {id(t) for t in row_tensors(model).values()}
        sd.update({n: p for n, p in model.llm.named_parameters(prefix="llm") if id(p) not in seen})
    return sd


def delta_tensors(model: ToolLMM, parts) -> dict[str, torch.Tensor]:
    """The model-side tensors of ``delta.safetensors`` for ``parts``: every token row + the parts'."""
    return {**row_tensors(model), **part_tensors(model, parts)}


def _check_parts(model: ToolLMM, parts, where: str) -> list[str]:
    parts = sorted(set(parts) - set(LEGACY_PARTS))
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise DeltaError(f"{where}: unknown delta part(s) {bad}; known: {list(PARTS)}")
    absent = [p for p in parts if p not in model.available_parts() and p != "llm"]
    if absent:
        raise DeltaError(
            f"{where}: part(s) {absent} do not exist in this model (parts: {model.available_parts()})"
        )
    return parts


def save_delta(model: ToolLMM, out_dir: str | os.PathLike, parts=None) -> Path:
    """Write the delta of ``model`` (default parts: ``model.delta_parts``; every token row) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = _check_parts(model, model.delta_parts if parts is None else parts, str(out))
    tensors = {k: v.detach().contiguous().cpu() for k, v in delta_tensors(model, parts).items()}
    meta = {
        "format": FORMAT,
        "parts": json.dumps(parts),
        "token_ids": json.dumps(model.bundle.token_ids.to_dict(), sort_keys=True),
        "tied": json.dumps(model.bundle.tied),
    }
    tmp = out / (DELTA_FILE + ".tmp")
    save_safetensors_file(tensors, tmp, metadata=meta)  # canonical header, the umask's file mode
    os.replace(tmp, out / DELTA_FILE)
    adapter = out / ADAPTER_DIR
    if "lora" in parts:
        tmp_dir = out / (ADAPTER_DIR + ".tmp")
        shutil.rmtree(tmp_dir, ignore_errors=True)
        model.llm.save_pretrained(str(tmp_dir), save_embedding_layers=False)
        respect_umask(tmp_dir)
        shutil.rmtree(adapter, ignore_errors=True)
        os.replace(tmp_dir, adapter)
    elif adapter.exists():
        shutil.rmtree(adapter)
    log.info("delta %s: parts %s, %d tensors", out, parts, len(tensors))
    return out


def delta_size_bound(model: ToolLMM, parts) -> int:
    """Upper bound in bytes of the weight files of a delta without the ``llm`` part (see module doc)."""
    tensors = delta_tensors(model, parts)
    n = sum(t.numel() * t.element_size() for t in tensors.values())
    if "lora" in parts:
        n += sum(p.numel() * p.element_size() for name, p in model.llm.named_parameters() if "lora_" in name)
    return n + HEADER_SLACK


def adapter_dir(delta_dir: str | os.PathLike) -> Path:
    """Where a delta's peft adapter lives: ``adapter/`` in a stage folder; the folder itself in a release
    (peft's ``from_pretrained(folder)`` and the Hub's snippet read the adapter files at the root)."""
    d = Path(delta_dir)
    if not (d / ADAPTER_DIR).is_dir() and (d / "adapter_config.json").is_file():
        return d
    return d / ADAPTER_DIR


def delta_weight_bytes(delta_dir: str | os.PathLike) -> int:
    d = Path(delta_dir)
    files = [d / DELTA_FILE, adapter_dir(d) / "adapter_model.safetensors"]
    return sum(f.stat().st_size for f in files if f.exists())


def load_delta(model: ToolLMM, delta_dir: str | os.PathLike) -> DeltaLoadReport:
    """Load a delta strictly into ``model`` (see module doc); raises :class:`DeltaError` naming the problem."""
    from safetensors import SafetensorError, safe_open

    d = Path(delta_dir)
    f = d / DELTA_FILE
    if not f.is_file():
        raise FileNotFoundError(f"no delta at {f}")
    try:
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata() or {}
            if meta.get("format") != FORMAT:
                raise DeltaError(f"{f}: format {meta.get('format')!r}, expected {FORMAT!r}")
            _check_token_ids(json.loads(meta["token_ids"]), model.bundle.token_ids.to_dict(), f)
            parts = _check_parts(model, json.loads(meta["parts"]), str(f))
            want = delta_tensors(model, parts)
            keys = list(h.keys())
            unexpected = sorted(set(keys) - set(want))
            if unexpected:
                raise DeltaError(
                    f"{f}: unexpected key(s) {unexpected[:10]} (not in this model's parts {parts})"
                )
            missing = sorted(set(want) - set(keys))
            if missing:
                raise DeltaError(f"{f}: missing key(s) {missing[:10]} of part(s) {parts}")
            loaded = {k: h.get_tensor(k) for k in keys}
    except SafetensorError as e:  # truncated or damaged (even when the manifest was rewritten to match)
        raise DeltaError(f"{f}: not a readable safetensors file ({e})") from None
    except (KeyError, ValueError) as e:
        if isinstance(e, DeltaError):
            raise
        raise DeltaError(f"{f}: damaged metadata ({type(e).__name__}: {e})") from None
    for k, t in loaded.items():
        if tuple(t.shape) != tuple(want[k].shape):
            raise DeltaError(f"{f}: {k} has shape {tuple(t.shape)}, the model expects {tuple(want[k].shape)}")
    with torch.no_grad():
        for k, t in loaded.items():
            want[k].copy_(t.to(device=want[k].device, dtype=want[k].dtype))
    if "lora" in parts:
        _load_lora(model, adapter_dir(d))
    model.delta_parts |= set(parts)
    not_saved = [p for p in model.available_parts() if p not in parts]
    expected_missing = sorted(part_tensors(model, not_saved))
    if "lora" in not_saved:
        expected_missing += sorted(n for n, _ in model.llm.named_parameters() if "lora_" in n)
    log.info(
        "loaded delta %s: parts %s; %d expected-missing keys (parts %s keep their init)",
        d,
        parts,
        len(expected_missing),
        not_saved,
    )
    return DeltaLoadReport(parts, expected_missing)


def _check_token_ids(saved: dict, current: dict, where: Path) -> None:
    if saved == current:
        return
    diffs = []
    for group in ("placeholder", "signal", "tool"):
        a, b = saved.get(group, {}), current.get(group, {})
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                diffs.append(f"{group} {name}: delta {a.get(name)} vs tokenizer {b.get(name)}")
    raise DeltaError(f"{where}: token ids differ from this tokenizer's (NExT-GPT #47): " + "; ".join(diffs))


def _load_lora(model: ToolLMM, adapter: Path) -> None:
    from peft import load_peft_weights, set_peft_model_state_dict

    cfg_file = adapter / "adapter_config.json"
    if not cfg_file.is_file():
        raise DeltaError(f"{adapter}: the delta lists part 'lora' but has no adapter_config.json")
    saved = json.loads(cfg_file.read_text(encoding="utf-8"))
    cur = model.llm.peft_config["default"]
    for key, now in (("r", cur.r), ("lora_alpha", cur.lora_alpha), ("target_modules", cur.target_modules)):
        was = saved.get(key)
        if key == "target_modules":
            was, now = sorted(was or []), sorted(now or [])
        if was != now:
            raise DeltaError(f"{cfg_file}: {key} = {was}, but model.llm.lora has {now}")
    try:
        with naming_refused_pickles("adapter", adapter):  # peft reads an adapter_model.bin weights_only
            weights = load_peft_weights(str(adapter), device="cpu")
    except UserError:
        raise
    except Exception as e:  # damaged safetensors / zip archives: no common type
        files = ", ".join(sorted(p.name for p in adapter.glob("adapter_model.*"))) or "no weights file"
        raise DeltaError(f"{adapter} ({files}): adapter weights not loadable: {type(e).__name__}: {e}") from e
    result = set_peft_model_state_dict(model.llm, weights)
    if result.unexpected_keys:
        raise DeltaError(f"{adapter}: unexpected adapter key(s) {sorted(result.unexpected_keys)[:10]}")
    missing = sorted(k for k in result.missing_keys if "lora_" in k)
    if missing:
        raise DeltaError(f"{adapter}: missing adapter key(s) {missing[:10]}")
