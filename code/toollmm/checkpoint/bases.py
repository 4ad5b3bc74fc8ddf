"""Base models: what a stage was trained on and what each documented base is.

Identity (written into every stage manifest, checked on every load by ``checkpoint.stage.check_bases``):
:func:`base_models` records each base's path and sha256 (a folder: over its weight files; memoised by
path, size and mtime, so a 13 GB base is read once) or its Hub id.

Records (:data:`KNOWN_BASES`): the documented local places (``pretrained_checkpoint/README.md``) and, for
each, the Hub id, name, URL and licence. A release writes a base trained from such a place as its Hub id
(``toollmm.release.folder``); :func:`local_base_overrides` points such ids back at the documented local
copies when those exist, so a released folder loads offline for users who followed the README. ImageBind
has no Hub id: a config keeps its documented path ``pretrained_checkpoint/imagebind_ckpt/huge/imagebind_huge.pth``
and the card gives its download URL. A user with copies elsewhere passes overrides:
``toollmm.load(id, overrides=["model.llm.path=/data/vicuna-7b-v1.5"])``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from toollmm.core.config import Config
from toollmm.core.files import sha256_memoised
from toollmm.core.paths import CACHE_DIR, REPO_ROOT, resolve

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


# ---------------------------------------------------------------------------------- identity
def hash_tree(path: Path) -> str:
    """sha256 over a file, or over a folder's weight files (each memoised by size and mtime)."""
    memo = CACHE_DIR / "checkpoint_sha256.json"
    if path.is_file():
        return sha256_memoised(path, memo)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_memoised(f, memo).encode())
    return h.hexdigest()


def base_identity(path_or_id: str | None) -> dict | None:
    """``{"path": ..., "sha256": ...}`` for a local file/folder, ``{"hub_id": ...}`` for a Hub id."""
    if not path_or_id:
        return None
    p = resolve(path_or_id)
    if p.exists():
        return {"path": str(path_or_id), "sha256": hash_tree(p)}
    if "/" in str(path_or_id) and not str(path_or_id).startswith((".", "/")):
        return {"hub_id": str(path_or_id)}
    return {"path": str(path_or_id), "sha256": None, "missing": True}


def base_models(cfg: Config) -> dict:
    """The identity of every base model ``cfg`` points at (the manifest's ``base_models``)."""
    m = cfg.model
    out = {"llm": base_identity(m.llm.path), "encoder": base_identity(m.encoder.checkpoint)}
    if m.encoder.checkpoint is None:
        out["encoder"] = {"random_init": {"preset": m.encoder.preset, "seed": m.encoder.seed}}
    out["decoders"] = {k: base_identity(d.path) for k, d in m.decoders.items() if d.path}
    return out


# ---------------------------------------------------------------------------------- records
IMAGEBIND_PATH = "pretrained_checkpoint/imagebind_ckpt/huge/imagebind_huge.pth"
IMAGEBIND_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
ROLES = ("llm", "encoder", "image", "video", "audio")


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
BY_HUB_ID: dict[str, tuple[str, BaseInfo]] = {
    b.hub_id: (path, b) for path, b in KNOWN_BASES.items() if b.hub_id
}


def config_key(role: str) -> tuple[str, ...]:
    """The dotted config key (as a tuple) that holds the base model of ``role``."""
    if role == "llm":
        return ("model", "llm", "path")
    if role == "encoder":
        return ("model", "encoder", "checkpoint")
    return ("model", "decoders", role, "path")


def tree_get(tree: dict, keys: tuple[str, ...]):
    """``tree[k1][k2]...`` of a plain config tree, or None where a key is absent."""
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def known_base(path: str | None) -> tuple[str, BaseInfo] | None:
    """The documented place a path points at (relative or absolute), if any."""
    if not path:
        return None
    if path in BY_HUB_ID:
        return BY_HUB_ID[path]
    p = resolve(path)
    for rel, info in KNOWN_BASES.items():
        if p == REPO_ROOT / rel:
            return rel, info
    return None


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
        value = tree_get(tree, config_key(role))
        if isinstance(value, str) and value in BY_HUB_ID:
            rel = BY_HUB_ID[value][0]
            if (REPO_ROOT / rel).exists():
                log.info("%s: using the local copy %s of %s", role, rel, value)
                out.append(f"{'.'.join(config_key(role))}={rel}")
    return out
