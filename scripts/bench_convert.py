"""Conversion cost: wall time and peak memory of converting generated checkpoints.

Writes skipless Llama-layout checkpoints (bfloat16, one safetensors shard per
block) that share one block shape and differ only in depth, converts each in a
fresh process, and prints wall time and peak RSS beside the sizes that should
bound it: if the converter streams, peak memory follows the largest block and
the embeddings, not the model.

    python scripts/bench_convert.py                     # 0.2B, 0.5B, 1.0B; ~15 min on 2 cores
    python scripts/bench_convert.py --layers 2 4 --no-verify --json
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_skipless import counting, synthetic
from mlx_skipless.models.skipless import ModelArgs

# A TinyLlama-like block: d 2048, GQA 32/4, SwiGLU 5632, vocab 32000.
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
             vocab_size=32000, mlp_type="glu", hidden_act="silu", final_norm="rmsnorm")


def write_checkpoint(path: Path, args: ModelArgs, seed: int = 0):
    """A Hugging Face llama-layout skipless checkpoint, written block by block."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    weight_map = {}

    def save(name, tensors):
        mx.save_safetensors(str(path / name), {k: mx.array(v).astype(mx.bfloat16) for k, v in tensors.items()},
                            metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    d = args.hidden_size
    save("embed.safetensors", {"model.embed_tokens.weight": rng.standard_normal((args.vocab_size, d), dtype=np.float32),
                               "model.norm.weight": np.ones(d, np.float32),
                               "lm_head.weight": rng.standard_normal((args.vocab_size, d), dtype=np.float32) / d**0.5})
    for i in range(args.num_hidden_layers):
        block = synthetic.random_block(args, rng, dtype=np.float32)
        save(f"layer-{i:03d}.safetensors", {f"model.layers.{i}.{k}": v for k, v in block.items()})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], skipless=True,
                  hidden_size=d, intermediate_size=args.intermediate_size, num_hidden_layers=args.num_hidden_layers,
                  num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
                  vocab_size=args.vocab_size, hidden_act="silu", rms_norm_eps=1e-5, torch_dtype="bfloat16",
                  max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False)
    (path / "config.json").write_text(json.dumps(config))


CHILD = """
import json, resource, sys, time
t = time.perf_counter()
from mlx_skipless.convert import convert
# The cost is measured whatever the verdict: random deep stacks may trip the degradation check.
report = convert(sys.argv[1], sys.argv[2], verify_output=sys.argv[3] == "1", progress=False,
                 allow_degraded=True, log=lambda *a: None)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print(json.dumps({"wall_s": time.perf_counter() - t, "peak_rss_bytes": peak,
                  "verification": report.get("verification", {}).get("stored")}))
"""
BASELINE = """
import resource, sys
import mlx.core, mlx_lm, numpy, mlx_skipless.convert
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024))
"""


def measure(layers: int, verify: bool, work: Path) -> dict:
    args = ModelArgs(num_hidden_layers=layers, **SHAPE)
    counts = counting.count(args)
    src = work / f"src-{layers}"
    write_checkpoint(src, args)
    run = subprocess.run([sys.executable, "-c", CHILD, str(src), str(work / f"out-{layers}"), str(int(verify))],
                         capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"conversion of {layers} layers failed:\n{run.stderr[-3000:]}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    comp = counts["components"]
    block = (counts["total"] - comp["embed_tokens"] - comp.get("lm_head", 0) - comp.get("norms", 0)) // layers
    return {"layers": layers, "parameters": counts["total"], "block_parameters": block,
            "embedding_parameters": comp["embed_tokens"] + comp.get("lm_head", 0),
            "model_bytes_float32": 4 * counts["total"], **result}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 8, 20],
                   help="depths to convert (the block shape is fixed; 20 layers is 1.03B weights)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json", action="store_true")
    opts = p.parse_args()
    baseline = int(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True,
                                  check=True).stdout)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as work:
        for layers in opts.layers:
            rows.append(measure(layers, opts.verify, Path(work)))
            if not opts.json:
                r = rows[-1]
                gb = 1e9
                print(f"{r['parameters'] / 1e9:5.2f}B params ({layers:3d} layers, {r['model_bytes_float32'] / gb:5.2f} GB "
                      f"in float32): {r['wall_s']:7.1f} s, peak RSS {r['peak_rss_bytes'] / gb:5.2f} GB "
                      f"= imports {baseline / gb:.2f} + {(r['peak_rss_bytes'] - baseline) / gb:.2f} GB; "
                      f"one block {4 * r['block_parameters'] / gb:.2f} GB, embeddings "
                      f"{4 * r['embedding_parameters'] / gb:.2f} GB (float32)", flush=True)
    if opts.json:
        print(json.dumps({"baseline_rss_bytes": baseline, "verify": opts.verify, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
