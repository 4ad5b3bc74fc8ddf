"""Base models in a release: which Hub id, name, URL and licence each has, and how the released
config.yaml names them.

How the released config names base models: a base trained from its documented local copy
(``pretrained_checkpoint/...``, see :data:`KNOWN_BASES`) or mapped with ``base_ids`` is written as its Hub id;
the loader then uses ``pretrained_checkpoint/<its place>`` when that copy exists (:func:`local_base_overrides`),
else lets transformers / diffusers fetch the id. ImageBind has no Hub id: the config keeps its documented
path ``pretrained_checkpoint/imagebind_ckpt/huge/imagebind_huge.pth`` and the card gives its download URL.
Any other base stays as the path it was trained from (by name in the card, with its sha256). A user with
copies elsewhere passes overrides: ``toollmm.load(id, overrides=["model.llm.path=/data/vicuna-7b-v1.5"])``.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from toollmm.errors import UserError

from .paths import REPO_ROOT, resolve

log = logging.getLogger(__name__)

IMAGEBIND_PATH = "pretrained_checkpoint/imagebind_ckpt/huge/imagebind_huge.pth"
IMAGEBIND_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
ROLES = ("llm", "encoder", "image", "video", "audio")


class ReleaseError(UserError, ValueError):
    """A checkpoint that cannot be released as it is, or a release folder that breaks a rule."""


@dataclass(frozen=True)
class BaseInfo:
    name: str
    hub_id: str | None
    license: str
    url: str | None = None


#: documented local places (pretrained_checkpoint/README.md) -> what lives there
KNOWN_BASES: dict[str, BaseInfo] = {
    "pretrained_checkpoint/llm_ckpt/vicuna_7b": BaseInfo("Vicuna-7B v1.5", "lmsys/vicuna-7b-v1.5", "llama2"),
    "pretrained_checkpoint/diffusion/stable-diffusion-v1-5": BaseInfo(
        "Stable Diffusion v1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5", "creativeml-openrail-m"
    ),
    "pretrained_checkpoint/diffusion/zeroscope_v2_576w": BaseInfo(
        "ZeroScope v2 576w", "cerspense/zeroscope_v2_576w", "cc-by-nc-4.0"
    ),
    "pretrained_checkpoint/diffusion/audioldm-l-full": BaseInfo(
        "AudioLDM-L full", "cvssp/audioldm-l-full", "cc-by-nc-sa-4.0"
    ),
    IMAGEBIND_PATH: BaseInfo("ImageBind-huge", None, "cc-by-nc-4.0", IMAGEBIND_URL),
}
_BY_HUB_ID = {b.hub_id: (path, b) for path, b in KNOWN_BASES.items() if b.hub_id}


def _config_key(role: str) -> tuple[str, ...]:
    if role == "llm":
        return ("model", "llm", "path")
    if role == "encoder":
        return ("model", "encoder", "checkpoint")
    return ("model", "decoders", role, "path")


def _get(tree: dict, keys: tuple[str, ...]):
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _known(path: str | None) -> tuple[str, BaseInfo] | None:
    """The documented place a path points at (relative or absolute), if any."""
    if not path:
        return None
    if path in _BY_HUB_ID:
        return _BY_HUB_ID[path]
    p = resolve(path)
    for rel, info in KNOWN_BASES.items():
        if p == REPO_ROOT / rel:
            return rel, info
    return None


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
        path = _get(tree, _config_key(role))
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
    known = _known(path)
    if role == "encoder" and enc.get("preset") == "huge":  # strict keys + huge dims: it is ImageBind-huge
        known = (IMAGEBIND_PATH, KNOWN_BASES[IMAGEBIND_PATH])
    if hub_id is not None:
        info = _BY_HUB_ID.get(hub_id, (None, BaseInfo(hub_id.split("/")[-1], hub_id, "unknown")))[1]
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


def local_base_overrides(stage_dir: str | os.PathLike) -> list[str]:
    """Overrides that point Hub ids of known bases at their documented local copies when those exist
    (``pretrained_checkpoint/...``): a released folder then loads offline for users who followed
    pretrained_checkpoint/README.md. Explicit overrides given after these still win."""
    f = Path(stage_dir) / "config.yaml"
    if not f.is_file():
        return []
    tree = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
    out = []
    for role in ROLES:
        value = _get(tree, _config_key(role))
        if isinstance(value, str) and value in _BY_HUB_ID:
            rel = _BY_HUB_ID[value][0]
            if (REPO_ROOT / rel).exists():
                log.info("%s: using the local copy %s of %s", role, rel, value)
                out.append(f"{'.'.join(_config_key(role))}={rel}")
    return out


def released_config(tree: dict, bases: dict[str, dict]) -> dict:
    """The config.yaml of the release: base models by ``ref``, paths inside the repo made relative,
    the feature cache back at its default place."""
    tree = copy.deepcopy(tree)
    for role, entry in bases.items():
        keys = _config_key(role)
        if entry.get("ref") is not None:
            _get(tree, keys[:-1])[keys[-1]] = entry["ref"]
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
