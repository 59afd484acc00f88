"""Single-file weights (HPS checkpoints, the aesthetic head) given as a local path or a hub file id."""

from __future__ import annotations

import os


def resolve_file(path_or_id: str, argument: str) -> str:
    """A local file path as is; `owner/repo/filename` on the Hugging Face hub → the cached download
    (through huggingface_hub, which honours HF_HUB_OFFLINE and an already-filled cache)."""
    if not isinstance(path_or_id, str) or not path_or_id:
        raise ValueError(f"{argument} must be a file path or 'owner/repo/filename', got {path_or_id!r}")
    if os.path.isfile(path_or_id):
        return path_or_id
    parts = path_or_id.split("/")
    if os.path.isabs(path_or_id) or path_or_id.startswith(".") or len(parts) < 3:
        raise ValueError(f"{argument}: no such file {path_or_id!r} (a hub file is given as 'owner/repo/filename')")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:]))
