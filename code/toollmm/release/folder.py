"""Release a stage folder as a Hugging Face Hub folder and check it (``toollmm.release.upload`` uploads it).

A release folder IS a stage folder (``toollmm.load`` reads it like any other) plus what the Hub shows::

    README.md           model card (Hub YAML metadata; see toollmm.release.card)
    config.json         toollmm's model config, base models (Hub id or name + URL, licence, sha256),
                        new-token row ids, file sha256s
    stage.json          the loader's manifest, re-written for the released files
    config.yaml         the saved config with each base model by Hub id where it has one
    tokenizer/          base tokenizer + toollmm's added tokens + chat template
    delta.safetensors   input/output projections + new-token rows (never the base vocabulary)
    adapter_config.json the LoRA adapter in peft's format AT THE ROOT (a stage folder's adapter/), so
    adapter_model.safetensors   ``PeftConfig.from_pretrained(repo)`` / ``PeftModel.from_pretrained(base,
                        repo)`` (the Hub's peft snippet) work; base_model_name_or_path = the LLM's Hub id
    merged/             only with ``merge=True``: the whole LLM, LoRA and token rows merged in

How the released config names base models: a base trained from its documented local copy
(``pretrained_checkpoint/...``, see ``toollmm.checkpoint.bases.KNOWN_BASES``) or mapped with ``base_ids`` is
written as its Hub id; the loader then uses ``pretrained_checkpoint/<its place>`` when that copy exists
(``checkpoint.bases.local_base_overrides``), else lets transformers / diffusers fetch the id. ImageBind has
no Hub id: the config keeps its documented path and the card gives its download URL. Any other base stays as
the path it was trained from (by name in the card, with its sha256).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from toollmm import __version__
from toollmm.core.errors import UserError
from toollmm.core.files import respect_umask
from toollmm.core.paths import REPO_ROOT, resolve

from ..checkpoint.bases import (
    BY_HUB_ID,
    IMAGEBIND_PATH,
    KNOWN_BASES,
    ROLES,
    BaseInfo,
    config_key,
    known_base,
    tree_get,
)
from ..checkpoint.bases import WEIGHT_SUFFIXES as BASE_WEIGHT_SUFFIXES
from ..checkpoint.stage import MANIFEST, file_hashes, read_manifest

log = logging.getLogger(__name__)

FORMAT = "toollmm-release/1"
DELTA_PREFIXES = ("token_rows.", "input_proj.", "output_proj.")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
#: file names that base models ship their weights under (never in a release outside merged/)
BASE_WEIGHT_NAMES = ("model", "pytorch_model", "diffusion_pytorch_model", "imagebind")
WEIGHT_SUFFIXES = (*BASE_WEIGHT_SUFFIXES, ".gguf")  # .gguf: never a base we hash, never in a release


class ReleaseError(UserError, ValueError):
    """A checkpoint that cannot be released as it is, or a release folder that breaks a rule."""


# ------------------------------------------------------------------------------------- base models
def describe_bases(tree: dict, manifest: dict, base_ids: dict[str, str] | None = None) -> dict[str, dict]:
    """One entry per base model the config uses: how the release refers to it (``ref``: what the
    released config.yaml holds), Hub id or name (+ URL), licence, and the sha256 recorded at training."""
    base_ids = dict(base_ids or {})
    bad = sorted(set(base_ids) - set(ROLES))
    if bad:
        raise ReleaseError(f"--base-id: unknown role(s) {bad}; roles: {', '.join(ROLES)}")
    recorded = manifest.get("base_models", {})
    enc = tree["model"]["encoder"]
    out: dict[str, dict] = {}
    for role in ROLES:
        path = tree_get(tree, config_key(role))
        if role == "encoder" and path is None:
            name = f"ImageBind architecture, preset {enc['preset']!r}, random init (seed {enc['seed']})"
            out[role] = {"name": name, "ref": None, "license": "cc-by-nc-4.0", "sha256": None}
        elif path is not None:
            ident = (
                recorded.get(role) if role in ("llm", "encoder") else recorded.get("decoders", {}).get(role)
            )
            out[role] = _entry(role, str(path), (ident or {}).get("sha256"), enc, base_ids.get(role))
    return out


def _entry(role: str, path: str, sha256: str | None, enc: dict, hub_id: str | None) -> dict:
    entry: dict = {"trained_with": path, "sha256": sha256}
    known = known_base(path)
    if role == "encoder" and enc.get("preset") == "huge":  # strict keys + huge dims: it is ImageBind-huge
        known = (IMAGEBIND_PATH, KNOWN_BASES[IMAGEBIND_PATH])
    if hub_id is not None:
        info = BY_HUB_ID.get(hub_id, (None, BaseInfo(hub_id.split("/")[-1], hub_id, "unknown")))[1]
        entry.update(name=info.name, hub_id=hub_id, ref=hub_id, license=info.license)
    elif known is not None:
        rel, info = known
        entry.update(name=info.name, license=info.license, ref=info.hub_id or rel)
        entry.update({"hub_id": info.hub_id} if info.hub_id else {"url": info.url})
    elif role == "encoder":  # the ImageBind code is CC-BY-NC too, whatever the weights
        entry.update(
            name=f"ImageBind ({enc.get('preset')}) {Path(path).name}", ref=path, license="cc-by-nc-4.0"
        )
    else:
        entry.update(name=Path(path).name or path, ref=path, license="unknown")
    return entry


def released_config(tree: dict, bases: dict[str, dict]) -> dict:
    """The config.yaml of the release: base models by ``ref``, paths inside the repo made relative,
    the feature cache back at its default place."""
    tree = copy.deepcopy(tree)
    for role, entry in bases.items():
        keys = config_key(role)
        if entry.get("ref") is not None:
            tree_get(tree, keys[:-1])[keys[-1]] = entry["ref"]
    tree["model"]["feature_cache"]["dir"] = ".cache/features"
    tree["model"]["llm"]["tokenizer"] = None  # the loader uses the folder's tokenizer/
    return _portable(tree)


def _portable(value):
    """Absolute paths inside the repo -> repo-relative (the loader resolves them against the repo root)."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    root = str(REPO_ROOT) + os.sep
    if isinstance(value, str) and value.startswith(root):
        return value[len(root) :]
    return value


# ------------------------------------------------------------------------------------- the folder
@dataclass
class Release:
    folder: Path
    repo_id: str
    files: list[tuple[str, int]] = field(default_factory=list)  # (relative path, bytes), all of them
    bases: dict[str, dict] = field(default_factory=dict)

    @property
    def merged_files(self) -> list[tuple[str, int]]:
        return [f for f in self.files if f[0].startswith("merged/")]


def release_files(folder: str | os.PathLike) -> list[tuple[str, int]]:
    d = Path(folder)
    return [(str(p.relative_to(d)), p.stat().st_size) for p in sorted(d.rglob("*")) if p.is_file()]


def _copy_adapter(src: Path, dst: Path, base_ref: str) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    missing = [f for f in ADAPTER_FILES if not (src / f).is_file()]
    if missing:
        raise ReleaseError(f"{src}: the delta lists part 'lora' but {missing} is missing")
    cfg = json.loads((src / "adapter_config.json").read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base_ref  # peft's own README.md stub is not copied
    (dst / "adapter_config.json").write_text(
        json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    shutil.copy2(src / "adapter_model.safetensors", dst / "adapter_model.safetensors")


def _prepare_out(out: Path) -> Path:
    """A fresh temp folder next to ``out``; ``out`` itself may only be replaced if it is a release."""
    if out.exists() and any(out.iterdir()):
        cfg = out / "config.json"
        fmt = json.loads(cfg.read_text(encoding="utf-8")).get("format") if cfg.is_file() else None
        if fmt != FORMAT:
            raise ReleaseError(
                f"--out {out}: exists and is not a toollmm release folder; choose another path"
            )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def build_release(
    stage_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    repo_id: str,
    *,
    base_ids: dict[str, str] | None = None,
    license: str = "cc-by-nc-4.0",
    datasets: list[str] = (),
    merge: bool = False,
    merge_dtype: str = "auto",
    evaluation: list[str] = (),
) -> Release:
    """Write the release folder of ``stage_dir`` into ``out_dir`` (replaced only once the new folder is
    complete and checked; a failed build leaves ``out_dir`` as it was). ``evaluation``: the card's
    evaluation tables (Markdown; ``toollmm.eval.tables.eval_tables`` renders a stage's results)."""
    from .card import write_card

    src, out = Path(stage_dir), Path(out_dir)
    manifest = read_manifest(src)  # every file checked against its sha256
    if "llm" in manifest.get("parts", []):
        raise ReleaseError(
            f"{src}: this delta holds the whole LLM (part 'llm'), i.e. base weights; release a stage "
            "trained on top of it instead (train.export_llm writes such an LLM as a base folder)"
        )
    tree = yaml.safe_load((src / "config.yaml").read_text(encoding="utf-8"))
    bases = describe_bases(tree, manifest, base_ids)
    tmp = _prepare_out(out)
    try:
        config = _write_loadable(src, tmp, manifest, tree, bases, repo_id)
        if merge:
            write_merged(src, tmp / "merged", merge_dtype)
        write_card(tmp, src, config, license=license, datasets=list(datasets), evaluation=list(evaluation))
        respect_umask(tmp)  # copies of 0600 files (older stage folders, safetensors) readable as usual
        release = Release(tmp, repo_id, release_files(tmp), bases)
        check_release(release)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    release.folder = out
    log.info("release folder %s: %d files", out, len(release.files))
    return release


def _write_loadable(src: Path, tmp: Path, manifest: dict, tree: dict, bases: dict, repo_id: str) -> dict:
    """The stage-folder part (tokenizer, delta, adapter, config.yaml, stage.json) and config.json."""
    from toollmm.core.tokens import GROUPS, TokenIds

    from ..checkpoint.delta import adapter_dir

    shutil.copytree(src / "tokenizer", tmp / "tokenizer")
    shutil.copy2(src / "delta.safetensors", tmp / "delta.safetensors")
    adapter = adapter_dir(src)  # a stage folder's adapter/ (or a release's root)
    if (adapter / "adapter_config.json").is_file():  # to the root: what peft and the Hub's snippet read
        _copy_adapter(adapter, tmp, bases["llm"]["ref"] or bases["llm"]["name"])
    released = released_config(tree, bases)
    (tmp / "config.yaml").write_text(yaml.safe_dump(released, sort_keys=False), encoding="utf-8")
    public = {r: {k: v for k, v in b.items() if k != "trained_with"} for r, b in bases.items()}
    new_manifest = {**manifest, "files": file_hashes(tmp), "base_models": public}
    new_manifest["release"] = {"repo_id": repo_id, "toollmm": __version__, "from": src.name}
    (tmp / MANIFEST).write_text(json.dumps(new_manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    ids = TokenIds(**manifest["token_ids"])
    config = {
        "format": FORMAT,
        "toollmm_version": __version__,
        "repo_id": repo_id,
        "stage": manifest.get("stage"),
        "parts": manifest.get("parts"),
        "base_models": public,
        "token_ids": manifest["token_ids"],
        "token_rows": {g: ids.group_ids(g) for g in GROUPS},  # row order of token_rows.*.<group>
        "model": released["model"],
        "files": new_manifest["files"],
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    return config


def write_merged(stage_dir: Path, out: Path, dtype: str = "auto") -> Path:
    """The LLM with LoRA merged and the new token rows written into its matrices (checkpoint.stage.export_llm),
    saved in ``dtype`` ('auto' = the base LLM's own dtype from its config.json, else float32)."""
    import torch

    from ..checkpoint.stage import export_llm, load_stage

    stage = load_stage(stage_dir, overrides=["model.llm.dtype=float32"])
    if dtype == "auto":
        base = resolve(stage.config.model.llm.path)
        cfg = json.loads((base / "config.json").read_text()) if (base / "config.json").is_file() else {}
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ReleaseError(f"--merge-dtype: {dtype!r} is not float32, bfloat16 or float16")
    return export_llm(stage.model, out, dtype=getattr(torch, dtype), copy=False)


# ------------------------------------------------------------------------------------------ checks
def tensor_report(path: str | os.PathLike) -> dict[str, dict]:
    """``{key: {"shape", "numel", "all_zero"}}`` for every tensor of a safetensors file."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            out[k] = {"shape": list(t.shape), "numel": t.numel(), "all_zero": bool((t == 0).all())}
    return out


def check_release(release: Release) -> None:
    """The rules every release obeys (raise :class:`ReleaseError` naming the file / key):
    no base-model weight files outside merged/, no empty tensors, delta keys only from the delta's parts,
    adapter keys LoRA only and not all-zero (an adapter saved empty, LLaVA #1734), no all-zero matrices."""
    d = release.folder
    problems = []
    for rel, _size in release.files:
        name = Path(rel).name
        if rel.startswith("merged/"):
            continue
        if name.endswith(WEIGHT_SUFFIXES) and rel not in ("delta.safetensors", "adapter_model.safetensors"):
            problems.append(
                f"{rel}: a weight file that is not part of a delta (base weights are never released)"
            )
        if name.startswith(BASE_WEIGHT_NAMES) and name.endswith(WEIGHT_SUFFIXES):
            problems.append(f"{rel}: named like a base model's weights")
    delta = tensor_report(d / "delta.safetensors")
    problems += [
        f"delta.safetensors: {k} is not a delta key" for k in delta if not k.startswith(DELTA_PREFIXES)
    ]
    adapter = d / "adapter_model.safetensors"
    reports = {"delta.safetensors": delta}
    if adapter.is_file():
        reports["adapter_model.safetensors"] = rep = tensor_report(adapter)
        problems += [f"adapter: {k} is not a LoRA weight" for k in rep if "lora_" not in k]
        b = [v for k, v in rep.items() if "lora_B" in k]
        if b and all(v["all_zero"] for v in b):
            problems.append(
                "adapter: every lora_B is all zero: the LoRA adapter is a no-op (never trained, or saved empty)"
            )
    for fname, rep in reports.items():
        for k, v in rep.items():
            if v["numel"] == 0:
                problems.append(f"{fname}: {k} is empty (shape {v['shape']})")
            elif v["all_zero"] and len(v["shape"]) >= 2 and "lora_B" not in k:
                problems.append(f"{fname}: {k} {v['shape']} is all zero")
    problems += _same_as_base_files(release)
    if problems:
        raise ReleaseError(f"{d}: " + "; ".join(problems[:10]))


def _same_as_base_files(release: Release) -> list[str]:
    """Release files byte-identical to a local base weight file (compared by size, then sha256)."""
    from toollmm.core.files import sha256_file

    sizes = {size: rel for rel, size in release.files if not rel.startswith("merged/")}
    hits = []
    for entry in release.bases.values():
        base = resolve(entry.get("trained_with")) if entry.get("trained_with") else None
        if base is None or not base.exists():
            continue
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.suffix in WEIGHT_SUFFIXES]
        for f in files:
            rel = sizes.get(f.stat().st_size)
            if rel and sha256_file(f) == sha256_file(release.folder / rel):
                hits.append(f"{rel}: identical to the base model file {f}")
    return hits
