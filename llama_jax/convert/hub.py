"""Checkpoints named by Hugging Face model id (`meta-llama/Llama-3.1-8B-Instruct`), found in the
local Hugging Face cache by huggingface_hub's own offline lookup. Nothing is ever downloaded."""

from __future__ import annotations

import os
from pathlib import Path

from llama_jax.convert.source import ConvertError


def resolve_checkpoint(checkpoint: str | os.PathLike, revision: str | None = None) -> Path:
    """`checkpoint` itself when it exists; otherwise the snapshot directory of the model id
    `checkpoint` in the Hugging Face cache (HF_HUB_CACHE, or HF_HOME/hub) at `revision`
    (a branch or tag under refs/, or a commit; default: main)."""
    path = Path(checkpoint)
    if path.exists():
        if revision is not None:
            raise ConvertError(f"--revision {revision} applies to Hugging Face model ids, not to {path}")
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(checkpoint), revision=revision, local_files_only=True))
    except HFValidationError:
        raise ConvertError(f"{checkpoint} is not a directory") from None
    except LocalEntryNotFoundError:
        folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=str(checkpoint), repo_type="model")
        raise ConvertError(
            f"{checkpoint} is neither a directory nor a model in the Hugging Face cache at revision "
            f"{revision or 'main'} (looked in {folder}; llama-jax never downloads)"
        ) from None
