"""How weights are stored as bytes: safetensors' dtype names, the numpy view of each,
and rounding float32 to the float dtype an output is stored in.

Shared by the reader and the writer of safetensors files, and by fusion's storing of
blocks, which must round exactly as MLX's cast does for verification to see the
model that is written.
"""

from typing import Tuple

import mlx.core as mx
import numpy as np

# safetensors dtype -> how numpy reads its bytes (bfloat16: as the upper halves of float32s)
STORED = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}
FLOATING = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# MLX dtype -> its safetensors name, for writing
SAFETENSORS_DTYPES = {
    mx.float32: "F32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.uint32: "U32",
    mx.int32: "I32",
    mx.uint16: "U16",
    mx.int16: "I16",
    mx.uint8: "U8",
    mx.int8: "I8",
    mx.int64: "I64",
    mx.uint64: "U64",
    mx.bool_: "BOOL",
}

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
    # By bits, not by MLX's own cast (mx.array(x).astype(mx.bfloat16)): the two agree bit for
    # bit, but the cast with its copies in and out took twice as long on a 4096 x 4096 float32
    # array (x86_64, one core: 0.044 s against 0.023 s), and its values would cost a second cast.
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
