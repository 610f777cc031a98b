"""Checkpoint files: lazy sharded reading, mlx-lm's shard layout, atomic output."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_skipless.errors import CheckpointError
from mlx_skipless.manifest import MANIFEST
from mlx_skipless.output_dir import staged_directory
from mlx_skipless.safetensors_reader import TensorSource
from mlx_skipless.shards import ShardWriter


def write_shards(path, tensors, max_bytes):
    writer = ShardWriter(path, max_bytes=max_bytes)
    writer.add({k: mx.array(v) for k, v in tensors.items()})
    writer.close(total_parameters=sum(v.size for v in tensors.values()))


def test_shards_follow_mlx_lm_layout_and_read_back(tmp_path):
    tensors = {f"t{i}": np.full((16, 16), i, np.float32) for i in range(5)}
    write_shards(tmp_path, tensors, max_bytes=2 * 16 * 16 * 4)
    names = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_parameters"] == 5 * 256
    source = TensorSource(tmp_path)
    for k, v in tensors.items():
        np.testing.assert_array_equal(source.numpy(k), v)


def test_single_file_is_model_safetensors(tmp_path):
    write_shards(tmp_path, {"a": np.zeros(4, np.float32)}, max_bytes=1 << 20)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]


def test_missing_and_truncated_shards_are_named(tmp_path):
    tensors = {f"t{i}": np.ones((64, 64), np.float32) for i in range(2)}
    write_shards(tmp_path, tensors, max_bytes=64 * 64 * 4)
    second = tmp_path / "model-00002-of-00002.safetensors"
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors is unreadable or truncated"):
        TensorSource(tmp_path)
    second.unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors is missing"):
        TensorSource(tmp_path)


def test_no_weights_at_all(tmp_path):
    with pytest.raises(CheckpointError, match="no \\*.safetensors weight files"):
        TensorSource(tmp_path)


def test_staged_directory_is_all_or_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_directory(final) as staging:
            (staging / "half.txt").write_text("written")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with staged_directory(final) as staging:
        (staging / "config.json").write_text(json.dumps({"model_type": "skipless", "mlx_skipless": {}}))
    assert (final / "config.json").exists()
    with pytest.raises(CheckpointError, match="exists; pass --force"):
        with staged_directory(final):
            pass
    with staged_directory(final, force=True) as staging:
        (staging / "README.md").write_text("replaced")
    assert sorted(p.name for p in final.iterdir()) == [MANIFEST, "README.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_every_stored_dtype_round_trips_bit_exactly(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "bf16": mx.array(rng.standard_normal((3, 5))).astype(mx.bfloat16),
        "f16": mx.array(rng.standard_normal(7)).astype(mx.float16),
        "u32": mx.array(rng.integers(0, 2**32, (4, 2), dtype=np.uint32)),
    }
    writer = ShardWriter(tmp_path, max_bytes=40)
    writer.add(tensors)
    writer.close(total_parameters=0)
    assert not list(tmp_path.glob("*.partial"))
    loaded = {}
    for f in tmp_path.glob("model-*.safetensors"):
        loaded.update(mx.load(str(f)))
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and mx.array_equal(loaded[k], v).item()


def test_weights_are_stored_as_mlx_casts_them():
    """as_stored rounds in numpy (no copies through MLX); its bits and values must be MLX's:
    ties to even, subnormals, overflow to infinity, in bfloat16 and float16."""
    from mlx_skipless.dtypes import ROUNDING_CHUNK, as_stored

    rng = np.random.default_rng(0)
    ties = (rng.integers(0, 2**32, 20_000, dtype=np.uint64).astype(np.uint32) & 0xFFFF0000) | 0x8000
    x = np.concatenate(
        [
            ties.view(np.float32),
            rng.standard_normal(20_000).astype(np.float32) * 1e-39,
            rng.standard_normal(20_000).astype(np.float32) * 7e4,
            np.array([0.0, -0.0, 3.4028235e38, -3.4028235e38, 65520.0, 6e-8], np.float32),
        ]
    )
    x = x[np.isfinite(x)]
    exact = np.array(mx.array(x[:999].reshape(27, 37)).astype(mx.bfloat16).astype(mx.float32))  # read from bf16
    several_pieces = np.concatenate([x] * 3)[:-5]  # rounding goes a piece at a time: a ragged last one
    assert several_pieces.size > 2 * ROUNDING_CHUNK and several_pieces.size % ROUNDING_CHUNK
    for x in (x, several_pieces, exact, np.array(1.1, np.float32)):
        for dtype in (mx.bfloat16, mx.float16, mx.float32):
            raw, values = as_stored(x, dtype)
            cast = mx.array(x).astype(dtype)
            expected = np.array(cast.view(mx.uint16) if dtype == mx.bfloat16 else cast)
            assert raw.shape == values.shape == x.shape and raw.tobytes() == expected.tobytes()
            assert values.tobytes() == np.array(cast.astype(mx.float32)).tobytes()
