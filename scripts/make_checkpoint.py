"""Write a large synthetic skipless checkpoint, block by block, in Hugging Face's llama layout.

Random, well-conditioned weights (square projections I + noise) stored as bfloat16,
one safetensors shard per block plus one for the embeddings, so writing holds one
block at a time whatever the depth. For conversion benchmarks at real sizes:

    python scripts/make_checkpoint.py big/mistral-7b --preset mistral-7b --distinct 4
    python scripts/make_checkpoint.py /tmp/one --preset mistral-7b --layers 1 --standard
    python scripts/make_checkpoint.py big/src --preset over-ram --distinct 1    # 28 GB: see bench_over_ram.py
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from mlx_skipless import synthetic
from mlx_skipless.models.skipless import ModelArgs

LLAMA = dict(mlp_type="glu", hidden_act="silu", final_norm="rmsnorm")
PRESETS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, **LLAMA),  # a smoke test, not a measurement
    # A TinyLlama-like block: d 2048, GQA 32/4, SwiGLU 5632.
    "tinyllama": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, **LLAMA),
    "mistral-7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, **LLAMA),
    # Wide and shallow: many bytes for few FLOPs (the conversion's products grow as d²·f, bytes as d·f).
    "wide": dict(hidden_size=2048, num_hidden_layers=8, intermediate_size=229376, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000, **LLAMA),
    # Larger than this machine's 24 GiB of RAM (26.4 GiB in bfloat16) at little cost: fusion costs
    # about 2·d FLOPs a weight, so a narrow stream (d 256) with a wide FFN keeps the whole
    # conversion near 15 TFLOP, and 280 blocks of 0.1 GB show that memory follows the block.
    "over-ram": dict(hidden_size=256, num_hidden_layers=280, intermediate_size=65536, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=32000, **LLAMA),
}


def preset_args(preset: str, layers=None) -> ModelArgs:
    fields = dict(PRESETS[preset])
    if layers is not None:
        fields["num_hidden_layers"] = layers
    return ModelArgs(**fields)


def write_checkpoint(path: Path, args: ModelArgs, seed: int = 0, standard: bool = False, progress=None,
                     distinct: int = 0, drawn: Optional[dict] = None, ill_conditioned: Optional[int] = None):
    """A llama-layout checkpoint of `args`, written one block at a time: skipless (declared
    so in config.json), or with `standard` a stock llama of the same shape (its two norms per
    block added), the model that mlx_lm convert handles. With `distinct` > 0 only that many
    random blocks are drawn and repeated in turn (drawing dominates writing on a small CPU);
    `drawn`, a dict, keeps them and the embeddings for the next checkpoint of the shape.
    `ill_conditioned`: a layer whose Q gets condition number 1e4, which bfloat16 cannot
    invert well: --remove auto's first plan is then over its budget (its worst case)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    weight_map, drawn = {}, {} if drawn is None else drawn

    def save(name, tensors):
        mx.save_safetensors(str(path / name), tensors, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    def bf16(tensors):
        out = {k: mx.array(v).astype(mx.bfloat16) for k, v in tensors.items()}
        mx.eval(out)
        return out

    d = args.hidden_size
    if "embed" not in drawn:
        drawn["embed"] = bf16({
            "model.embed_tokens.weight": rng.standard_normal((args.vocab_size, d), dtype=np.float32),
            "model.norm.weight": np.ones(d, np.float32),
            "lm_head.weight": rng.standard_normal((args.vocab_size, d), dtype=np.float32) / d**0.5})
    shard = lambda k: f"model-{k + 1:05d}-of-{args.num_hidden_layers + 1:05d}.safetensors"  # noqa: E731
    save(shard(args.num_hidden_layers), drawn["embed"])
    norms = bf16({"input_layernorm.weight": np.ones(d, np.float32),
                  "post_attention_layernorm.weight": np.ones(d, np.float32)}) if standard else {}
    for i in range(args.num_hidden_layers):
        j = i % distinct if distinct else None
        block = drawn.get(j) if distinct else None
        if block is None:
            block = bf16(synthetic.random_block(args, rng, dtype=np.float32))
            if distinct:
                drawn[j] = block
        if i == ill_conditioned:
            block = {**block, "self_attn.q_proj.weight": bf16({"q": _ill_conditioned(d, rng)})["q"]}
        save(shard(i), {f"model.layers.{i}.{k}": v for k, v in {**block, **norms}.items()})
        del block
        if progress:
            progress(i + 1)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"],
                  hidden_size=d, intermediate_size=args.intermediate_size, num_hidden_layers=args.num_hidden_layers,
                  num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
                  vocab_size=args.vocab_size, hidden_act="silu", rms_norm_eps=1e-5, torch_dtype="bfloat16",
                  max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False)
    if not standard:
        config["skipless"] = True
    (path / "config.json").write_text(json.dumps(config))
    write_tokenizer(path, args.vocab_size)


def write_tokenizer(path: Path, vocab_size: int):
    """A word-level tokenizer over the ids `w0`...: mlx_lm convert wants one beside the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "unk_token": "w0", "eos_token": "w0"}))


def _ill_conditioned(d: int, rng, cond: float = 1e4) -> np.ndarray:
    U, _ = np.linalg.qr(rng.standard_normal((d, d), dtype=np.float32))
    V, _ = np.linalg.qr(rng.standard_normal((d, d), dtype=np.float32))
    return (U * np.geomspace(1, 1 / cond, d, dtype=np.float32)) @ V.T


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path, help="output directory (must not exist)")
    p.add_argument("--preset", choices=list(PRESETS), default="mistral-7b")
    p.add_argument("--layers", type=int, help="depth (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--standard", action="store_true", help="a stock llama of the same shape (with norms)")
    p.add_argument("--distinct", type=int, default=0,
                   help="draw only this many random blocks and repeat them (default 0: every block drawn)")
    p.add_argument("--ill-conditioned", type=int, metavar="LAYER",
                   help="give this layer's Q condition number 1e4 (--remove auto's worst case)")
    opts = p.parse_args(argv)
    if opts.path.exists():
        print(f"error: {opts.path} exists", file=sys.stderr)
        return 1
    args = preset_args(opts.preset, opts.layers)
    if opts.ill_conditioned is not None and not 0 <= opts.ill_conditioned < args.num_hidden_layers:
        print(f"error: --ill-conditioned {opts.ill_conditioned}: the model has layers 0 to "
              f"{args.num_hidden_layers - 1}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    write_checkpoint(opts.path, args, opts.seed, opts.standard, distinct=opts.distinct,
                     ill_conditioned=opts.ill_conditioned,
                     progress=lambda i: print(f"\rwrote block {i}/{args.num_hidden_layers} "
                                              f"({time.perf_counter() - start:.0f} s)", end="", flush=True))
    print(f"\n{opts.path}: {sum(f.stat().st_size for f in opts.path.iterdir()) / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
