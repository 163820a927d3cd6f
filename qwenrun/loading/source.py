"""Find a checkpoint folder: a local path, or a Hugging Face hub id downloaded with huggingface_hub.

Only the files qwenrun reads are downloaded (safetensors, JSON, tokenizer), never pickled `.bin`
weights. `HF_HUB_OFFLINE=1` and a pinned `revision` are honoured by huggingface_hub itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qwenrun.errors import CheckpointError

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def resolve_model_path(
    model: str | os.PathLike[str], revision: str | None = None, allow_patterns: list[str] | None = None
) -> Path:
    """Local folder as is; otherwise `org/name` is fetched (or found in the cache) from the hub.

    `allow_patterns` narrows the download (e.g. only the JSON files, to describe a model)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the checkpoint folder that holds config.json")
        return path
    text = str(model)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"model folder {text!r} does not exist (and it is not a hub id like 'Qwen/Qwen3-0.6B')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=allow_patterns or HUB_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{text} is not in the local hub cache and cannot be downloaded (offline or no network): {e}"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"hub repository {text!r} not found (or it is gated: run `hf auth login`)") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"could not download {text}: {e}") from None


def read_json(path: Path, required: bool = True) -> dict[str, Any]:
    """Parse a JSON file of the checkpoint; a missing optional file is {}."""
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path.name} not found in {path.parent}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data
