"""Where a model's files are: a local folder, or a Hugging Face hub id fetched through the hub cache."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
BIN_PATTERNS = ["*.bin", "*.bin.index.json"]
SIDE_PATTERNS = ["*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


class ModelNotFoundError(ValueError):
    """Raised with a one-line message that says what to do."""


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json: point --model at a Hugging Face model folder")
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(f"model {model!r}: no such folder, and not a hub id of the form owner/name")
    return _download(model, revision)


# How long to wait for the hub's host to accept a connection before treating it as unreachable. Without
# this check, an unreachable hub costs the HTTP client's retries (about 24 s) before any answer.
_CONNECT_TIMEOUT = 3.0


def _hub_reachable(endpoint: str) -> bool:
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=_CONNECT_TIMEOUT):
            return True
    except OSError:  # refused, timed out, no route, no DNS
        return False


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, list_repo_files, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    offline_hint = (
        f"cannot fetch {repo_id!r} from the Hugging Face hub (offline or unreachable) and it is not in the "
        f"local cache; download it where there is network (`hf download {repo_id} --local-dir DIR`) "
        f"and pass --model DIR"
    )
    all_patterns = SIDE_PATTERNS + WEIGHT_PATTERNS + BIN_PATTERNS
    online = not constants.HF_HUB_OFFLINE and _hub_reachable(constants.ENDPOINT)
    try:
        if not online:
            return Path(
                snapshot_download(repo_id, revision=revision, allow_patterns=all_patterns, local_files_only=True)
            )
        files = list_repo_files(repo_id, revision=revision)
        patterns = SIDE_PATTERNS + (WEIGHT_PATTERNS if any(f.endswith(".safetensors") for f in files) else BIN_PATTERNS)
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo_id!r} is not a model on the Hugging Face hub (or it is private)") from None
    except GatedRepoError:
        raise ModelNotFoundError(f"{repo_id!r} is gated: log in with `hf auth login` and accept its terms") from None
    except Exception:  # not in the cache, a connection that broke, an HTTP error: the way out is the same
        raise ModelNotFoundError(offline_hint) from None
