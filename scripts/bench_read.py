"""Reading cost per tensor of a many-tensor, single-file checkpoint.

Writes a tiny-width skipless Llama checkpoint with many layers into one
model.safetensors (thousands of small tensors), then opens it and reads every
tensor as the converter does. A reader that re-parses the file's header for
each tensor costs time proportional to tensors x header size here.

    python scripts/bench_read.py                  # 333 layers: 2,334 tensors
    python scripts/bench_read.py --layers 100 --dir /tmp/ckpt
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from mlx_skipless import synthetic
from mlx_skipless.models.skipless import ModelArgs
from mlx_skipless.safetensors_reader import TensorSource


def write(path: Path, layers: int):
    args = ModelArgs(
        hidden_size=32,
        num_hidden_layers=layers,
        intermediate_size=48,
        num_attention_heads=4,
        vocab_size=64,
        mlp_type="glu",
        hidden_act="silu",
        final_norm="rmsnorm",
    )
    path.mkdir(parents=True, exist_ok=True)
    flat = synthetic.random_flat(args)
    mx.save_safetensors(str(path / "model.safetensors"), {k: mx.array(v).astype(mx.float32) for k, v in flat.items()})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=333)
    p.add_argument("--dir", help="checkpoint directory (written if absent; default: a temporary one)")
    o = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(o.dir or tmp)
        if not (path / "model.safetensors").exists():
            write(path, o.layers)
        start = time.perf_counter()
        source = TensorSource(path)
        opened = time.perf_counter()
        for key in source.keys():
            source.numpy(key)
        done = time.perf_counter()
    n = len(source.shapes)
    print(
        f"{n} tensors in one file: open {opened - start:.3f} s, read all {done - opened:.2f} s "
        f"({1000 * (done - opened) / n:.2f} ms per tensor)"
    )


if __name__ == "__main__":
    sys.exit(main())
