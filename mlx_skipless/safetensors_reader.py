"""Reading safetensors checkpoints: headers checked against the format, tensors read
one at a time.

A checkpoint may be larger than memory and may be hostile (truncated, overlapping,
naming shards outside itself), so every header is validated before any tensor is
read, and each read takes only that tensor's bytes.
"""

import json
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Tuple

import mlx.core as mx
import numpy as np

from .dtypes import FLOATING, STORED, stored_values
from .errors import CheckpointError
from .hub import read_json, reject_duplicate_keys

INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


class Tensor(NamedTuple):
    file: Path
    dtype: str  # as safetensors names it: "F32", "BF16", ...
    shape: Tuple[int, ...]
    offset: int  # of its first byte in the file


def read_header(f: Path) -> Dict[str, Tensor]:
    """The tensors a safetensors file holds, checked against the format: the
    header parses, every dtype is known, each tensor's bytes match its shape,
    and the tensors tile the data exactly (no holes, no overlaps, no tail)."""

    def bad(why):
        return CheckpointError(f"{f} is unreadable or truncated: {why}")

    if not f.is_file():
        raise CheckpointError(f"{f} is not a regular file")
    size = f.stat().st_size
    if size < 8:
        raise bad(f"it has {size} bytes, too few for a header")
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= min(size - 8, MAX_HEADER_BYTES):
                raise bad(f"its header length field says {n} bytes, the file has {size}")
            blob = fh.read(n)
    except OSError as e:
        raise CheckpointError(f"{f} cannot be read: {e.strerror}") from None
    try:
        header = json.loads(blob, object_pairs_hook=reject_duplicate_keys)
    except (ValueError, RecursionError) as e:
        raise bad(f"its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    tensors, spans = {}, []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        fields = _entry(entry)
        if fields is None:
            raise bad(f"the header entry of {key!r} is malformed: {str(entry)[:200]}")
        dtype, shape, start, end = fields
        if end - start != int(np.prod(shape, dtype=object)) * np.dtype(STORED[dtype]).itemsize:
            raise bad(f"{key} is {shape} {dtype} but spans {end - start} bytes")
        tensors[key] = Tensor(f, dtype, shape, 8 + n + start)
        spans.append((start, end, key))
    at = 0
    for start, end, key in sorted(spans):
        if start != at:
            raise bad(f"{key} starts at byte {start} of the data, expected {at}")
        at = end
    if at != size - 8 - n:
        raise bad(f"its tensors hold {at} bytes of data, the file {size - 8 - n}")
    return tensors


def _entry(entry):
    """(dtype, shape, start, end) of a well-formed header entry, else None."""
    try:
        dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in STORED:
            return None
    except (TypeError, KeyError, ValueError):
        return None
    return (dtype, shape, start, end) if all(type(x) is int and x >= 0 for x in (*shape, start, end)) else None


def _shard_file(path: Path, name) -> Path:
    """A shard named by the index, refused unless it names a file inside the
    checkpoint directory. Checked on the name, not the resolved path: the hub
    cache links every file to a blob outside the snapshot directory."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{path / INDEX} names the shard {name!r}, which is not a file inside {path}")
    return path / name


class TensorSource:
    """The tensors of a (sharded) safetensors checkpoint, read one at a time.

    Each header is parsed once; each read takes just that tensor's bytes from
    its file, so nothing read stays in memory after fusion is done with it."""

    def __init__(self, path: Path):
        index = path / INDEX
        if index.exists():
            data = read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(
                    f"{index} has no weight_map: a JSON object from each tensor name to the shard file holding it"
                )
            files = sorted({_shard_file(path, name) for name in weight_map.values()})
        else:
            files = sorted(path.glob("model*.safetensors"))  # as mlx-lm reads: never training state
            weight_map = {}
        if not files:
            raise CheckpointError(f"{path} has no *.safetensors weight files")
        self.tensors: Dict[str, Tensor] = {}
        found: Dict[str, List[Tensor]] = {}
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f} is missing (listed in {index.name})")
            for key, tensor in read_header(f).items():
                found.setdefault(key, []).append(tensor)
        missing = []
        for key, name in weight_map.items():
            # the index says which shard holds a tensor; a copy elsewhere is not read
            chosen = [t for t in found.pop(key, []) if t.file == path / name]
            if chosen:
                self.tensors[key] = chosen[0]
            else:
                missing.append(f"{key} (in {name})")
        if missing:
            raise CheckpointError(f"tensors listed in the index are missing from the shards: {missing[:5]}")
        for key, copies in found.items():
            if len(copies) > 1:
                raise CheckpointError(
                    f"{key} is stored in both {copies[0].file.name} and {copies[1].file.name}; "
                    f"which one is meant is unclear (a {INDEX} would say)"
                )
            self.tensors[key] = copies[0]
        self.files = {k: t.file for k, t in self.tensors.items()}
        self.shapes = {k: t.shape for k, t in self.tensors.items()}

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    def _read(self, key: str, dtype) -> np.ndarray:
        """The tensor in a float dtype, refused if it is not floating point or not finite."""
        t = self.tensors[key]
        if t.dtype not in FLOATING:
            raise CheckpointError(
                f"{key} in {t.file} is stored as {t.dtype}; a weight must be floating point ({', '.join(FLOATING)})"
            )
        count = int(np.prod(t.shape))
        with open(t.file, "rb") as fh:
            fh.seek(t.offset)
            raw = np.fromfile(fh, STORED[t.dtype], count)
        if raw.size != count:
            raise CheckpointError(f"{t.file} is truncated: {key} is cut short")
        if t.dtype == "BF16":
            raw = stored_values(raw, mx.bfloat16)
        a = raw.astype(dtype, copy=False).reshape(t.shape)
        # A sum is finite when every entry is, and needs no array of flags the size of the
        # embedding; one that overflows is told apart by the count below.
        if not np.isfinite(a.sum()):
            bad = int(a.size - np.isfinite(a).sum())
            if bad:
                raise CheckpointError(
                    f"{key} in {t.file} holds NaN or infinite values ({bad} of "
                    f"{a.size}): repair or re-export the checkpoint"
                )
        return a

    def numpy(self, key: str) -> np.ndarray:
        """The tensor in float64, for fusion."""
        return self._read(key, np.float64)

    def float32(self, key: str) -> np.ndarray:
        """The tensor in float32: for the large ones that fusion reads row by row."""
        return self._read(key, np.float32)

    def dtype(self) -> str:
        """The checkpoint's storage dtype, as mlx names it ('bfloat16', ...)."""
        t = next(t for k, t in self.tensors.items() if k.endswith("weight"))
        return FLOATING.get(t.dtype, t.dtype)
