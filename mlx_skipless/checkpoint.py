"""Checkpoint files: find them, read tensors lazily, write mlx-lm's layout atomically."""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, Optional

import mlx.core as mx
import numpy as np

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's shard size
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "generation_config.json", "chat_template.json", "chat_template.jinja")
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]


class CheckpointError(ValueError):
    """Bad input: the message says what is wrong and what to do."""


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


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {e}") from None


class TensorSource:
    """The tensors of a (sharded) safetensors checkpoint, read one at a time.

    Each read opens the file afresh: MLX loads lazily but keeps what was
    evaluated, so holding one dict would keep every tensor read so far."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise CheckpointError(f"{path} has no *.safetensors weight files")
        self.files, self.shapes = {}, {}
        for name in files:
            f = path / name
            if not f.exists():
                raise CheckpointError(f"{f} is missing (listed in {index.name})")
            try:
                arrays = mx.load(str(f))  # lazy: checks the header and file size
            except (RuntimeError, ValueError) as e:
                raise CheckpointError(f"{f} is unreadable or truncated: {e}") from None
            self.files.update({k: f for k in arrays})
            self.shapes.update({k: tuple(v.shape) for k, v in arrays.items()})
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.files))
            if missing:
                raise CheckpointError(f"tensors listed in the index are missing from the shards: {missing[:5]}")

    def keys(self) -> Iterable[str]:
        return self.files.keys()

    def mlx(self, key: str) -> mx.array:
        return mx.load(str(self.files[key]))[key]

    def numpy(self, key: str) -> np.ndarray:
        """The tensor in float64, for fusion."""
        return np.array(self.mlx(key).astype(mx.float32), dtype=np.float64)

    def float32(self, key: str) -> np.ndarray:
        """The tensor in float32: for the large ones that fusion reads row by row."""
        return np.array(self.mlx(key).astype(mx.float32), copy=False)

    def dtype(self) -> str:
        """The checkpoint's storage dtype, as mlx names it ('bfloat16', ...)."""
        key = next(k for k in self.files if k.endswith("weight"))
        return str(self.mlx(key).dtype).removeprefix("mlx.core.")


SAFETENSORS_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16",
                      mx.uint32: "U32", mx.int32: "I32", mx.uint16: "U16", mx.int16: "I16",
                      mx.uint8: "U8", mx.int8: "I8", mx.int64: "I64", mx.uint64: "U64",
                      mx.bool_: "BOOL"}
COPY_CHUNK = 64 << 20


class ShardWriter:
    """Writes tensors as they come into mlx-lm's layout: model.safetensors, or
    model-0000i-of-0000N.safetensors shards of at most 5 GB plus the index.

    Tensor bytes go to a spool file at once, so memory holds one tensor, never a
    shard; `close` writes each shard's header and copies its bytes in."""

    def __init__(self, directory: Path, max_bytes: int = MAX_SHARD_BYTES):
        self.directory, self.max_bytes = Path(directory), max_bytes
        self.spool_path = self.directory / "tensors.spool"
        self.spool = open(self.spool_path, "wb")
        self.entries = []  # (key, dtype, shape, spool offset, nbytes)
        self.total_bytes = 0

    def add(self, tensors: Dict[str, mx.array]):
        for key, value in tensors.items():
            raw = value.view(mx.uint16) if value.dtype == mx.bfloat16 else value  # numpy has no bf16
            data = np.ascontiguousarray(raw)  # shares MLX's buffer: no copy
            self.entries.append((key, SAFETENSORS_DTYPES[value.dtype], list(value.shape),
                                 self.total_bytes, data.nbytes))
            self.spool.write(memoryview(data).cast("B"))
            self.total_bytes += data.nbytes

    def read(self, key: str) -> mx.array:
        """A tensor added earlier, read back from the spool (for passes that reuse it)."""
        self.spool.flush()
        _, dtype, shape, start, nbytes = next(e for e in self.entries if e[0] == key)
        stored = {v: k for k, v in SAFETENSORS_DTYPES.items()}[dtype]
        raw = np.fromfile(self.spool_path, np.uint8, nbytes, offset=start)
        if stored == mx.bfloat16:
            return mx.array(raw.view(np.uint16)).view(mx.bfloat16).reshape(shape)
        return mx.array(raw).view(stored).reshape(shape)

    def discard(self):
        self.spool.close()
        self.spool_path.unlink()

    def _shards(self):
        shards, size = [[]], 0
        for entry in self.entries:
            if shards[-1] and size + entry[4] > self.max_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += entry[4]
        return shards

    def close(self, total_parameters: int):
        self.spool.close()
        shards, weight_map = self._shards(), {}
        with open(self.spool_path, "rb") as spool:
            for i, entries in enumerate(shards):
                name = ("model.safetensors" if len(shards) == 1
                        else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
                self._write_shard(self.directory / name, entries, spool)
                weight_map.update({e[0]: name for e in entries})
        self.spool_path.unlink()
        index = {"metadata": {"total_size": self.total_bytes, "total_parameters": total_parameters},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))

    @staticmethod
    def _write_shard(path: Path, entries, spool):
        header, offset = {"__metadata__": {"format": "mlx"}}, 0
        for key, dtype, shape, _, nbytes in entries:
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format aligns data to 8 bytes
        with open(path, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for _, _, _, start, nbytes in entries:
                spool.seek(start)
                while nbytes:
                    chunk = spool.read(min(nbytes, COPY_CHUNK))
                    f.write(chunk)
                    nbytes -= len(chunk)


@contextmanager
def staged_directory(final: Path, force: bool = False):
    """Yield a temporary directory beside `final`; it becomes `final` only if the
    block completes, so a failed or interrupted run leaves nothing half-written."""
    final = Path(final)
    if final.exists() and not force:
        raise CheckpointError(f"{final} exists; pass --force to overwrite it")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(final)


def copy_tokenizer(src: Path, dst: Path):
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
