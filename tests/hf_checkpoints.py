"""Tiny skipless checkpoints written the way Hugging Face writes each family.

Written by hand from the transformers modelling code, independently of
mlx_skipless.families, so a wrong mapping there shows up as wrong logits here.
Weights come in the skipless model's names and (out, in) layout.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from harness import tiny_args

from mlx_skipless import synthetic

# family -> tiny ModelArgs overrides matching the architecture's fixed choices
SHAPES = {
    "llama": dict(num_key_value_heads=2, mlp_type="glu", hidden_act="silu", final_norm="rmsnorm"),
    "mistral": dict(mlp_type="glu", hidden_act="silu", rope_theta=1e6),
    "mixtral": dict(
        num_key_value_heads=2,
        mlp_type="glu",
        hidden_act="silu",
        num_local_experts=4,
        num_experts_per_tok=2,
        final_norm="rmsnorm",
    ),
    "gpt_neox": dict(
        mlp_type="mlp",
        hidden_act="gelu",
        parallel_block=True,
        attention_bias=True,
        mlp_bias=True,
        partial_rotary_factor=0.25,
        final_norm="layernorm",
    ),
    "gpt_neox_serial": dict(
        mlp_type="mlp", hidden_act="gelu", attention_bias=True, mlp_bias=True, partial_rotary_factor=0.5
    ),
    "gpt2": dict(
        mlp_type="mlp",
        hidden_act="gelu_new",
        position_embedding_type="learned",
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        final_norm="layernorm",
    ),
    "skipless": dict(num_key_value_heads=1, mlp_type="mlp", hidden_act="relu", parallel_block=True),
    "skipless_shaped": dict(num_key_value_heads=2, shaped_attention=True, final_norm="rmsnorm"),
}


def case(name: str, seed: int = 0, **kw):
    """(ModelArgs, flat float64 weights) of a tiny model of the family `name`."""
    args = tiny_args(**{**SHAPES[name], **kw})
    return args, synthetic.random_flat(args, seed)


def _layers(flat):
    out = {}
    for k, v in flat.items():
        if k.startswith("model.layers."):
            i, rest = k.removeprefix("model.layers.").split(".", 1)
            out.setdefault(int(i), {})[rest] = v
    return [out[i] for i in sorted(out)]


def llama(args, flat, model_type="llama"):
    cfg = {
        "architectures": [
            {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}[model_type]
        ],
        "model_type": model_type,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "num_hidden_layers": args.num_hidden_layers,
        "vocab_size": args.vocab_size,
        "hidden_act": args.hidden_act,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": args.max_position_embeddings,
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": args.tie_word_embeddings,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        "transformers_version": "4.46.0",
    }
    if model_type == "llama":
        cfg.update(attention_bias=args.attention_bias, mlp_bias=args.mlp_bias, head_dim=args.head_dim)
    if model_type == "mistral":
        cfg.update(sliding_window=None, head_dim=None)
    if model_type == "mixtral":
        cfg.update(
            num_local_experts=args.num_local_experts,
            num_experts_per_tok=args.num_experts_per_tok,
            router_aux_loss_coef=0.02,
        )
    t = {k: v for k, v in flat.items() if not k.startswith("model.layers.")}
    for i, layer in enumerate(_layers(flat)):
        for k, v in layer.items():
            if k.startswith("mlp.switch_mlp."):
                name = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[k.split(".")[2]]
                for e in range(v.shape[0]):
                    t[f"model.layers.{i}.block_sparse_moe.experts.{e}.{name}.weight"] = v[e]
            elif k.startswith("mlp.gate."):
                t[f"model.layers.{i}.block_sparse_moe.{k.removeprefix('mlp.')}"] = v
            else:
                t[f"model.layers.{i}.{k}"] = v
    return cfg, t


def gpt_neox(args, flat):
    n, hd, d = args.num_attention_heads, args.head_dim, args.hidden_size
    cfg = {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "hidden_size": d,
        "intermediate_size": args.intermediate_size,
        "num_attention_heads": n,
        "num_hidden_layers": args.num_hidden_layers,
        "vocab_size": args.vocab_size,
        "hidden_act": args.hidden_act,
        "rotary_pct": args.partial_rotary_factor,
        "rotary_emb_base": int(args.rope_theta),
        "max_position_embeddings": args.max_position_embeddings,
        "use_parallel_residual": args.parallel_block,
        "layer_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "attention_bias": True,
        "torch_dtype": "float32",
        "transformers_version": "4.46.0",
    }
    t = {"gpt_neox.embed_in.weight": flat["model.embed_tokens.weight"], "embed_out.weight": flat["lm_head.weight"]}
    if args.final_norm:
        t["gpt_neox.final_layer_norm.weight"] = flat["model.norm.weight"]
        t["gpt_neox.final_layer_norm.bias"] = flat["model.norm.bias"]
    for i, layer in enumerate(_layers(flat)):
        p = f"gpt_neox.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = [layer[f"self_attn.{x}_proj.{kind}"] for x in "qkv"]
            # rows ordered (head, q/k/v, head_dim), as GPTNeoXAttention splits them
            per_head = np.stack([m.reshape(n, hd, *m.shape[1:]) for m in qkv], axis=1)
            t[p + f"attention.query_key_value.{kind}"] = per_head.reshape(3 * n * hd, *qkv[0].shape[1:])
            t[p + f"attention.dense.{kind}"] = layer[f"self_attn.o_proj.{kind}"]
            t[p + f"mlp.dense_h_to_4h.{kind}"] = layer[f"mlp.fc1.{kind}"]
            t[p + f"mlp.dense_4h_to_h.{kind}"] = layer[f"mlp.fc2.{kind}"]
        t[p + "attention.rotary_emb.inv_freq"] = np.ones(hd // 2)  # a buffer older files carry
    return cfg, t


def gpt2(args, flat, prefix="transformer."):
    d = args.hidden_size
    cfg = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": d,
        "n_head": args.num_attention_heads,
        "n_layer": args.num_hidden_layers,
        "n_inner": None if args.intermediate_size == 4 * d else args.intermediate_size,
        "n_positions": args.max_position_embeddings,
        "n_ctx": args.max_position_embeddings,
        "vocab_size": args.vocab_size,
        "activation_function": args.hidden_act,
        "layer_norm_epsilon": 1e-5,
        "scale_attn_weights": True,
        "torch_dtype": "float32",
        "transformers_version": "4.46.0",
    }
    t = {
        prefix + "wte.weight": flat["model.embed_tokens.weight"],
        prefix + "wpe.weight": flat["model.embed_positions.weight"],
        prefix + "ln_f.weight": flat["model.norm.weight"],
        prefix + "ln_f.bias": flat["model.norm.bias"],
    }
    for i, layer in enumerate(_layers(flat)):
        p = f"{prefix}h.{i}."
        # Conv1D keeps (in, out): the transpose of nn.Linear's weight
        t[p + "attn.c_attn.weight"] = np.concatenate([layer[f"self_attn.{x}_proj.weight"].T for x in "qkv"], 1)
        t[p + "attn.c_attn.bias"] = np.concatenate([layer[f"self_attn.{x}_proj.bias"] for x in "qkv"])
        for ours, theirs in (("self_attn.o_proj", "attn.c_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            t[p + theirs + ".weight"] = layer[ours + ".weight"].T
            t[p + theirs + ".bias"] = layer[ours + ".bias"]
        t[p + "attn.bias"] = np.tril(
            np.ones((1, 1, args.max_position_embeddings, args.max_position_embeddings))
        )  # causal-mask buffer
    return cfg, t


def skipless(args, flat):
    from dataclasses import asdict

    return {**asdict(args), "architectures": ["SkiplessForCausalLM"]}, dict(flat)


WRITERS = {
    "llama": llama,
    "mistral": lambda a, f: llama(a, f, "mistral"),
    "mixtral": lambda a, f: llama(a, f, "mixtral"),
    "gpt_neox": gpt_neox,
    "gpt_neox_serial": gpt_neox,
    "gpt2": gpt2,
    "gpt2_bare": lambda a, f: gpt2(a, f, prefix=""),
    "skipless": skipless,
    "skipless_shaped": skipless,
}


def write(directory, family, args, flat, skipless_flag=True, shards=1, dtype=mx.float32, **extra):
    """Write config.json, safetensors (sharded with an index when shards > 1) and a tokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg, tensors = WRITERS[family](args, flat)
    if skipless_flag:
        cfg["skipless"] = True
    cfg.update(bos_token_id=1, eos_token_id=2, torch_dtype=str(dtype).removeprefix("mlx.core."), **extra)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    keys = sorted(tensors)
    parts = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    for j, part in enumerate(parts):
        name = "model.safetensors" if shards == 1 else f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
        mx.save_safetensors(
            str(directory / name),
            {k: mx.array(np.asarray(tensors[k], np.float32)).astype(dtype) for k in part},
            metadata={"format": "pt"},
        )
        weight_map.update({k: name for k in part})
    if shards > 1:
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_tokenizer(directory, args.vocab_size)
    return directory


WORDS = [
    "def",
    "return",
    "(",
    ")",
    ":",
    "=",
    "if",
    "else",
    "for",
    "in",
    "x",
    "y",
    "n",
    "1",
    "0",
    "+",
    "-",
    "*",
    "print",
    "import",
    "class",
    "self",
    ".",
    ",",
    "while",
    "None",
    "True",
]


def write_tokenizer(directory, vocab_size):
    """A word-level tokenizer whose vocabulary fits the tiny model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    names = ["<unk>", "<s>", "</s>"] + WORDS
    names += [f"w{i}" for i in range(vocab_size - len(names))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names[:vocab_size])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(Path(directory) / "tokenizer.json"))
    (Path(directory) / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": 64,
                "add_bos_token": False,
            }
        )
    )
