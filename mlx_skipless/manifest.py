"""What proves an output directory is this tool's: the manifest of the files it wrote,
and the marks older versions left in config.json.

--force replaces only what this tool wrote; deciding that is apart from claiming and
swapping the directory (output_dir), and the zoo and the corpus ask it on their own.
"""

import json
import re
from pathlib import Path
from typing import Optional

from .hub import TOKENIZER_FILES

WRITER_KEY = "mlx_skipless"  # config.json entry marking a directory this tool wrote
# Older versions marked their outputs by these entries instead.
LEGACY_MARKERS = ("conversion", "whatif")
TRAINING_DIR = "training"  # trainer state and optimizer moments: no loader reads it
TRAINER_STATE, OPTIMIZER_STATE = "trainer.json", "optimizer.safetensors"  # in it (beside the weights before 0.2)
MODEL_DIR_FILES = (
    "config.json",
    "skipless.py",
    "README.md",
    "model.safetensors.index.json",
    TRAINER_STATE,
    OPTIMIZER_STATE,
    TRAINING_DIR,
) + TOKENIZER_FILES

MANIFEST = ".mlx-skipless-files.json"  # inside every output: the files this tool wrote there, and their sizes
SHARD = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


def write_manifest(directory: Path):
    """Record every file under `directory` (relative path: size): the proof that this tool wrote them."""
    files = {
        p.relative_to(directory).as_posix(): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    try:
        command = json.loads((directory / "config.json").read_text())[WRITER_KEY]["command"]
    except (OSError, ValueError, KeyError, TypeError):
        command = ""
    (directory / MANIFEST).write_text(
        json.dumps({"writer": f"mlx-skipless {command}".strip(), "files": files}, indent=1)
    )


def read_manifest(path: Path) -> Optional[dict]:
    """The manifest of an output directory, or None where there is none (or it is not ours)."""
    f = path / MANIFEST
    try:
        if not f.is_file() or f.stat().st_size > 1 << 24:
            return None
        manifest = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, int) for v in files.values()):
        return None
    return manifest


def written_by_us(path: Path) -> Optional[str]:
    """What wrote the model directory `path`, if this tool did (its manifest, or for directories
    written before manifests, config.json's mark); else None."""
    manifest = read_manifest(path)
    if manifest is not None:
        return str(manifest.get("writer", "mlx-skipless"))
    try:
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("model_type") != "skipless":
        return None
    if isinstance(config.get(WRITER_KEY), dict):
        return f"mlx-skipless {config[WRITER_KEY].get('command', '')}".strip()
    marker = next((m for m in LEGACY_MARKERS if m in config), None)
    if marker or (path / TRAINER_STATE).exists():
        return f"mlx-skipless {marker or 'train'}"
    return None


def foreign_entries(path: Path) -> list:
    """What under `path` this tool cannot prove it wrote: anything its manifest does not list
    with that size; without a manifest (older outputs), any name it never writes."""
    manifest = read_manifest(path)
    found = {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*")) if p.name != MANIFEST}
    if manifest is not None:
        files = manifest["files"]
        return [
            name
            for name, p in found.items()
            if not (p.is_dir() and not p.is_symlink() and any(f.startswith(name + "/") for f in files))
            and not (p.is_file() and not p.is_symlink() and files.get(name) == p.stat().st_size)
        ]
    known = {*MODEL_DIR_FILES, *(f"{TRAINING_DIR}/{n}" for n in (TRAINER_STATE, OPTIMIZER_STATE))}
    return [
        name
        for name, p in found.items()
        if p.is_symlink() or not (name in known or SHARD.fullmatch(name) or (name == TRAINING_DIR and p.is_dir()))
    ]
