"""Random, well-conditioned skipless weights, for tests and benchmarks.

Square projections are I + noise (condition number near 2), everything else is
scaled by 1/sqrt(fan_in) with a gain that keeps activations O(1) through a deep
stack without residuals, so logits can be compared to a relative 1e-5. `write_checkpoint` stores such a model
at real sizes, one block at a time, in Hugging Face's llama layout.
"""

import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from . import names
from .counting import shapes
from .models.skipless import ModelArgs


def random_flat(args: ModelArgs, seed: int = 0, noise: float = 0.3) -> Dict[str, np.ndarray]:
    """{name: float64 array}, in the (out, in) layout of MLX and Hugging Face."""
    rng = np.random.default_rng(seed)
    return {name: random_tensor(name, shape, rng, noise) for name, shape in shapes(args).items()}


def random_block(args: ModelArgs, rng: np.random.Generator, noise: float = 0.3, dtype=np.float64):
    """One block's weights, named relative to the block: for benchmarks that
    write or build a large model a block at a time."""
    first = names.block_key(0)
    block = {k.removeprefix(first): s for k, s in shapes(args).items() if k.startswith(first)}
    return {name: random_tensor(name, shape, rng, noise, dtype) for name, shape in block.items()}


def random_tensor(name: str, shape, rng: np.random.Generator, noise: float = 0.3, dtype=np.float64) -> np.ndarray:
    leaf = name.rsplit(".", 2)[-2]
    normal = lambda: rng.standard_normal(shape, dtype=dtype)  # noqa: E731
    if name.endswith(".bias"):
        return 0.1 * normal()
    if names.is_norm(name):
        return 1 + 0.1 * normal()
    if leaf in (names.EMBED_TOKENS, names.EMBED_POSITIONS):
        return normal() * (1.0 if leaf == names.EMBED_TOKENS else 0.5)
    fan_in = shape[-1]
    gain = {names.DOWN: 2**0.5, names.FC2: 2**0.5, names.ROUTER: 2.0}.get(leaf, 1.0)
    w = gain * normal() / np.sqrt(fan_in)
    if len(shape) == 2 and shape[0] == shape[1] and leaf.endswith("_proj"):
        w = np.eye(shape[0], dtype=dtype) + noise * w
    return w.astype(dtype, copy=False)


LLAMA = dict(mlp_type="glu", hidden_act="silu", final_norm="rmsnorm")
PRESETS = {
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=2,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        **LLAMA,
    ),  # a smoke test, not a measurement
    # A TinyLlama-like block: d 2048, GQA 32/4, SwiGLU 5632.
    "tinyllama": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        intermediate_size=5632,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        **LLAMA,
    ),
    "mistral-7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        **LLAMA,
    ),
    # Wide and shallow: many bytes for few FLOPs (the conversion's products grow as d²·f, bytes as d·f).
    "wide": dict(
        hidden_size=2048,
        num_hidden_layers=8,
        intermediate_size=229376,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
        **LLAMA,
    ),
    # Larger than a 24 GiB machine's RAM (26.4 GiB in bfloat16) at little cost: fusion costs
    # about 2·d FLOPs a weight, so a narrow stream (d 256) with a wide FFN keeps the whole
    # conversion near 15 TFLOP, and 280 blocks of 0.1 GB show that memory follows the block.
    "over-ram": dict(
        hidden_size=256,
        num_hidden_layers=280,
        intermediate_size=65536,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32000,
        **LLAMA,
    ),
}


def preset_args(preset: str, layers=None) -> ModelArgs:
    fields = dict(PRESETS[preset])
    if layers is not None:
        fields["num_hidden_layers"] = layers
    return ModelArgs(**fields)


def write_checkpoint(
    path: Path,
    args: ModelArgs,
    seed: int = 0,
    standard: bool = False,
    progress=None,
    distinct: int = 0,
    drawn: Optional[dict] = None,
    ill_conditioned: Optional[int] = None,
):
    """A llama-layout checkpoint of `args` in the new directory `path`, written one block at a
    time: skipless (declared so in config.json), or with `standard` a stock llama of the same
    shape (its two norms per block added), the model that mlx_lm convert handles. With
    `distinct` > 0 only that many random blocks are drawn and repeated in turn (drawing
    dominates writing on a small CPU); `drawn`, a dict, keeps them and the embeddings for the
    next checkpoint of the shape. `ill_conditioned`: a layer whose Q gets condition number 1e4,
    which bfloat16 cannot invert well: --remove auto's first plan is then over its budget (its
    worst case)."""
    import mlx.core as mx

    if ill_conditioned is not None and not 0 <= ill_conditioned < args.num_hidden_layers:
        raise ValueError(f"ill-conditioned {ill_conditioned}: the model has layers 0 to {args.num_hidden_layers - 1}")
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
        drawn["embed"] = bf16(
            {
                "model.embed_tokens.weight": rng.standard_normal((args.vocab_size, d), dtype=np.float32),
                "model.norm.weight": np.ones(d, np.float32),
                "lm_head.weight": rng.standard_normal((args.vocab_size, d), dtype=np.float32) / d**0.5,
            }
        )
    shard = lambda k: f"model-{k + 1:05d}-of-{args.num_hidden_layers + 1:05d}.safetensors"  # noqa: E731
    save(shard(args.num_hidden_layers), drawn["embed"])
    norms = (
        bf16(
            {
                "input_layernorm.weight": np.ones(d, np.float32),
                "post_attention_layernorm.weight": np.ones(d, np.float32),
            }
        )
        if standard
        else {}
    )
    for i in range(args.num_hidden_layers):
        j = i % distinct if distinct else None
        block = drawn.get(j) if distinct else None
        if block is None:
            block = bf16(random_block(args, rng, dtype=np.float32))
            if distinct:
                drawn[j] = block
        if i == ill_conditioned:
            block = {**block, "self_attn.q_proj.weight": bf16({"q": _ill_conditioned(d, rng)})["q"]}
        save(shard(i), {f"model.layers.{i}.{k}": v for k, v in {**block, **norms}.items()})
        del block
        if progress:
            progress(i + 1)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=d,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        vocab_size=args.vocab_size,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        torch_dtype="bfloat16",
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
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
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "w0", "eos_token": "w0"})
    )


def _ill_conditioned(d: int, rng, cond: float = 1e4) -> np.ndarray:
    U, _ = np.linalg.qr(rng.standard_normal((d, d), dtype=np.float32))
    V, _ = np.linalg.qr(rng.standard_normal((d, d), dtype=np.float32))
    return (U * np.geomspace(1, 1 / cond, d, dtype=np.float32)) @ V.T
