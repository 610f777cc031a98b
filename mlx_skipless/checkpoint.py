"""Checkpoint files: find them, read tensors lazily, write mlx-lm's layout atomically."""

import fcntl
import glob
import json
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

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
        return json.loads(f.read_bytes(), object_pairs_hook=_no_duplicate_keys if unique_keys else None)
    except OSError as e:
        raise CheckpointError(f"{f} cannot be read: {e.strerror}") from None
    except RecursionError:
        raise CheckpointError(f"{f} is nested too deeply to read") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, a duplicated key
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None


def _no_duplicate_keys(pairs):
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


INDEX = "model.safetensors.index.json"
# safetensors dtype -> how numpy reads its bytes (bfloat16: as the upper halves of float32s)
STORED = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
          "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
FLOATING = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
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
        header = json.loads(blob, object_pairs_hook=_no_duplicate_keys)
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
                raise CheckpointError(f"{index} has no weight_map: a JSON object from each tensor "
                                      "name to the shard file holding it")
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
                raise CheckpointError(f"{key} is stored in both {copies[0].file.name} and {copies[1].file.name}; "
                                      f"which one is meant is unclear (a {INDEX} would say)")
            self.tensors[key] = copies[0]
        self.files = {k: t.file for k, t in self.tensors.items()}
        self.shapes = {k: t.shape for k, t in self.tensors.items()}

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    def _read(self, key: str, dtype) -> np.ndarray:
        """The tensor in a float dtype, refused if it is not floating point or not finite."""
        t = self.tensors[key]
        if t.dtype not in FLOATING:
            raise CheckpointError(f"{key} in {t.file} is stored as {t.dtype}; a weight must be "
                                  f"floating point ({', '.join(FLOATING)})")
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
                raise CheckpointError(f"{key} in {t.file} holds NaN or infinite values ({bad} of "
                                      f"{a.size}): repair or re-export the checkpoint")
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


ROUNDING_CHUNK = 1 << 16  # elements: 256 KB of float32, within a core's L2 cache


def as_stored(x: np.ndarray, dtype) -> Tuple[np.ndarray, np.ndarray]:
    """`x` stored in the MLX float `dtype`, rounded to nearest (ties to even) as MLX's
    cast rounds: (the array whose bytes are written, its values as float32). Numpy does
    it without copies through MLX; bfloat16 comes back as its bits (uint16)."""
    x = np.asarray(x, np.float32, order="C")
    if dtype == mx.float32:
        return x, x
    if dtype == mx.float16:
        with np.errstate(over="ignore"):  # to infinity, as MLX's cast; verification reports it
            raw = x.astype(np.float16)
        return raw, raw.astype(np.float32)
    if dtype != mx.bfloat16:
        raise ValueError(f"not a float dtype to store weights in: {dtype}")
    bits = x.reshape(-1).view(np.uint32)
    # Read from bfloat16, as most checkpoints are, x is stored as it is: its low halves are zero
    # (piece by piece, so a product, whose first piece says no, costs nothing to tell).
    if not any(np.any(bits[s : s + ROUNDING_CHUNK] & 0xFFFF) for s in range(0, bits.size, ROUNDING_CHUNK)):
        halves = bits.view(np.uint16).reshape(-1, 2)  # (low, high): MLX hosts are little-endian
        return np.ascontiguousarray(halves[:, 1]).reshape(x.shape), x
    raw, values = np.empty(bits.size, np.uint16), np.empty(bits.size, np.uint32)
    t = np.empty(min(bits.size, ROUNDING_CHUNK), np.uint32)
    # A piece at a time: the five passes run in cache instead of over a block-sized array
    # in memory each (4-8x faster at 7B shapes, where a block is 0.9 GB in float32).
    for s in range(0, bits.size, ROUNDING_CHUNK):
        b = bits[s : s + ROUNDING_CHUNK]
        r = t[: b.size]
        np.right_shift(b, 16, out=r)
        r &= 1
        r += 0x7FFF  # what rounds the upper half to nearest, ties to even
        r += b
        r >>= 16
        raw[s : s + b.size] = r
        np.left_shift(r, 16, out=values[s : s + b.size])
    return raw.reshape(x.shape), values.view(np.float32).reshape(x.shape)


def stored_values(raw: np.ndarray, dtype) -> np.ndarray:
    """The float32 values of `raw`, an array as `as_stored` returns it for `dtype`."""
    if dtype == mx.bfloat16:  # float32's upper half: one shift into one new array
        return np.left_shift(raw, 16, out=np.empty(raw.shape, np.uint32), dtype=np.uint32).view(np.float32)
    return raw.astype(np.float32, copy=False)


SAFETENSORS_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16",
                      mx.uint32: "U32", mx.int32: "I32", mx.uint16: "U16", mx.int16: "I16",
                      mx.uint8: "U8", mx.int8: "I8", mx.int64: "I64", mx.uint64: "U64",
                      mx.bool_: "BOOL"}
COPY_CHUNK = 1 << 20  # a copy holds this much at a time
# Each shard's file starts with this much room for its header (about 100 bytes a tensor);
# below COMPACT_BELOW bytes of tensors a shard is rewritten without it, which costs nothing.
HEADER_ROOM, COMPACT_BELOW = 1 << 16, 64 << 20


class ShardWriter:
    """Writes tensors as they come into mlx-lm's layout: model.safetensors, or
    model-0000i-of-0000N.safetensors shards of at most 5 GB plus the index.

    A tensor's bytes go at once into its shard's file, behind room left for the
    header, so memory holds one tensor, never a shard, and the disk holds the model
    once. `close` writes each header into its room (safetensors lets a header end in
    spaces) and names the files; a shard too small to be worth the room, or whose
    header outgrows it, is copied out compactly instead."""

    def __init__(self, directory: Path, max_bytes: int = MAX_SHARD_BYTES, prefix: str = "tensors",
                 header_room: int = HEADER_ROOM, compact_below: int = COMPACT_BELOW):
        self.directory, self.max_bytes, self.prefix = Path(directory), max_bytes, prefix
        self.header_room, self.compact_below = header_room, compact_below
        self.files = []  # one open partial file per shard
        self.entries = []  # (key, dtype, shape, shard, offset in its data, nbytes)
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
            self.entries.append((key, stored, list(data.shape), len(self.files) - 1, self.shard_bytes, data.nbytes))
            self.files[-1].write(memoryview(data).cast("B"))
            self.shard_bytes += data.nbytes
            self.total_bytes += data.nbytes
        if self.files:
            self.files[-1].flush()  # what was added is on disk, to be read back

    def keys(self) -> List[str]:
        """The tensors added so far, in order."""
        return [e[0] for e in self.entries]

    def read(self, key: str) -> mx.array:
        """A tensor added earlier, read back (for passes that reuse it)."""
        raw, stored = self.read_raw(key)
        return mx.array(raw).view(mx.bfloat16) if stored == mx.bfloat16 else mx.array(raw)

    def read_raw(self, key: str) -> Tuple[np.ndarray, mx.Dtype]:
        """A tensor added earlier as numpy reads its bytes (bfloat16: uint16, as
        `as_stored` gives it), and its MLX dtype."""
        _, dtype, shape, shard, start, nbytes = next(e for e in self.entries if e[0] == key)
        stored = {v: k for k, v in SAFETENSORS_DTYPES.items()}[dtype]
        raw = np.fromfile(self._partial(shard), np.uint8, nbytes, offset=self.header_room + start)
        return raw.view(STORED[dtype]).reshape(shape), stored

    def discard(self):
        for i, f in enumerate(self.files):
            f.close()
            self._partial(i).unlink()
        self.files = []

    def close(self, total_parameters: int):
        n, weight_map = len(self.files), {}
        for i, f in enumerate(self.files):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            self._finish_shard(f, [e for e in self.entries if e[3] == i], self.directory / name)
            self._partial(i).replace(self.directory / name)
            weight_map.update({e[0]: name for e in self.entries if e[3] == i})
        self.files = []
        index = {"metadata": {"total_size": self.total_bytes, "total_parameters": total_parameters},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))

    def _finish_shard(self, f, entries, final: Path):
        """Write the header into the room left for it, or copy the data out behind a
        compact one (then the partial file holds the finished shard too)."""
        header = {"__metadata__": {"format": "mlx"}}
        for key, dtype, shape, _, offset, nbytes in entries:
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        blob = json.dumps(header, separators=(",", ":")).encode()
        data_bytes = sum(e[5] for e in entries)
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


WRITER_KEY = "mlx_skipless"  # config.json entry marking a directory this tool wrote
# Older versions marked their outputs by these entries instead.
LEGACY_MARKERS = ("conversion", "whatif")
TRAINING_DIR = "training"  # trainer state and optimizer moments: no loader reads it
TRAINER_STATE, OPTIMIZER_STATE = "trainer.json", "optimizer.safetensors"  # in it (beside the weights before 0.2)
MODEL_DIR_FILES = ("config.json", "skipless.py", "README.md", "model.safetensors.index.json",
                   TRAINER_STATE, OPTIMIZER_STATE, TRAINING_DIR) + TOKENIZER_FILES


MANIFEST = ".mlx-skipless-files.json"  # inside every output: the files this tool wrote there, and their sizes
SHARD = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


def write_manifest(directory: Path):
    """Record every file under `directory` (relative path: size): the proof that this tool wrote them."""
    files = {p.relative_to(directory).as_posix(): p.stat().st_size
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    try:
        command = json.loads((directory / "config.json").read_text())[WRITER_KEY]["command"]
    except (OSError, ValueError, KeyError, TypeError):
        command = ""
    (directory / MANIFEST).write_text(json.dumps({"writer": f"mlx-skipless {command}".strip(), "files": files},
                                                 indent=1))


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
        return [name for name, p in found.items()
                if not (p.is_dir() and not p.is_symlink() and any(f.startswith(name + "/") for f in files))
                and not (p.is_file() and not p.is_symlink() and files.get(name) == p.stat().st_size)]
    known = {*MODEL_DIR_FILES, *(f"{TRAINING_DIR}/{n}" for n in (TRAINER_STATE, OPTIMIZER_STATE))}
    return [name for name, p in found.items() if p.is_symlink()
            or not (name in known or SHARD.fullmatch(name) or (name == TRAINING_DIR and p.is_dir()))]


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies inside it (both resolved)."""
    return a == b or b in a.parents


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Terminated(SystemExit):
    """SIGTERM, raised where the process was, so cleanup runs as it does for Ctrl-C."""


class OutputDir:
    """An output model directory, claimed for one run.

    Entering checks the path, takes a lock beside it (a second writer of the same
    output fails at once instead of replacing the first's work), removes stale
    partial directories that dead runs left, and turns SIGTERM into an exception so
    cleanup runs. `stage()` yields a fresh directory beside the output that becomes
    the output only when its block completes. The output may not be, contain, or lie
    inside any of `inputs`; an existing output is replaced only with `force`, and
    only if it is empty or a model this tool wrote. A run that commits nothing leaves
    no directories it made."""

    def __init__(self, final, force: bool = False, inputs: Iterable = (), log=None):
        self.given = Path(final)
        self.final = Path(os.path.abspath(self.given.expanduser()))
        self.force, self.inputs = force, [Path(p) for p in inputs if p is not None]
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.made, self.lock, self.committed, self.old_handler = [], None, False, None
        self.seen = ()  # what the first check found at the path

    def protect(self, *inputs):
        """Also refuse to overlap `inputs` (those known only after the first check)."""
        self.inputs += [Path(p) for p in inputs if p is not None]
        return self

    def check(self):
        """Refuse an output that would destroy an input or something not ours, or
        that another process wrote since the first check."""
        given, final = self.given, self.final
        self._restore_interrupted()
        try:
            st = os.lstat(final)
            found = (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            found = None
        if self.seen == ():
            self.seen = found
        elif found != self.seen:
            raise CheckpointError(f"{given} was written by another process while this one worked; "
                                  "nothing was replaced")
        if final.is_symlink():
            raise CheckpointError(f"{given} is a symbolic link; name the directory itself")
        real = final.resolve()
        if real == real.parent or _inside(Path.cwd().resolve(), real):
            raise CheckpointError(f"{given} is or holds the current directory; choose a new directory "
                                  "for the output")
        for inp in self.inputs:
            inp = inp.expanduser().resolve()
            if _inside(real, inp) or _inside(inp, real):
                raise CheckpointError(f"{given} would overlap the input {inp}: the output may not be "
                                      "the input, contain it, or lie inside it")
        if not final.exists():
            return None
        if not final.is_dir():
            raise CheckpointError(f"{given} exists and is not a directory")
        if not self.force:
            raise CheckpointError(f"{given} exists; pass --force to overwrite it")
        if not any(final.iterdir()):
            return "an empty directory"
        writer = written_by_us(final)
        if writer is None:
            raise CheckpointError(f"{given} exists and is not a model mlx-skipless wrote; --force "
                                  "replaces only those (or an empty directory): choose another path")
        foreign = foreign_entries(final)
        if foreign:
            raise CheckpointError(f"{given} holds files mlx-skipless did not write ({', '.join(foreign[:5])}); "
                                  "move them or choose another path")
        return f"a model written by {writer}"

    def __enter__(self):
        self.check()
        self._make_parents()
        try:
            self._lock()
            replacing = self.check()  # again, now that no other writer can change it
            if replacing:
                self.log(f"[INFO] replacing {self.given} ({replacing})")
            self._remove_stale()
        except BaseException:
            self._release()
            raise
        if threading.current_thread() is threading.main_thread():  # only there can Python handle it
            self.old_handler = (signal.signal(signal.SIGTERM, self._terminate),)
        return self

    def __exit__(self, *exc):
        if self.old_handler is not None:
            signal.signal(signal.SIGTERM, self.old_handler[0] if self.old_handler[0] is not None else signal.SIG_DFL)
            self.old_handler = None
        self._release()
        return False

    @staticmethod
    def _terminate(signum, frame):
        raise _Terminated(128 + signum)

    def _make_parents(self):
        missing = [p for p in self.final.parents if not p.exists()]
        for p in reversed(missing):
            try:
                p.mkdir()
            except FileExistsError:
                continue
            self.made.append(p)

    def _lock(self):
        path = self.final.with_name(f".{self.final.name}.lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise CheckpointError(f"another process is writing {self.given}; wait for it "
                                      "or choose another path") from None
            try:  # the lock holder before us may have removed the file we locked
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.lock = (fd, path)
                return
            os.close(fd)

    def _release(self):
        if self.lock:
            fd, path = self.lock
            path.unlink(missing_ok=True)  # while holding it: a waiting run re-checks the inode
            os.close(fd)
            self.lock = None
        if not self.committed:
            for p in reversed(self.made):
                try:
                    p.rmdir()
                except OSError:
                    break
        self.made = []

    def _leftovers(self, kind: str):
        """(path, pid) of what an earlier run of ours left beside the output: exactly the names
        stage() makes (.NAME.partial-PID-HEX8, .NAME.old-PID), nothing that merely resembles them."""
        pattern = re.compile(re.escape(f".{self.final.name}.{kind}-") + (
            r"(\d+)-[0-9a-f]{8}" if kind == "partial" else r"(\d+)"))
        for p in self.final.parent.glob(f".{glob.escape(self.final.name)}.{kind}-*"):
            m = pattern.fullmatch(p.name)
            if m and p.is_dir() and not p.is_symlink():
                yield p, int(m.group(1))

    def _restore_interrupted(self):
        """A run killed between the two renames of its commit left the old output aside and
        none at the path: put it back before anything else, so no rerun loses it."""
        if self.final.exists() or self.final.is_symlink() or not self.final.parent.is_dir():
            return
        for p, pid in self._leftovers("old"):
            if pid != os.getpid() and not _pid_alive(pid):
                try:
                    p.rename(self.final)
                except OSError:  # another run restored it first
                    continue
                self.log(f"[INFO] restored {self.given} from {p.name}, left by a run interrupted while replacing it")
                return

    def _remove_stale(self):
        for kind in ("partial", "old"):
            for p, pid in self._leftovers(kind):
                if pid != os.getpid() and not _pid_alive(pid):
                    shutil.rmtree(p, ignore_errors=True)
                    self.log(f"[INFO] removed {p.name}, left by an interrupted run")

    @contextmanager
    def stage(self):
        staging = self.final.with_name(f".{self.final.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        staging.mkdir()  # mode 0777 less the umask, as any new directory
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        write_manifest(staging)
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            self.final.rename(old)
            staging.rename(self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(self.final)
        self.committed = True


@contextmanager
def staged_directory(final: Path, force: bool = False, inputs: Iterable = ()):
    """Yield a temporary directory beside `final`; it becomes `final` only if the
    block completes, so a failed or interrupted run leaves nothing half-written
    (see OutputDir for what may be replaced)."""
    with OutputDir(final, force, inputs) as out, out.stage() as staging:
        yield staging


def copy_tokenizer(src: Path, dst: Path):
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
