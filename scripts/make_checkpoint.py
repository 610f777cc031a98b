"""Write a large synthetic skipless checkpoint, block by block, in Hugging Face's llama layout.

Random, well-conditioned weights (square projections I + noise) stored as bfloat16,
one safetensors shard per block plus one for the embeddings, so writing holds one
block at a time whatever the depth (mlx_skipless.synthetic.write_checkpoint). For
conversion benchmarks at real sizes:

    python scripts/make_checkpoint.py big/mistral-7b --preset mistral-7b --distinct 4
    python scripts/make_checkpoint.py /tmp/one --preset mistral-7b --layers 1 --standard
    python scripts/make_checkpoint.py big/src --preset over-ram --distinct 1    # 28 GB: see bench_over_ram.py
"""

import argparse
import sys
import time
from pathlib import Path

from mlx_skipless.synthetic import PRESETS, preset_args, write_checkpoint


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path, help="output directory (must not exist)")
    p.add_argument("--preset", choices=list(PRESETS), default="mistral-7b")
    p.add_argument("--layers", type=int, help="depth (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--standard", action="store_true", help="a stock llama of the same shape (with norms)")
    p.add_argument(
        "--distinct",
        type=int,
        default=0,
        help="draw only this many random blocks and repeat them (default 0: every block drawn)",
    )
    p.add_argument(
        "--ill-conditioned",
        type=int,
        metavar="LAYER",
        help="give this layer's Q condition number 1e4 (--remove auto's worst case)",
    )
    opts = p.parse_args(argv)
    if opts.path.exists():
        print(f"error: {opts.path} exists", file=sys.stderr)
        return 1
    args = preset_args(opts.preset, opts.layers)
    start = time.perf_counter()
    try:
        write_checkpoint(
            opts.path,
            args,
            opts.seed,
            opts.standard,
            distinct=opts.distinct,
            ill_conditioned=opts.ill_conditioned,
            progress=lambda i: print(
                f"\rwrote block {i}/{args.num_hidden_layers} ({time.perf_counter() - start:.0f} s)", end="", flush=True
            ),
        )
    except ValueError as e:  # checked before anything is written
        print(f"error: --{e}", file=sys.stderr)
        return 1
    print(f"\n{opts.path}: {sum(f.stat().st_size for f in opts.path.iterdir()) / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
