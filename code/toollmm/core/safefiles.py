"""Loading files that may come from someone else, and writing safetensors byte-reproducibly.

Nothing the project loads may run code. Our own files are safetensors or JSON; files in torch's pickle
format (DeepSpeed's checkpoint shards, ``pytorch_model.bin`` of a base LLM, ``.pth`` of ImageBind) are
read with ``torch.load(weights_only=True)``, whose unpickler only builds tensors, plain containers and
the few classes allow-listed here, and refuses any other global (``os.system``, ``builtins.eval``, ...)
before calling it. A refusal raises :class:`UnsafeFileError` naming the file.

``safetensors_bytes`` canonicalises the safetensors header: the library writes ``__metadata__`` from a
Rust ``HashMap``, so its key order (and the file's sha256) changed from process to process.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import zipfile
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from toollmm.core.errors import UserError
from toollmm.core.files import respect_umask

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class UnsafeFileError(UserError, ValueError):
    """A file that could only be loaded by running code from it (or not at all); names the file."""


def _reason(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    why = [ln for ln in lines if "GLOBAL" in ln or ("unsupported" in ln.lower() and "global" in ln.lower())]
    return (why or lines or [type(e).__name__])[0][:300]


def torch_load_weights(
    path: str | os.PathLike, *, map_location="cpu", allowed: Iterable[type] = (), mmap: bool | None = None
):
    """``torch.load(path, weights_only=True)`` with ``allowed`` classes added to the unpickler's
    allow-list for this call only; any refusal or damage raises :class:`UnsafeFileError` naming ``path``."""
    path = Path(path)
    if mmap is None:
        mmap = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:  # refusals are UnpicklingError; damaged archives raise RuntimeError etc.
        raise UnsafeFileError(
            f"{path}: refused: not loadable with torch.load(weights_only=True), which loads only tensors "
            f"and plain data and never runs code from the file ({_reason(e)})"
        ) from e


def first_refused(folder: str | os.PathLike) -> Path | None:
    """The first pickle-format weight file under ``folder`` that ``torch.load(weights_only=True)`` refuses
    (used after a library's loader raised without naming its file); None if all load."""
    root = Path(folder)
    if not root.is_dir():
        return None
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in PICKLE_SUFFIXES):
        try:
            torch_load_weights(f, map_location="meta" if zipfile.is_zipfile(f) else "cpu")
        except UnsafeFileError:
            return f
    return None


def _caused_by_unpickling(e: BaseException | None) -> bool:
    """True when ``e`` or an exception it was raised from is a weights_only refusal (diffusers re-raises
    it as an ``OSError``)."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, pickle.UnpicklingError):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


@contextmanager
def naming_refused_pickles(what: str, folder: str | os.PathLike):
    """Run a library loader (transformers, diffusers, peft) that reads ``folder``: its weights_only
    refusal (an ``UnpicklingError`` naming no file) becomes :class:`UnsafeFileError` naming the file."""
    try:
        yield
    except Exception as e:
        if not _caused_by_unpickling(e):
            raise
        bad = first_refused(folder)
        where = bad if bad is not None else Path(folder)
        raise UnsafeFileError(
            f"{what}: {where}: refused: not loadable with torch.load(weights_only=True), which loads only "
            f"tensors and plain data and never runs code from the file ({_reason(e)})"
        ) from e


# ---------------------------------------------------------------------------------------- writing
def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header written in one canonical form (``__metadata__``
    first with sorted keys, then the tensor entries in the library's order), so equal tensors and
    metadata give equal bytes in every process."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    out = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
    out.update(header)
    text = json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the library pads the header to 8 bytes the same way
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """``safetensors.torch.save`` with a canonical header (see :func:`canonical_safetensors`)."""
    from safetensors.torch import save

    return canonical_safetensors(save(dict(tensors), metadata=dict(metadata) if metadata else None))


def save_safetensors_file(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` with a canonical header, rewritten in place (no second copy of a
    large file in memory)."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata else None)
    respect_umask(path)  # safetensors creates 0600; teammates on a shared filesystem must read it
    with open(path, "r+b") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        old = head + f.read(n)
        new = canonical_safetensors(old)
        if len(new) == len(old):
            f.seek(0)
            f.write(new)
            return
    tmp = path.with_name(f".{path.name}.canon.tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        src.seek(len(old))
        dst.write(new)
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, path)
