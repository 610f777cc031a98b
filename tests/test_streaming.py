"""Conversion streams: memory follows one block, not the model, so checkpoints larger than RAM
convert (the figures at scale are in the README); and the writer never needs the model twice on disk."""

import tracemalloc

import mlx.core as mx
import numpy as np
import pytest

from mlx_skipless.convert import convert
from mlx_skipless.models.skipless import ModelArgs
from mlx_skipless.shards import ShardWriter
from mlx_skipless.synthetic import LLAMA, write_checkpoint

# Narrow and wide, like the over-ram preset: the FFN dominates a block, so holding blocks shows.
SHAPE = dict(
    hidden_size=64, intermediate_size=4096, num_attention_heads=2, num_key_value_heads=1, vocab_size=256, **LLAMA
)


def peak_bytes(tmp_path, layers: int) -> int:
    """The most host memory numpy and MLX held together while converting `layers` blocks."""
    src = tmp_path / f"src-{layers}"
    write_checkpoint(src, ModelArgs(num_hidden_layers=layers, **SHAPE), distinct=1)
    mx.clear_cache()
    mx.reset_peak_memory()
    tracemalloc.start()
    try:
        convert(
            str(src),
            str(tmp_path / f"out-{layers}"),
            dtype="bfloat16",
            verify_output=False,
            progress=False,
            log=lambda *a: None,
        )
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


@pytest.mark.parametrize("compact_below", [0, 1 << 20])
def test_writer_puts_each_tensor_in_its_shard_at_once(tmp_path, compact_below):
    """Tensors go straight into their shards' files: the disk never holds a second copy
    of the model. Large shards get their header written into the room left for it (no
    copy: the file written is the shard); small ones are copied out compactly."""
    tensors = {f"t{i}": mx.array(np.full((16, 16), i, np.float32)) for i in range(5)}
    writer = ShardWriter(tmp_path, max_bytes=2 * 16 * 16 * 4, header_room=4096, compact_below=compact_below)
    writer.add(tensors)
    partial = sorted(tmp_path.glob("*.partial"))
    assert len(partial) == 3 and sum(p.stat().st_size for p in partial) == 3 * 4096 + 5 * 16 * 16 * 4
    inodes = [p.stat().st_ino for p in partial]
    np.testing.assert_array_equal(np.array(writer.read("t3")), np.array(tensors["t3"]))
    writer.close(total_parameters=5 * 256)
    shards = [tmp_path / f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    in_place = [s.stat().st_ino for s in shards] == inodes
    assert in_place == (compact_below == 0) and not list(tmp_path.glob("*.partial"))
    sizes = [s.stat().st_size for s in shards]
    # A shard stored in place keeps its room (safetensors lets a header end in spaces).
    assert sizes == [4096 + 2048, 4096 + 2048, 4096 + 1024] if in_place else max(sizes) < 4096
    loaded = {}
    for s in shards:
        loaded.update(mx.load(str(s)))
    assert all(mx.array_equal(loaded[k], v).item() for k, v in tensors.items())


def test_writer_copies_a_shard_whose_header_outgrows_its_room(tmp_path):
    tensors = {f"a_long_name_for_tensor_{i}": mx.array(np.full(4, i, np.float32)) for i in range(40)}
    writer = ShardWriter(tmp_path, header_room=256, compact_below=0)
    writer.add(tensors)
    writer.close(total_parameters=160)
    loaded = mx.load(str(tmp_path / "model.safetensors"))
    assert all(mx.array_equal(loaded[k], v).item() for k, v in tensors.items())
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.compact"))
