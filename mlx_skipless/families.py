"""Hugging Face checkpoint families, mapped onto the skipless model's tensors.

A family says two things: how config.json becomes `ModelArgs`, and, for every
tensor of the skipless model, which checkpoint tensors it is made of, their
expected shapes, and how (gpt-fast's weight-name templates). Reading, checking
and fusing are generic. A skipless checkpoint of a family is the family's own
architecture with every residual add and every norm inside the chain removed
(a final norm before the head may stay), so its files simply lack the block norms.
"""

import json
import math
import os
import re
import typing
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from . import names
from .errors import CheckpointError
from .models.skipless import Block, ModelArgs
from .names import EMBED, FINAL_NORM_PREFIX, HEAD, POSITIONS

NORM_REMOVAL = "python -m mlx_skipless.normfree (the norm-removal recipe, see the zoo)"
# Buffers some checkpoints carry that are not weights: causal masks, RoPE tables.
BUFFERS = re.compile(
    r"(\.attn\.bias|\.attn\.masked_bias|\.attention\.bias|"
    r"\.attention\.masked_bias|rotary_emb\.inv_freq)$"
)
NORM_LIKE = re.compile(r"(norm|ln_\d|\.ln_|_ln\.|layernorm)", re.IGNORECASE)


@dataclass(frozen=True)
class Source:
    """One skipless tensor: the checkpoint tensors it is built from, in order,
    their expected shapes, and the function that builds it from them."""

    keys: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]
    build: Callable[[List[np.ndarray]], np.ndarray] = lambda t: t[0]


def same(key: str, *shape: int) -> Source:
    return Source((key,), (shape,))


def conv1d(key: str, *shape: int) -> Source:
    """GPT-2's Conv1D stores (in, out); the model wants (out, in)."""
    return Source((key,), (shape,), lambda t: t[0].T)


def stacked(keys: List[str], *shape: int) -> Source:
    """Per-expert tensors -> one (experts, ...) tensor, as mlx-lm's SwitchGLU keeps them."""
    return Source(tuple(keys), (shape,) * len(keys), np.stack)


def _linear(sources: Dict[str, Source], ours: str, theirs: str, out: int, inp: int, bias: bool, make=same):
    sources[f"{ours}.weight"] = make(f"{theirs}.weight", *((inp, out) if make is conv1d else (out, inp)))
    if bias:
        sources[f"{ours}.bias"] = same(f"{theirs}.bias", out)


# -- config.json -> ModelArgs ---------------------------------------------------------------


def _rope(config: dict) -> dict:
    """RoPE settings under either transformers 4 or 5 config names."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    theta = config.get("rope_theta", config.get("rotary_emb_base", params.get("rope_theta", 10000.0)))
    out = {"rope_theta": float(theta), "rope_scaling": scaling}
    factor = config.get("partial_rotary_factor", config.get("rotary_pct", params.get("partial_rotary_factor")))
    if factor is not None:
        out["partial_rotary_factor"] = float(factor)
    return out


def _llama_args(c: dict) -> dict:
    n = c["num_attention_heads"]
    return dict(
        hidden_size=c["hidden_size"],
        num_hidden_layers=c["num_hidden_layers"],
        intermediate_size=c["intermediate_size"],
        num_attention_heads=n,
        vocab_size=c["vocab_size"],
        num_key_value_heads=c.get("num_key_value_heads") or n,
        head_dim=c.get("head_dim"),
        hidden_act=c.get("hidden_act", "silu"),
        mlp_type="glu",
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        attention_bias=c.get("attention_bias", False),
        mlp_bias=c.get("mlp_bias", False),
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        norm_eps=c.get("rms_norm_eps", 1e-5),
        **_rope(c),
    )


def _mixtral_args(c: dict) -> dict:
    return dict(
        _llama_args(c),
        num_local_experts=c["num_local_experts"],
        num_experts_per_tok=c.get("num_experts_per_tok", 2),
        mlp_bias=False,
    )


def _neox_args(c: dict) -> dict:
    rope = {"partial_rotary_factor": 0.25, **_rope(c)}
    return dict(
        hidden_size=c["hidden_size"],
        num_hidden_layers=c["num_hidden_layers"],
        intermediate_size=c["intermediate_size"],
        num_attention_heads=c["num_attention_heads"],
        vocab_size=c["vocab_size"],
        hidden_act=c.get("hidden_act", "gelu"),
        mlp_type="mlp",
        parallel_block=c.get("use_parallel_residual", True),
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        attention_bias=c.get("attention_bias", True),
        mlp_bias=True,
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        norm_eps=c.get("layer_norm_eps", 1e-5),
        **rope,
    )


def _gpt2_args(c: dict) -> dict:
    d, n = c["n_embd"], c["n_head"]
    if c.get("scale_attn_by_inverse_layer_idx") or c.get("reorder_and_upcast_attn"):
        raise CheckpointError(
            "gpt2 checkpoints with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn are not supported"
        )
    return dict(
        hidden_size=d,
        num_hidden_layers=c["n_layer"],
        intermediate_size=c.get("n_inner") or 4 * d,
        num_attention_heads=n,
        vocab_size=c["vocab_size"],
        hidden_act=c.get("activation_function", "gelu_new"),
        mlp_type="mlp",
        position_embedding_type="learned",
        max_position_embeddings=c.get("n_positions", 1024),
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=c.get("tie_word_embeddings", True),
        attention_scale=None if c.get("scale_attn_weights", True) else 1.0,
        norm_eps=c.get("layer_norm_epsilon", 1e-5),
    )


# Entries of config.json in the families' own names, typed as their ModelArgs field is.
HF_FIELDS = {
    "use_parallel_residual": bool,
    "n_embd": int,
    "n_head": int,
    "n_layer": int,
    "n_inner": Optional[int],
    "n_positions": int,
    "rms_norm_eps": float,
    "layer_norm_eps": float,
    "layer_norm_epsilon": float,
    "rotary_emb_base": float,
    "rotary_pct": float,
    "activation_function": str,
    "scale_attn_weights": bool,
    "scale_attn_by_inverse_layer_idx": bool,
    "reorder_and_upcast_attn": bool,
    "rope_parameters": Optional[dict],
}
MAY_BE_ZERO = {"num_local_experts"}  # 0: a dense feed-forward


def check_config(config: dict, where: str):
    """Refuse an entry of config.json that Hugging Face and mlx-lm would misread.

    Both take values as they are: the string "false" is a true boolean there, and
    "abc" or 0 heads fail deep inside (or not at all). Each known entry must have
    its field's JSON type: booleans true/false, counts positive integers, numbers finite."""
    types = {k: f.type for k, f in ModelArgs.__dataclass_fields__.items()}
    for key, value in config.items():
        kind = HF_FIELDS.get(key, types.get(key))
        if kind is None:
            continue
        optional = typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind)
        if optional:
            if value is None:
                continue
            rest = [a for a in typing.get_args(kind) if a is not type(None)]
            kind = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
        if typing.get_origin(kind) is typing.Union:  # one of several shapes (removed: a list, or one string)
            shapes = tuple(typing.get_origin(a) or a for a in typing.get_args(kind))
            if isinstance(value, shapes):
                continue
            raise CheckpointError(
                f"{where}: config.json's {key!r} must be one of "
                f"{', '.join(t.__name__ for t in shapes)}, not {json.dumps(value)[:80]}"
            )
        kind = typing.get_origin(kind) or kind
        if kind is bool and type(value) is not bool:
            want = 'true or false (a JSON boolean: Python reads the string "false" as true)'
        elif kind is int and not (type(value) is int and value >= (0 if key in MAY_BE_ZERO else 1)):
            want = "a non-negative integer" if key in MAY_BE_ZERO else "a positive integer"
        elif kind is float and not (type(value) in (int, float) and math.isfinite(value)):
            want = "a finite number"
        elif kind in (str, dict, list) and not isinstance(value, kind):
            want = {str: "a string", dict: "a JSON object", list: "a JSON list"}[kind]
        else:
            continue
        raise CheckpointError(f"{where}: config.json's {key!r} must be {want}, not {json.dumps(value)[:80]}")
    check_rope(config, where)


# Entries of rope_parameters / rope_scaling that mlx-lm's RoPE reads, by what they must be.
ROPE_NUMBERS = (
    "rope_theta",
    "partial_rotary_factor",
    "low_freq_factor",
    "high_freq_factor",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "attention_factor",
)
ROPE_FACTORS = ("short_factor", "long_factor")
# RoPE types that cannot do without a scaling factor.
ROPE_NEEDS_FACTOR = ("linear", "dynamic", "llama3", "yarn", "deepseek_yarn", "telechat3-yarn")


def _finite(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def check_rope(config: dict, where: str):
    """Refuse a bad entry inside rope_parameters or rope_scaling, named by its path.

    mlx-lm divides, multiplies and indexes these as they are, so a string or a
    missing factor otherwise surfaces as an arithmetic error naming no field."""
    for section in ("rope_parameters", "rope_scaling"):
        params = config.get(section)
        if not isinstance(params, dict):
            continue  # absent, or refused by check_config as not an object
        kind = params.get("type") or params.get("rope_type", "default")
        problems = []
        if not isinstance(kind, str):
            problems.append(("type" if params.get("type") else "rope_type", "a string", kind))
        for key, value in params.items():
            if key == "factor" and not (_finite(value) and value > 0):
                problems.append((key, "a positive finite number", value))
            elif key in ROPE_NUMBERS and not _finite(value):
                problems.append((key, "a finite number", value))
            elif key == "original_max_position_embeddings" and not (type(value) is int and value > 0):
                problems.append((key, "a positive integer", value))
            elif key in ROPE_FACTORS and not (isinstance(value, list) and all(map(_finite, value))):
                problems.append((key, "a JSON list of finite numbers", value))
        if problems:
            key, want, value = problems[0]
            raise CheckpointError(
                f"{where}: config.json's '{section}.{key}' must be {want}, not {json.dumps(value)[:80]}"
            )
        if kind in ROPE_NEEDS_FACTOR and "factor" not in params:
            raise CheckpointError(f"{where}: config.json's '{section}.factor' is missing: RoPE type {kind!r} needs it")


def model_fields(c: dict) -> dict:
    """The entries of a config that are ModelArgs fields (the project's own format)."""
    fields = ModelArgs.__dataclass_fields__
    return {k: v for k, v in c.items() if k in fields}


# -- tensor templates ---------------------------------------------------------------------


def _llama_layer(a: ModelArgs, i: int, p: str) -> Dict[str, Source]:
    d, hd, f = a.hidden_size, a.head_dim, a.intermediate_size
    q, kv, src = a.num_attention_heads * hd, a.num_key_value_heads * hd, {}
    pre = f"model.layers.{i}"
    for m, out in (("q", q), ("k", kv), ("v", kv)):
        _linear(src, names.attention(m), f"{pre}.self_attn.{m}_proj", out, d, a.attention_bias)
    _linear(src, names.O, f"{pre}.self_attn.o_proj", d, q, a.attention_bias)
    if a.num_local_experts:
        e, moe = range(a.num_local_experts), f"{pre}.block_sparse_moe"
        src[names.ffn(names.ROUTER) + ".weight"] = same(f"{moe}.gate.weight", a.num_local_experts, d)
        for ours, theirs, shape in ((names.GATE, "w1", (f, d)), (names.UP, "w3", (f, d)), (names.DOWN, "w2", (d, f))):
            src[names.ffn(ours, experts=True) + ".weight"] = stacked(
                [f"{moe}.experts.{j}.{theirs}.weight" for j in e], *shape
            )
    else:
        for ours, theirs, out, inp in (
            (names.GATE, "gate_proj", f, d),
            (names.UP, "up_proj", f, d),
            (names.DOWN, "down_proj", d, f),
        ):
            _linear(src, names.ffn(ours), f"{pre}.mlp.{theirs}", out, inp, a.mlp_bias)
    return src


def _llama_globals(a: ModelArgs, p: str, norm: bool) -> Dict[str, Source]:
    src = {EMBED: same("model.embed_tokens.weight", a.vocab_size, a.hidden_size)}
    if norm:
        src[FINAL_NORM_PREFIX + "weight"] = same("model.norm.weight", a.hidden_size)
    if not a.tie_word_embeddings:
        src[HEAD] = same("lm_head.weight", a.vocab_size, a.hidden_size)
    return src


def _neox_qkv(key: str, n: int, hd: int, d: int, which: int, bias: bool) -> Source:
    """GPT-NeoX fuses q, k, v per head: output rows are laid out (heads, 3, head_dim)."""
    if bias:
        return Source((key,), ((3 * n * hd,),), lambda t: t[0].reshape(n, 3, hd)[:, which].reshape(-1))
    return Source((key,), ((3 * n * hd, d),), lambda t: t[0].reshape(n, 3, hd, d)[:, which].reshape(n * hd, d))


def _neox_layer(a: ModelArgs, i: int, p: str) -> Dict[str, Source]:
    d, n, hd, f = a.hidden_size, a.num_attention_heads, a.head_dim, a.intermediate_size
    pre, src = f"gpt_neox.layers.{i}", {}
    qkv = f"{pre}.attention.query_key_value"
    for which, name in enumerate(names.ATTN_IN):
        src[f"{name}.weight"] = _neox_qkv(f"{qkv}.weight", n, hd, d, which, False)
        if a.attention_bias:
            src[f"{name}.bias"] = _neox_qkv(f"{qkv}.bias", n, hd, d, which, True)
    _linear(src, names.O, f"{pre}.attention.dense", d, n * hd, a.attention_bias)
    _linear(src, names.ffn(names.FC1), f"{pre}.mlp.dense_h_to_4h", f, d, True)
    _linear(src, names.ffn(names.FC2), f"{pre}.mlp.dense_4h_to_h", d, f, True)
    return src


def _neox_globals(a: ModelArgs, p: str, norm: bool) -> Dict[str, Source]:
    src = {EMBED: same("gpt_neox.embed_in.weight", a.vocab_size, a.hidden_size)}
    if norm:
        src[FINAL_NORM_PREFIX + "weight"] = same("gpt_neox.final_layer_norm.weight", a.hidden_size)
        src[FINAL_NORM_PREFIX + "bias"] = same("gpt_neox.final_layer_norm.bias", a.hidden_size)
    if not a.tie_word_embeddings:
        src[HEAD] = same("embed_out.weight", a.vocab_size, a.hidden_size)
    return src


def _c_attn(key: str, d: int, which: int, bias: bool) -> Source:
    """GPT-2's c_attn is one Conv1D producing [q | k | v]."""
    s = slice(which * d, (which + 1) * d)
    if bias:
        return Source((key,), ((3 * d,),), lambda t: t[0][s])
    return Source((key,), ((d, 3 * d),), lambda t: t[0][:, s].T)


def _gpt2_layer(a: ModelArgs, i: int, p: str) -> Dict[str, Source]:
    d, f = a.hidden_size, a.intermediate_size
    pre, src = f"{p}h.{i}", {}
    for which, name in enumerate(names.ATTN_IN):
        src[f"{name}.weight"] = _c_attn(f"{pre}.attn.c_attn.weight", d, which, False)
        src[f"{name}.bias"] = _c_attn(f"{pre}.attn.c_attn.bias", d, which, True)
    _linear(src, names.O, f"{pre}.attn.c_proj", d, d, True, conv1d)
    _linear(src, names.ffn(names.FC1), f"{pre}.mlp.c_fc", f, d, True, conv1d)
    _linear(src, names.ffn(names.FC2), f"{pre}.mlp.c_proj", d, f, True, conv1d)
    return src


def _gpt2_globals(a: ModelArgs, p: str, norm: bool) -> Dict[str, Source]:
    src = {
        EMBED: same(f"{p}wte.weight", a.vocab_size, a.hidden_size),
        POSITIONS: same(f"{p}wpe.weight", a.max_position_embeddings, a.hidden_size),
    }
    if norm:
        src[FINAL_NORM_PREFIX + "weight"] = same(f"{p}ln_f.weight", a.hidden_size)
        src[FINAL_NORM_PREFIX + "bias"] = same(f"{p}ln_f.bias", a.hidden_size)
    if not a.tie_word_embeddings:
        src[HEAD] = same("lm_head.weight", a.vocab_size, a.hidden_size)
    return src


def _skipless_layer(a: ModelArgs, i: int, p: str) -> Dict[str, Source]:
    from mlx.utils import tree_flatten

    from .models.skipless import Block

    block = Block(a, a.removed[i])  # lazy: allocates nothing until evaluated
    return {k: same(names.block_key(i, k), *v.shape) for k, v in tree_flatten(block.parameters())}


def _skipless_globals(a: ModelArgs, p: str, norm: bool) -> Dict[str, Source]:
    from dataclasses import replace

    from mlx.utils import tree_flatten

    from .models.skipless import Model

    shell = Model(replace(a, num_hidden_layers=0, removed=[]))
    return {k: same(k, *v.shape) for k, v in tree_flatten(shell.parameters())}


@dataclass(frozen=True)
class Family:
    name: str
    args: Callable[[dict], dict]
    layer: Callable[[ModelArgs, int, str], Dict[str, Source]]
    globals: Callable[[ModelArgs, str, bool], Dict[str, Source]]
    final_norm_key: Optional[str]  # its presence means the model has a final norm
    final_norm: Optional[str] = None  # "rmsnorm" | "layernorm"
    prefixes: Tuple[str, ...] = ("",)  # optional key prefixes (gpt2: "transformer.")


_LLAMA = dict(
    args=_llama_args,
    layer=_llama_layer,
    globals=_llama_globals,
    final_norm_key="model.norm.weight",
    final_norm="rmsnorm",
)
FAMILIES = {
    "llama": Family("llama", **_LLAMA),
    "mistral": Family("mistral", **_LLAMA),
    "mixtral": Family("mixtral", **dict(_LLAMA, args=_mixtral_args)),
    "gpt_neox": Family(
        "gpt_neox", _neox_args, _neox_layer, _neox_globals, "gpt_neox.final_layer_norm.weight", "layernorm"
    ),
    "gpt2": Family(
        "gpt2", _gpt2_args, _gpt2_layer, _gpt2_globals, "ln_f.weight", "layernorm", prefixes=("transformer.", "")
    ),
    "skipless": Family("skipless", model_fields, _skipless_layer, _skipless_globals, None),
}


class WeightMapping:
    """A checked view of one checkpoint as a vanilla skipless model: its ModelArgs
    and, per block and for the rest, the float64 tensors under the model's names."""

    def __init__(
        self,
        config: dict,
        shapes: Dict[str, Tuple[int, ...]],
        assume_skipless: bool = False,
        where: str = "this checkpoint",
    ):
        check_config(config, where)
        kind = config.get("model_type")
        if kind not in FAMILIES:
            raise CheckpointError(f"{where}: model_type {kind!r} is not supported; supported: {', '.join(FAMILIES)}")
        self.family = FAMILIES[kind]
        if kind != "skipless" and not (config.get("skipless") is True or assume_skipless):
            raise CheckpointError(
                f"{where} is a {kind} checkpoint that is not declared skipless (config.json has no "
                '"skipless": true). A standard transformer adds a residual and normalizes around '
                "every block, and fusion moves each block's Q into the previous block's output "
                "matrices: that is exact only when nothing stands between one block's output and "
                "the next block's input, so converting this model would change what it computes. "
                "If its blocks really have no residual adds and no norms, pass --assume-skipless."
            )
        keys = set(shapes)
        self.prefix = next((p for p in self.family.prefixes if any(k.startswith(p) for k in keys) and p), "")
        try:
            fields = self.family.args(config)
        except KeyError as e:
            raise CheckpointError(f"{where}: config.json lacks {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:  # nested settings (rope_parameters) of the wrong type
            raise CheckpointError(f"{where}: config.json does not describe a model: {e}") from None
        # Every layer has tensors: check the count before anything per layer is built.
        if fields["num_hidden_layers"] > len(shapes):
            raise CheckpointError(
                f"{where}: config.json declares {fields['num_hidden_layers']} layers, "
                f"but the checkpoint holds only {len(shapes)} tensors"
            )
        if self.family.final_norm_key:
            has_norm = self.prefix + self.family.final_norm_key in keys
            fields.update(final_norm=self.family.final_norm if has_norm else None)
        try:
            self.args = ModelArgs(**fields)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: {e}") from None
        try:
            # A block built lazily (nothing is allocated) checks what only the model code
            # reads, RoPE scaling for one, and sizes past what MLX can index.
            self._check(shapes, where)
            Block(self.args, self.args.removed[0])
        except CheckpointError:
            raise
        except (TypeError, ValueError, KeyError, OverflowError) as e:
            raise CheckpointError(f"{where}: config.json does not describe a model: {e}") from None

    def layer_sources(self, i: int) -> Dict[str, Source]:
        return self.family.layer(self.args, i, self.prefix)

    def global_sources(self) -> Dict[str, Source]:
        return self.family.globals(self.args, self.prefix, self.args.final_norm is not None)

    def layer(self, i: int, get: Callable[[str], np.ndarray]) -> Dict[str, np.ndarray]:
        """Block i, named relative to the block ("self_attn.q_proj.weight")."""
        return _read(self.layer_sources(i), get)

    def globals(self, get: Callable[[str], np.ndarray]) -> Dict[str, np.ndarray]:
        return _read(self.global_sources(), get)

    def _block_prefix(self, i: int) -> str:
        """What every checkpoint tensor of block i starts with ("model.layers.3.")."""
        common = os.path.commonprefix([k for s in self.layer_sources(i).values() for k in s.keys])
        return common[: common.rfind(".") + 1]

    def _check(self, shapes: Dict[str, Tuple[int, ...]], where: str):
        expected = {}
        for sources in [self.global_sources()] + [self.layer_sources(i) for i in range(self.args.num_hidden_layers)]:
            for s in sources.values():
                expected.update(zip(s.keys, s.shapes))
        # A tied head saved anyway is a copy of the embedding.
        ignored = {"lm_head.weight"} if self.args.tie_word_embeddings else set()
        unexpected = sorted(k for k in shapes if k not in expected and k not in ignored and not BUFFERS.search(k))
        # Only a norm inside a block stands in fusion's way; a norm-like name elsewhere
        # (a renamed final norm) is just a tensor this family does not have.
        blocks = tuple(self._block_prefix(i) for i in range(self.args.num_hidden_layers))
        norms = [k for k in unexpected if NORM_LIKE.search(k) and k.startswith(blocks)]
        if norms:
            raise CheckpointError(
                f"{where} has normalization inside its block chain: {_some(norms)}. Fusion "
                "cannot move a matrix across a norm; remove the norms first with " + NORM_REMOVAL
            )
        if unexpected:
            kind = "skipless" if self.family.name == "skipless" else f"skipless {self.family.name}"
            final = (
                self.prefix + self.family.final_norm_key if self.family.final_norm_key else FINAL_NORM_PREFIX + "weight"
            )
            hint = (
                f" (a {kind} model's final norm is {final})"
                if final not in shapes and any(NORM_LIKE.search(k) for k in unexpected)
                else ""
            )
            raise CheckpointError(
                f"{where} has tensors that are not weights a {kind} model has: {_some(unexpected)}{hint}"
            )
        missing = sorted(k for k in expected if k not in shapes)
        if missing:
            raise CheckpointError(f"{where} lacks tensors: {_some(missing)}")
        wrong = [
            f"{k} is {tuple(shapes[k])}, expected {tuple(s)}"
            for k, s in expected.items()
            if tuple(shapes[k]) != tuple(s)
        ]
        if wrong:
            raise CheckpointError(f"{where}: shape mismatch with config.json: {_some(wrong)}")


def _read(sources: Dict[str, Source], get) -> Dict[str, np.ndarray]:
    return {name: s.build([get(k) for k in s.keys]) for name, s in sources.items()}


def _some(items: Iterable[str], n: int = 6) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
