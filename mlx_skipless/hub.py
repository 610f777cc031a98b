"""Where a model comes from: a local directory or a Hugging Face hub snapshot, and the
JSON and tokenizer files beside its weights.

Kept apart from the weight files' format: every command resolves its input and reads
its config this way, most never touch a tensor.
"""

import json
import shutil
from pathlib import Path
from typing import Optional

from .errors import CheckpointError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.json",
    "chat_template.jinja",
)
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]


def resolve(path_or_repo: str, revision: Optional[str] = None) -> Path:
    """A local directory, or a Hugging Face repo id downloaded to the hub cache."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a model directory or a hub repo id")
    if path_or_repo.count("/") != 1 or path_or_repo.startswith((".", "/", "~")):
        raise CheckpointError(f"{path_or_repo}: no such directory, and not a hub repo id (org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path_or_repo, revision=revision, allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as e:  # the hub client raises many types; all mean "not available"
        raise CheckpointError(f"could not download {path_or_repo!r}: {e}") from e


def recorded_name(path_or_repo) -> str:
    """How an output records where it came from: a hub repo id as it is, a local directory by
    its name only (a full path says who and where the user is, and --upload-repo publishes it)."""
    text = str(path_or_repo)
    return Path(text).expanduser().resolve().name if Path(text).expanduser().exists() else text


def read_json(f: Path, unique_keys: bool = True):
    """A JSON file of the checkpoint, read only if it is a regular file (a FIFO would hang).
    With `unique_keys`, a key given twice is an error (json would keep the last silently)."""
    if not f.exists():
        raise CheckpointError(f"{f} is missing")
    if not f.is_file():
        raise CheckpointError(f"{f} is not a regular file")
    try:
        return json.loads(f.read_bytes(), object_pairs_hook=reject_duplicate_keys if unique_keys else None)
    except OSError as e:
        raise CheckpointError(f"{f} cannot be read: {e.strerror}") from None
    except RecursionError:
        raise CheckpointError(f"{f} is nested too deeply to read") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, a duplicated key
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None


def reject_duplicate_keys(pairs):
    """An object_pairs_hook for json: a key given twice is an error."""
    out = {}
    for key, value in pairs:
        if key in out:  # which one was meant is unknown
            raise ValueError(f"the key {key!r} appears twice")
        out[key] = value
    return out


def read_config(path: Path) -> dict:
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json")
    config = read_json(path / "config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / 'config.json'} must hold a JSON object, not a {type(config).__name__}")
    return config


def copy_tokenizer(src: Path, dst: Path):
    """The tokenizer files of the model in `src`, beside the weights written to `dst`."""
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
