"""Upload a checked release folder (``toollmm.release.folder``) to the Hugging Face Hub."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .folder import ReleaseError


def upload(release_dir: str | os.PathLike, repo_id: str, *, private: bool = False, api=None) -> str:
    """Create (or reuse) the Hub model repo and make its files exactly the release folder's
    (``upload_folder`` with ``delete_patterns="*"``: stale files of an earlier release go; .gitattributes
    stays). The token is huggingface_hub's own (``hf auth login`` or ``HF_TOKEN``); it is never read here."""
    from huggingface_hub import HfApi, get_token

    if api is None:
        if get_token() is None:
            raise ReleaseError("no Hugging Face token: run `hf auth login` or set HF_TOKEN, then retry")
        api = HfApi()
    folder = Path(release_dir)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(folder),
            delete_patterns="*",
            commit_message=f"toollmm {cfg['toollmm_version']} release (stage {cfg['stage']})",
        )
    except Exception as e:
        if not _network_error(e):
            raise
        raise ReleaseError(
            f"upload of {folder} to {repo_id} failed: {type(e).__name__}: {e} "
            "(the folder is complete; rerun release.py to retry)"
        ) from e
    return str(url)


def _network_error(e: Exception) -> bool:
    """A failure of the network or the Hub (connection, HTTP status, timeout), not a bug of ours: an
    ``OSError`` or an exception of the HTTP stack huggingface_hub runs on (httpx or its fork, requests)."""
    if isinstance(e, OSError):
        return True
    stack = ("httpx", "httpcore", "requests", "urllib3", "huggingface_hub.errors")
    return any(c.__module__.split(".")[0].rstrip("0123456789") in stack or c.__module__ in stack
               for c in type(e).__mro__)  # fmt: skip
