"""Stage folders: the one layout that training writes, inference loads and release publishes.

``outputs/<run>/stage_N/`` holds the loadable result of stage N, CUMULATIVE over stages 1..N::

    stage.json            manifest, written last (atomically): format, stage, files with sha256, base models
    config.yaml           the resolved configuration of the run that wrote it
    tokenizer/            base tokenizer + toollmm's tokens + the chat template
    delta.safetensors     new token rows + projections (+ the whole LLM for a stand-in LM trained with `llm`)
    adapter/              the LoRA adapter in peft's own format (when LoRA was trained or loaded)
    metrics.jsonl, loss.png, ranks.json, config_resolved.txt, wandb/, eval/, ckpt/
                          training by-products (not part of the loadable set)

A stage folder is loaded by :func:`load_stage` and nothing else: it rebuilds the model from the saved
config (base weights from their paths or Hub ids), checks every file against the manifest's sha256 (a
save interrupted between files is refused, never half-loaded) and loads the delta strictly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from toollmm.core import configlib
from toollmm.core.config import Config, Loaded, load_config
from toollmm.core.errors import UserError, read_text
from toollmm.core.files import respect_umask, sha256_file
from toollmm.core.paths import resolve

from .bases import base_models, hash_tree, local_base_overrides

log = logging.getLogger(__name__)

FORMAT = "toollmm-stage/1"
MANIFEST = "stage.json"
#: a release holds the adapter's two files at its root instead of adapter/ (checkpoint.delta.adapter_dir)
LOADABLE = (
    "config.yaml",
    "tokenizer",
    "delta.safetensors",
    "adapter",
    "adapter_config.json",
    "adapter_model.safetensors",
)


class StageError(UserError, ValueError):
    """A stage folder that cannot be loaded as it is."""


class BaseMismatchError(StageError):
    """The base models a stage would be loaded on are not the ones it was trained on."""


def _recorded_bases(manifest: dict, model_cfg) -> list[tuple[str, dict | None, str | None]]:
    """(config key, identity recorded at training, path the config points at now) per base model."""
    rec = manifest.get("base_models") or {}
    out = [
        ("model.llm.path", rec.get("llm"), model_cfg.llm.path),
        ("model.encoder.checkpoint", rec.get("encoder"), model_cfg.encoder.checkpoint),
    ]
    for m, ident in sorted((rec.get("decoders") or {}).items()):
        dec = model_cfg.decoders.get(m)
        out.append((f"model.decoders.{m}.path", ident, dec.path if dec is not None else None))
    return out


def check_bases(manifest: dict, model_cfg, stage_dir: str | os.PathLike) -> list[str]:
    """Refuse to load a stage on base models other than the ones it was trained on: the sha256 recorded
    in its manifest must match the base each ``model.*`` path points at now (hashes memoised by path,
    size and mtime, so a 13 GB base is read once). A delta on another LLM loads "fine" and writes garbage.
    With ``model.allow_base_mismatch=true`` a mismatch is a warning. Bases given as Hub ids (nothing local
    to hash) and bases recorded without a hash are not checked. Returns the mismatches found."""
    problems = []
    for key, ident, current in _recorded_bases(manifest, model_cfg):
        want = (ident or {}).get("sha256")
        if not want or not current:
            continue
        p = resolve(current)
        if not p.exists():
            log.debug("%s=%s: not a local path, base hash not checked", key, current)
            continue
        got = hash_tree(p)
        if got != want:
            problems.append(
                f"{key}={current} has sha256 {got}, but the stage was trained on sha256 {want} "
                f"({ident.get('path') or ident.get('hub_id')})"
            )
    if problems:
        msg = f"{stage_dir}: base model(s) differ from the ones this stage was trained on: " + "; ".join(
            problems
        )
        if not model_cfg.allow_base_mismatch:
            raise BaseMismatchError(
                f"{msg}. A delta on other base weights gives garbage: point the path(s) at the bases it was "
                "trained on, or pass model.allow_base_mismatch=true to load it anyway"
            )
        log.warning("%s (loading anyway: model.allow_base_mismatch=true)", msg)
    return problems


# ----------------------------------------------------------------------------------- writing
def file_hashes(stage_dir: Path) -> dict[str, str]:
    """sha256 of every file of the loadable set in ``stage_dir`` (the manifest's ``files``)."""
    out = {}
    for name in LOADABLE:
        p = stage_dir / name
        if p.is_file():
            out[name] = sha256_file(p)
        elif p.is_dir():
            for f in sorted(q for q in p.rglob("*") if q.is_file()):
                out[str(f.relative_to(stage_dir))] = sha256_file(f)
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_stage(model, cfg: Config, stage_dir: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the loadable set of ``model`` into ``stage_dir`` (rank 0 only; parameters must be whole,
    i.e. gathered under ZeRO-3). The manifest goes last, so a killed save is detected on load."""
    from ..data.chat_template import install_chat_template
    from .delta import save_delta

    out = Path(stage_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the folder is "being written"
    _write_atomic(out / "config.yaml", yaml.safe_dump(configlib.to_dict(cfg), sort_keys=False))
    tok = model.bundle.tokenizer
    install_chat_template(
        tok,
        cfg.model.chat_template,
        model.bundle.contract,
        tool_format=cfg.model.tool_format,
        system_prompt=cfg.model.system_prompt,
    )
    tmp = out / "tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    os.replace(tmp, out / "tokenizer")
    save_delta(model, out)
    manifest = {
        "format": FORMAT,
        "stage": cfg.run.stage,
        "run": cfg.run.name,
        "parts": sorted(model.delta_parts),
        "token_ids": model.bundle.token_ids.to_dict(),
        "base_models": base_models(cfg),
        "files": file_hashes(out),
        **(extra or {}),
    }
    _write_atomic(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    log.info("stage folder %s: parts %s", out, manifest["parts"])
    return out


# ----------------------------------------------------------------------------------- loading
@dataclass
class LoadedStage:
    model: object  # toollmm.model.toollmm_model.ToolLMM
    config: Config
    manifest: dict
    path: Path

    @property
    def tokenizer(self):
        return self.model.bundle.tokenizer


def read_manifest(stage_dir: str | os.PathLike, verify: bool = True) -> dict:
    d = Path(stage_dir)
    f = d / MANIFEST
    if not f.is_file():
        hint = " (a save was interrupted, or this is not a stage folder)" if d.is_dir() else ""
        raise StageError(f"{d}: no {MANIFEST}{hint}")
    try:
        manifest = json.loads(read_text(f))
    except ValueError as e:  # not UTF-8 (names line and byte offset) or not JSON
        raise StageError(f"{f}: not a readable manifest ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise StageError(f"{f}: not a stage manifest (expected an object with 'format' and 'files')")
    if manifest.get("format") != FORMAT:
        raise StageError(f"{f}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if verify:
        files = file_hashes(d)
        bad = sorted(
            k for k in set(files) | set(manifest["files"]) if files.get(k) != manifest["files"].get(k)
        )
        if bad:
            raise StageError(
                f"{d}: files differ from the manifest: {bad[:5]} (interrupted save or edited folder)"
            )
    return manifest


def stage_config(
    stage_dir: str | os.PathLike, overrides: list[str] = (), config_files: list[str | os.PathLike] = ()
) -> Config:
    """The saved config of a stage folder, then each YAML in ``config_files`` (e.g. config/inference.yaml),
    then dotted overrides (e.g. inference settings), with nothing pinned (:func:`load_stage_config`; the
    layering itself is ``toollmm.core.config.load_config``'s, the one implementation). ``model.allow_base_mismatch``
    is never taken from the saved config: only a layer given here allows a base mismatch."""
    return load_stage_config(stage_dir, overrides, config_files, pinned=()).config


def _saved_tree(d: Path) -> dict:
    """The folder's saved config.yaml, less what a checkpoint may not decide for the user."""
    tree = configlib.load_yaml(d / "config.yaml")  # read as every config layer is (errors name the file)
    inference = tree.get("inference") or {}
    saved_imports = inference.pop("tool_imports", None) or []
    # which code to import is the user's choice, never the checkpoint's; a module of this package (the
    # demo's tools, toollmm.demo.toolset) is code the user installed with it, so it stays
    own = [s for s in saved_imports if isinstance(s, str) and s.partition(":")[0].split(".")[0] == "toollmm"]
    if own:
        inference["tool_imports"] = own
    dropped = [s for s in saved_imports if s not in own]
    if dropped:
        log.warning(
            "%s: ignoring inference.tool_imports %s saved with the checkpoint; pass it again to use it",
            d / "config.yaml",
            dropped,
        )
    (tree.get("model") or {}).pop("allow_base_mismatch", None)  # a permission for one load only
    return tree


def load_stage_config(
    stage_dir: str | os.PathLike,
    overrides: list[str] = (),
    config_files: list[str | os.PathLike] = (),
    pinned: list[tuple[str, str]] | None = None,
) -> Loaded:
    """The config :func:`load_stage` builds, with each value's source (``--print-config``): the same
    layering as training (``toollmm.core.config.load_config``) over the folder's saved ``config.yaml`` instead
    of config/model.yaml. ``pinned`` (default: what ``load_stage`` pins: the folder's tokenizer, local
    copies of Hub bases) comes right after the saved config; files and overrides after that."""
    d = Path(stage_dir)
    if pinned is None:
        pinned = [(f"model.llm.tokenizer={d / 'tokenizer'}", f"{d / 'tokenizer'}")]
        pinned += [(o, "local copy of a Hub base") for o in local_base_overrides(d)]
    if not (d / "config.yaml").is_file():
        raise StageError(f"{d}: no config.yaml (not a stage or release folder)")
    try:
        source = str(d.resolve().relative_to(resolve(".")) / "config.yaml")
    except ValueError:
        source = str(d / "config.yaml")
    return load_config(
        config_files=list(config_files),
        overrides=list(overrides),
        base=(_saved_tree(d), source),
        pinned=list(pinned),
    )


def describe_stage_config(
    path_or_id: str | os.PathLike, overrides: list[str] = (), config_files: list[str | os.PathLike] = ()
) -> str:
    """``--print-config`` of inference.py / app.py: what ``load_stage`` would build, each value with its
    source and help (the same text as ``train.py --print-config``)."""
    return load_stage_config(_local_folder(path_or_id), overrides, config_files).describe()


def load_into(model, stage_dir: str | os.PathLike, verify: bool = True):
    """Load a stage folder's delta into an already built ``model`` (``train.init_from``)."""
    from .delta import load_delta

    read_manifest(stage_dir, verify=verify)
    return load_delta(model, stage_dir)


def load_stage(
    path_or_id: str | os.PathLike,
    *,
    overrides: list[str] = (),
    config_files: list[str | os.PathLike] = (),
    with_encoder: bool = False,
    device=None,
    verify: bool = True,
) -> LoadedStage:
    """THE loader: a stage or release folder (or a Hub id of a release) -> ready model. ``config_files``
    and ``overrides`` are layered on the saved config (inference and decoder settings; a changed
    architecture fails the strict delta load). Base models other than the ones the stage was trained on
    are refused (:func:`check_bases`) unless ``model.allow_base_mismatch=true``."""
    from ..model.toollmm_model import build_model

    d = _local_folder(path_or_id)
    manifest = read_manifest(d, verify=verify)
    # the folder's tokenizer, Hub ids of known bases -> their pretrained_checkpoint/ copies, then the caller's
    cfg = load_stage_config(d, overrides, config_files).config
    check_bases(manifest, cfg.model, d)
    # training-only kernels (liger-kernel, CUDA): an evaluation model never runs them, and a stage trained
    # with them on a GPU host must load anywhere
    cfg.model.llm.fused_kernels = False
    model = build_model(cfg.model, with_encoder=with_encoder)
    if device is not None:
        model.to(device)
    load_into(model, d, verify=False)
    model.eval()
    return LoadedStage(model, cfg, manifest, d)


def _local_folder(path_or_id: str | os.PathLike) -> Path:
    p = resolve(path_or_id)
    if p.exists():
        return p
    text = str(path_or_id)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        wanted = [MANIFEST, *LOADABLE, *(f"{name}/*" for name in LOADABLE)]  # not a release's merged/
        try:
            return Path(snapshot_download(text, allow_patterns=wanted))
        except Exception as e:  # offline, unknown repo, no access
            raise StageError(f"{text}: not a local folder, and the Hub download failed: {e}") from None
    raise StageError(f"{p}: no such stage folder")


def export_llm(model, out_dir: str | os.PathLike, *, dtype=None, copy: bool = True) -> Path:
    """Write the model's LLM as a plain Hugging Face folder (weights + tokenizer), the way a base model
    is shipped: LoRA merged, trained token rows written into the embedding and lm_head matrices.
    Used for the demo's stand-in LM, which later stages then load exactly like Vicuna, and by
    ``release.py --merge``. ``dtype``: cast the merged weights before saving; ``copy=False`` merges in
    place (the model's LLM is consumed: half the peak memory, for a model that is thrown away after)."""
    import copy as copy_module

    import torch
    from torch import nn

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    llm = copy_module.deepcopy(model.llm) if copy else model.llm
    if model.bundle.lora:
        llm = llm.merge_and_unload()
    emb, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    plain = nn.Embedding(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx)
    with torch.no_grad():
        plain.weight.copy_(emb.weight)
        plain.weight[emb.token_rows.ids] = emb.token_rows.matrix().to(plain.weight.dtype)
    tied = head is not None and head.weight is emb.weight
    llm.set_input_embeddings(plain)
    if head is not None and not tied:
        lin = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(head.weight)
            lin.weight[head.token_rows.ids] = head.token_rows.matrix().to(lin.weight.dtype)
            if head.bias is not None:
                lin.bias.copy_(head.bias)
        llm.set_output_embeddings(lin)
    elif tied:
        llm.tie_weights()
    if dtype is not None:
        llm.to(dtype)
    llm.save_pretrained(str(tmp))
    model.bundle.tokenizer.save_pretrained(str(tmp))
    respect_umask(tmp)  # safetensors writes 0600
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log.info("exported the LLM to %s", out)
    return out
