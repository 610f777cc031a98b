"""Conversion streams: memory follows one block, not the model, so checkpoints larger than RAM
convert (the figures at scale are in the README); and the writer never needs the model twice on disk."""

import os
import sys
import tracemalloc
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_skipless.checkpoint import ShardWriter
from mlx_skipless.convert import convert
from mlx_skipless.models.skipless import ModelArgs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from make_checkpoint import LLAMA, write_checkpoint  # noqa: E402

# Narrow and wide, like the over-ram preset: the FFN dominates a block, so holding blocks shows.
SHAPE = dict(hidden_size=64, intermediate_size=4096, num_attention_heads=2, num_key_value_heads=1,
             vocab_size=256, **LLAMA)


def peak_bytes(tmp_path, layers: int) -> int:
    """The most host memory numpy and MLX held together while converting `layers` blocks."""
    src = tmp_path / f"src-{layers}"
    write_checkpoint(src, ModelArgs(num_hidden_layers=layers, **SHAPE), distinct=1)
    mx.clear_cache()
    mx.reset_peak_memory()
    tracemalloc.start()
    try:
        convert(str(src), str(tmp_path / f"out-{layers}"), dtype="bfloat16", verify_output=False,
                progress=False, log=lambda *a: None)
        numpy_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return numpy_peak + mx.get_peak_memory()


def test_peak_memory_does_not_grow_with_depth(tmp_path):
    block_bytes = 8 * 3 * SHAPE["hidden_size"] * SHAPE["intermediate_size"]  # its FFN in float64
    # Past three blocks each is fused between its two neighbours, whatever the depth.
    shallow, deep = peak_bytes(tmp_path, 4), peak_bytes(tmp_path, 10)
    # Holding the six extra blocks would add 6 * block_bytes; streaming adds bookkeeping only.
    assert deep - shallow < block_bytes / 2, (shallow, deep, block_bytes)


def test_writer_cuts_the_spool_as_it_writes_shards(tmp_path, monkeypatch):
    sizes = []
    write_shard = ShardWriter._write_shard

    def spy(path, entries, spool):
        sizes.append((os.fstat(spool.fileno()).st_size, entries[-1][3] + entries[-1][4]))
        write_shard(path, entries, spool)

    monkeypatch.setattr(ShardWriter, "_write_shard", staticmethod(spy))
    writer = ShardWriter(tmp_path, max_bytes=2 * 16 * 16 * 4)
    writer.add({f"t{i}": mx.array(np.full((16, 16), i, np.float32)) for i in range(5)})
    writer.close(total_parameters=5 * 256)
    # Each shard is copied out of a spool that ends where that shard's bytes end: the
    # shards after it are already gone from it, so the disk holds the model once plus a shard.
    assert len(sizes) == 3 and all(size == end for size, end in sizes)
    assert not list(tmp_path.glob("*.spool"))
