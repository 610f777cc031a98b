"""Results of tokenizing a corpus, kept on disk so that the next run skips the work.

Tokenizing the 53 MB Python corpus takes minutes of CPU, and training its BPE
tokenizer more; every train and normfree run of the same data would redo both.
An entry is found by a key that hashes everything its result depends on: the
tokenizer (its canonical JSON, the same whether trained in memory or read from a
file), each file's path, size and modification time, and the options; so an edited,
added or removed file, or another tokenizer, misses and is computed afresh.
Entries are written to a temporary file and renamed, so a reader never sees half
of one and concurrent writers of the same key are harmless. The newest KEEP
entries of each kind stay; older ones are deleted when a new one is written.
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .corpus import cache_home

KEEP = 6  # token streams of the 53 MB corpus are ~70 MB each


def folder(kind: str) -> Path:
    return cache_home() / kind


def file_signature(files: Sequence[Path]) -> list:
    """(path, size, mtime in ns) of each file: what says a file is unchanged without reading it."""
    out = []
    for f in files:
        s = Path(f).stat()
        out.append([str(Path(f).resolve()), s.st_size, s.st_mtime_ns])
    return out


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def tokenizer_id(tok) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def _write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _prune(path.parent, path.suffix)


def _prune(directory: Path, suffix: str) -> None:
    entries = sorted(directory.glob("*" + suffix), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP:]:
        old.unlink(missing_ok=True)


def _hit(path: Path) -> Optional[Path]:
    if not path.is_file():
        return None
    os.utime(path)  # in use: pruned last
    return path


def load_streams(name: str) -> Optional[dict]:
    path = _hit(folder("tokens") / f"{name}.npz")
    if path is None:
        return None
    with np.load(path) as z:  # ids come back as the int32 the rest of the code expects
        return {k: z[k].astype(np.int32) if z[k].dtype == np.uint16 else z[k] for k in z.files}


def store_streams(name: str, **arrays) -> Path:
    """Save named integer arrays; token ids are kept in 16 bits when they fit."""
    small = {
        k: v.astype(np.uint16) if v.dtype.kind in "iu" and v.size and 0 <= v.min() and v.max() < 2**16 else v
        for k, v in arrays.items()
    }
    path = folder("tokens") / f"{name}.npz"
    _write(path, lambda f: np.savez(f, **small))
    return path


def load_text(kind: str, name: str) -> Optional[str]:
    path = _hit(folder(kind) / f"{name}.json")
    return path.read_text() if path else None


def store_text(kind: str, name: str, text: str) -> Path:
    path = folder(kind) / f"{name}.json"
    _write(path, lambda f: f.write(text.encode()))
    return path
