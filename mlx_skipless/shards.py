"""Writing mlx-lm's weight layout as tensors arrive: model.safetensors, or 5 GB shards
and their index.

Conversion produces one block at a time and must never hold the whole model, so
each tensor goes to disk at once and the headers are written last.
"""

import json
import shutil
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple

import mlx.core as mx
import numpy as np

from .dtypes import SAFETENSORS_DTYPES, STORED

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's shard size
COPY_CHUNK = 1 << 20  # a copy holds this much at a time
# Each shard's file starts with this much room for its header (about 100 bytes a tensor);
# below COMPACT_BELOW bytes of tensors a shard is rewritten without it, which costs nothing.
HEADER_ROOM, COMPACT_BELOW = 1 << 16, 64 << 20


class ShardEntry(NamedTuple):
    """Where a tensor added to a ShardWriter lies, for its header and for reading it back."""

    key: str
    dtype: str  # as safetensors names it: "F32", "BF16", ...
    shape: List[int]
    shard: int
    offset: int  # of its first byte in its shard's data
    nbytes: int


class ShardWriter:
    """Writes tensors as they come into mlx-lm's layout: model.safetensors, or
    model-0000i-of-0000N.safetensors shards of at most 5 GB plus the index.

    A tensor's bytes go at once into its shard's file, behind room left for the
    header, so memory holds one tensor, never a shard, and the disk holds the model
    once. `close` writes each header into its room (safetensors lets a header end in
    spaces) and names the files; a shard too small to be worth the room, or whose
    header outgrows it, is copied out compactly instead."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int = MAX_SHARD_BYTES,
        prefix: str = "tensors",
        header_room: int = HEADER_ROOM,
        compact_below: int = COMPACT_BELOW,
    ):
        self.directory, self.max_bytes, self.prefix = Path(directory), max_bytes, prefix
        self.header_room, self.compact_below = header_room, compact_below
        self.files = []  # one open partial file per shard
        self.entries: List[ShardEntry] = []
        self.total_bytes = self.shard_bytes = 0

    def _partial(self, shard: int) -> Path:
        return self.directory / f"{self.prefix}-{shard + 1}.partial"

    def add(self, tensors: Dict[str, mx.array], dtype=None):
        """MLX arrays, or with `dtype` numpy arrays as `as_stored` returns them for it."""
        for key, value in tensors.items():
            stored = SAFETENSORS_DTYPES[dtype or value.dtype]
            if dtype is None and value.dtype == mx.bfloat16:
                value = value.view(mx.uint16)  # numpy has no bfloat16
            data = np.asarray(value, order="C")  # an MLX array's buffer is shared, not copied
            if not self.files or (self.shard_bytes and self.shard_bytes + data.nbytes > self.max_bytes):
                if self.files:
                    self.files[-1].flush()
                self.files.append(open(self._partial(len(self.files)), "w+b"))
                self.files[-1].seek(self.header_room)
                self.shard_bytes = 0
            self.entries.append(
                ShardEntry(key, stored, list(data.shape), len(self.files) - 1, self.shard_bytes, data.nbytes)
            )
            self.files[-1].write(memoryview(data).cast("B"))
            self.shard_bytes += data.nbytes
            self.total_bytes += data.nbytes
        if self.files:
            self.files[-1].flush()  # what was added is on disk, to be read back

    def keys(self) -> List[str]:
        """The tensors added so far, in order."""
        return [e.key for e in self.entries]

    def read(self, key: str) -> mx.array:
        """A tensor added earlier, read back (for passes that reuse it)."""
        raw, stored = self.read_raw(key)
        return mx.array(raw).view(mx.bfloat16) if stored == mx.bfloat16 else mx.array(raw)

    def read_raw(self, key: str) -> Tuple[np.ndarray, mx.Dtype]:
        """A tensor added earlier as numpy reads its bytes (bfloat16: uint16, as
        `as_stored` gives it), and its MLX dtype."""
        e = next(e for e in self.entries if e.key == key)
        stored = {v: k for k, v in SAFETENSORS_DTYPES.items()}[e.dtype]
        raw = np.fromfile(self._partial(e.shard), np.uint8, e.nbytes, offset=self.header_room + e.offset)
        return raw.view(STORED[e.dtype]).reshape(e.shape), stored

    def discard(self):
        for i, f in enumerate(self.files):
            f.close()
            self._partial(i).unlink()
        self.files = []

    def close(self, total_parameters: int):
        n, weight_map = len(self.files), {}
        for i, f in enumerate(self.files):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            entries = [e for e in self.entries if e.shard == i]
            self._finish_shard(f, entries, self.directory / name)
            self._partial(i).replace(self.directory / name)
            weight_map.update({e.key: name for e in entries})
        self.files = []
        index = {
            "metadata": {"total_size": self.total_bytes, "total_parameters": total_parameters},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))

    def _finish_shard(self, f, entries, final: Path):
        """Write the header into the room left for it, or copy the data out behind a
        compact one (then the partial file holds the finished shard too)."""
        header = {"__metadata__": {"format": "mlx"}}
        for e in entries:
            header[e.key] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [e.offset, e.offset + e.nbytes]}
        blob = json.dumps(header, separators=(",", ":")).encode()
        data_bytes = sum(e.nbytes for e in entries)
        if 8 + len(blob) <= self.header_room and data_bytes >= self.compact_below:
            f.seek(0)
            f.write((self.header_room - 8).to_bytes(8, "little"))
            f.write(blob.ljust(self.header_room - 8))
            f.close()
            return
        blob += b" " * (-len(blob) % 8)  # the format aligns data to 8 bytes
        f.flush()
        compact = final.with_name(final.name + ".compact")
        with open(compact, "wb") as out:
            out.write(len(blob).to_bytes(8, "little"))
            out.write(blob)
            f.seek(self.header_room)
            shutil.copyfileobj(f, out, COPY_CHUNK)
        f.close()
        compact.replace(f.name)
