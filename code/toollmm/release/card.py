"""The model card (``README.md``) of a release folder: Hub YAML metadata, what the files are, the base
models and their licences (ImageBind's CC-BY-NC noted), the training stages and their data (following
``train.init_from`` back through the stage folders that still exist), the evaluation tables the caller
passes in (``code/release.py`` renders them with ``toollmm.eval.tables.eval_tables``: the card knows no
benchmark) and usage snippets that the tests run as they are written.
"""

from __future__ import annotations

import json
import logging
import string
from pathlib import Path

import yaml

from toollmm.core.paths import REPO_ROOT, resolve

log = logging.getLogger(__name__)

TAGS = ["toollmm", "multimodal", "any-to-any", "tool-use", "lora", "imagebind"]
LICENSE_NAMES = {
    "llama2": "Llama 2 Community Licence",
    "creativeml-openrail-m": "CreativeML OpenRAIL-M",
    "cc-by-nc-4.0": "CC-BY-NC 4.0",
    "cc-by-nc-sa-4.0": "CC-BY-NC-SA 4.0",
}
ROLE_TEXT = {
    "llm": "LLM",
    "encoder": "encoder",
    "image": "image decoder",
    "video": "video decoder",
    "audio": "audio decoder",
}


def human_size(n: int) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


# --------------------------------------------------------------------------------- training history
def stage_history(stage_dir: str | Path) -> list[dict]:
    """Stages 1..N of a cumulative stage folder, oldest first, from each folder's config and manifest
    (following ``train.init_from``; a folder that no longer exists ends the walk)."""
    out, seen = [], set()
    d = Path(stage_dir)
    while d is not None and d.is_dir() and d.resolve() not in seen:
        seen.add(d.resolve())
        cfg = yaml.safe_load((d / "config.yaml").read_text(encoding="utf-8")) or {}
        mf = d / "stage.json"
        manifest = json.loads(mf.read_text(encoding="utf-8")) if mf.is_file() else {}
        train, data = cfg.get("train", {}), cfg.get("data", {})
        out.append(
            {
                "stage": cfg.get("run", {}).get("stage"),
                "trainable": train.get("trainable", []),
                "sources": [
                    {
                        "name": s.get("name") or Path(str(s["path"])).stem,
                        "weight": s.get("weight", 1.0),
                        "task": s.get("task", "auto"),
                    }
                    for s in data.get("train", [])
                ],
                "steps": manifest.get("steps"),
                "val": manifest.get("val", {}),
            }
        )
        nxt = train.get("init_from")
        d = resolve(nxt) if nxt else None
    return out[::-1]


def _stages_md(history: list[dict]) -> str:
    rows = [
        "| stage | trained | data (source × weight, task) | steps | held-out loss |",
        "|---|---|---|---|---|",
    ]
    for h in history:
        data = ", ".join(f"{s['name']} ×{s['weight']:g} ({s['task']})" for s in h["sources"]) or "-"
        val = h["val"].get("loss")
        rows.append(
            f"| {h['stage']} | {', '.join(h['trainable']) or '-'} | {data} | {h['steps'] if h['steps'] is not None else '-'} "
            f"| {f'{val:.4f}' if isinstance(val, (int, float)) else '-'} |"
        )
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------- snippets
SNIPPETS = REPO_ROOT / "docs" / "model_card" / "snippets"


def _snippet(name: str, **values: str) -> str:
    """A usage snippet of the card (``docs/model_card/snippets/<name>.py.tmpl`` in the checkout, ``$name``
    placeholders) in a python fence. The snippets are the card's example programs for the reader of a released
    model (they print their answer), so they live with the documents, not in the library package."""
    text = (SNIPPETS / f"{name}.py.tmpl").read_text(encoding="utf-8")
    return "```python\n" + string.Template(text).substitute(values).rstrip("\n") + "\n```"


def toollmm_snippet(repo_id: str) -> str:
    return _snippet("toollmm_usage", repo_id=repo_id)


def peft_snippet(repo_id: str, llm_ref: str, lora: bool) -> str:
    adapter = (
        "model = PeftModel.from_pretrained(base, folder).eval()"
        if lora
        else "model = base.eval()  # this release has no LoRA adapter"
    )
    return _snippet("peft_usage", repo_id=repo_id, llm_ref=llm_ref, adapter=adapter)


# ------------------------------------------------------------------------------------------ the card
def metadata(config: dict, license: str, datasets: list[str]) -> dict:
    hub_ids = [b["hub_id"] for b in config["base_models"].values() if b.get("hub_id")]
    meta: dict = {}
    if hub_ids:
        meta["base_model"] = hub_ids
        meta["base_model_relation"] = "adapter"
    meta.update(license=license, library_name="peft", pipeline_tag="any-to-any", tags=TAGS)
    meta["datasets"] = list(datasets)
    return meta


def _bases_md(bases: dict) -> str:
    rows = [
        "| part | model | where to get it | licence | sha256 of the copy trained with |",
        "|---|---|---|---|---|",
    ]
    for role, b in bases.items():
        if b.get("hub_id"):
            where = f"[`{b['hub_id']}`](https://huggingface.co/{b['hub_id']})"
        elif b.get("url"):
            where = f"{b['url']} (place it at `{b['ref']}`)"
        elif b.get("ref") is None:
            where = "nothing to download (built from the config)"
        else:
            where = f"not on the Hub: `{b['ref']}` (provide it yourself)"
        lic = LICENSE_NAMES.get(b.get("license"), b.get("license") or "unknown")
        sha = f"`{b['sha256'][:16]}…`" if b.get("sha256") else "-"
        rows.append(f"| {ROLE_TEXT[role]} | {b['name']} | {where} | {lic} | {sha} |")
    return "\n".join(rows)


def _files_md(folder: Path) -> str:
    what = {
        "README.md": "this card",
        "config.json": "model config, base models, new-token ids, file sha256s",
        "stage.json": "the loader's manifest (sha256 of every loadable file)",
        "config.yaml": "the full training/inference config, base models by Hub id where they have one",
        "delta.safetensors": "input projection, output projections, new-token embedding and lm_head rows",
        "adapter_config.json": "LoRA adapter config (peft format; `PeftConfig.from_pretrained(REPO)`)",
        "adapter_model.safetensors": "LoRA adapter weights (peft format; `PeftModel.from_pretrained(base, REPO)`)",
    }
    rows = ["| file | what | size |", "|---|---|---|"]
    groups: dict[str, int] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = p.relative_to(folder)
            key = str(rel) if len(rel.parts) == 1 else rel.parts[0] + "/"
            groups[key] = groups.get(key, 0) + p.stat().st_size
    desc = {
        "tokenizer/": "base tokenizer + toollmm's added tokens + chat template",
        "adapter/": "LoRA adapter (peft format)",
        "merged/": "the whole LLM with LoRA and token rows merged in (contains the base LLM's weights)",
    }
    for key, size in sorted(groups.items()):
        rows.append(f"| `{key}` | {what.get(key) or desc.get(key, '')} | {human_size(size)} |")
    return "\n".join(rows)


def card_text(
    folder: Path, stage_dir: Path, config: dict, license: str, datasets: list[str], evaluation: list[str] = ()
) -> str:
    """The card's text; ``evaluation``: Markdown sections (one per result) for its Evaluation section."""
    bases = config["base_models"]
    repo_id, lora = config["repo_id"], (folder / "adapter_config.json").is_file()
    llm = bases["llm"]
    history = stage_history(stage_dir)
    evals = list(evaluation)
    nc = [ROLE_TEXT[r] for r, b in bases.items() if str(b.get("license", "")).startswith("cc-by-nc")]
    parts = [
        "---\n" + yaml.safe_dump(metadata(config, license, datasets), sort_keys=False) + "---",
        f"# {repo_id.split('/')[-1]}",
        "A toollmm model: a frozen ImageBind encoder feeds a trained input projection "
        f"into {llm['name']} with a LoRA adapter; the LLM writes text, tool calls and modality signal tokens, "
        "whose hidden states go through trained output projections into diffusion decoders "
        "(image, video, audio). This repository holds **only what toollmm trained** "
        f"(stage {config['stage']}, parts: {', '.join(config['parts'])}); the base models are not included.",
        "## Files\n\n" + _files_md(folder),
        "## Base models (not included)\n\n" + _bases_md(bases),
        "**Licences.** ImageBind is released by Meta under **CC-BY-NC 4.0** (non-commercial use only); this "
        "model cannot run without it, so the whole system is for non-commercial use"
        + (f" (also: {', '.join(nc)} under non-commercial licences)" if nc else "")
        + f". The released delta is under `{license}`. No base model weights are in this repository"
        + (
            " except `merged/`, which holds the base LLM's weights under its own licence."
            if (folder / "merged").is_dir()
            else "."
        ),
        "**How `config.yaml` names the base models.** A base with a Hub id is written as that id; "
        "`toollmm.load` uses the documented local copy under `pretrained_checkpoint/` when it exists "
        "(see toollmm's `pretrained_checkpoint/README.md`), else transformers/diffusers fetch the id. "
        "ImageBind is expected at `pretrained_checkpoint/imagebind_ckpt/huge/imagebind_huge.pth`. "
        "Copies elsewhere: pass overrides, e.g. "
        '`toollmm.load(REPO, overrides=["model.llm.path=/data/vicuna-7b-v1.5", '
        '"model.encoder.checkpoint=/data/imagebind_huge.pth", "model.decoders.image.path=/data/sd15"])`. '
        "The sha256 above identify the exact weights this delta was trained against.",
        "## Usage\n\nWith toollmm (clone the toollmm repository and run `bash scripts/setup.sh`):\n\n"
        + toollmm_snippet(repo_id),
        "With transformers and peft only (the LLM part). The adapter files sit at the root in peft's format, "
        "so `PeftConfig.from_pretrained(REPO)` and the Hub's own peft snippet load; that snippet puts the "
        "LoRA on the base LLM only, without toollmm's new tokens (their rows are in `delta.safetensors`), so "
        "use this one:\n\n" + peft_snippet(repo_id, llm.get("ref") or llm["name"], lora),
    ]
    if (folder / "merged").is_dir():
        parts.append(
            "The merged LLM serves without peft (the size of the whole LLM): "
            '`AutoModelForCausalLM.from_pretrained(REPO, subfolder="merged")` with '
            '`AutoTokenizer.from_pretrained(REPO, subfolder="merged")`.'
        )
    parts.append("## Training\n\n" + _stages_md(history))
    parts.append(
        "## Evaluation\n\n" + ("\n\n".join(evals) if evals else "No evaluation results were recorded.")
    )
    parts.append(
        "## Limitations\n\nSignal tokens drive the decoders only through toollmm's output projections; "
        "the transformers-only snippet gives the text side. Tool calls are executed by toollmm's agent "
        "(sandboxed registry); the model only writes them."
    )
    return "\n\n".join(parts) + "\n"


def write_card(
    folder: Path,
    stage_dir: Path,
    config: dict,
    *,
    license: str,
    datasets: list[str],
    evaluation: list[str] = (),
) -> Path:
    path = folder / "README.md"
    path.write_text(card_text(folder, stage_dir, config, license, datasets, evaluation), encoding="utf-8")
    return path
