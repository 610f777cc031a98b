# Copyright © 2026 the mlx-skipless authors. MIT licence.
"""Skipless transformers for mlx-lm.

A skipless block has no residual add and no normalization, so the linear maps
of consecutive blocks can be merged (arXiv 2404.12362). This one file covers the
vanilla block and every reduced form: `removed[i]` names what block i lacks.

  "q", "k", "v"  the query, key or value projection is the identity; the block
                 input already is x·Q (or x·K, x·V): the previous block, or the
                 embedding, absorbed that matrix.
  "p"            the attention output projection is gone. Serial block: the FFN
                 input matrices absorbed it. Parallel block: the attention
                 output is added as it is (He & Hofmann's / Graef's Figure 3
                 form, a different function class: train it, never convert to it).

Optional residuals and pre-norms turn the same code into the blocks that are
trained first and have their norms removed later.

This file imports only mlx and mlx_lm: converted models carry a copy of it as
their `model_file`, so stock `mlx_lm generate --trust-remote-code` runs them.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
from mlx_lm.models.base import (
    BaseModelArgs,
    create_attention_mask,
    scaled_dot_product_attention,
)
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache
from mlx_lm.models.rope_utils import initialize_rope
from mlx_lm.models.switch_layers import SwitchGLU, SwitchLinear, SwitchMLP

ACTIVATIONS = {
    "gelu": nn.gelu,  # Hugging Face's "gelu" is the exact erf form
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_fast": nn.gelu_approx,
    "silu": nn.silu,
    "swish": nn.silu,
    "relu": nn.relu,
}
NORMS = {"rmsnorm": nn.RMSNorm, "layernorm": nn.LayerNorm}
POSITIONS = ("rope", "learned", "none")
FORMS = ("", "p", "q", "qp", "k", "kp", "v", "vp")


@dataclass
class ModelArgs(BaseModelArgs):
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    model_type: str = "skipless"
    skipless: bool = True
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    hidden_act: str = "silu"
    mlp_type: str = "glu"  # "glu": act(x·G) ⊙ (x·U); "mlp": act(x·M)
    num_local_experts: int = 0  # > 0: a Mixtral-style top-k MoE feed-forward
    num_experts_per_tok: int = 2
    parallel_block: bool = False  # x_next = Attn(x) + FFN(x)
    position_embedding_type: str = "rope"
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rope_traditional: bool = False
    rope_scaling: Optional[Dict[str, Union[float, str]]] = None
    max_position_embeddings: int = 2048
    attention_bias: bool = False  # q, k, v and o projections
    mlp_bias: bool = False  # every FFN matrix, the router included
    attention_scale: Optional[float] = None  # default head_dim ** -0.5
    tie_word_embeddings: bool = False
    final_norm: Optional[str] = None  # kept by every conversion
    block_norm: Optional[str] = None  # pre-norms inside blocks: training only
    residual: bool = False  # residual adds: training only
    shaped_attention: bool = False  # A = αI + β·softmax − γC per head (He & Hofmann 2023)
    norm_eps: float = 1e-5
    removed: Optional[Union[List[str], str]] = None  # per layer, one of FORMS (a string: every layer)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.removed is None or isinstance(self.removed, str):
            self.removed = [self.removed or ""] * self.num_hidden_layers
        self.removed = list(self.removed)
        check_args(self)


def check_args(args: ModelArgs):
    """Raise ValueError, naming the field, for a config no block can honour."""
    d, hd = args.hidden_size, args.head_dim
    n, n_kv = args.num_attention_heads, args.num_key_value_heads
    if n % n_kv:
        raise ValueError(f"num_key_value_heads={n_kv} must divide num_attention_heads={n}")
    if args.hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {args.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
    if args.mlp_type not in ("glu", "mlp"):
        raise ValueError(f"mlp_type must be 'glu' or 'mlp', not {args.mlp_type!r}")
    if args.position_embedding_type not in POSITIONS:
        raise ValueError(f"position_embedding_type must be one of {POSITIONS}")
    for field in ("block_norm", "final_norm"):
        if getattr(args, field) not in (None, *NORMS):
            raise ValueError(f"{field} must be None or one of {sorted(NORMS)}")
    if len(args.removed) != args.num_hidden_layers:
        raise ValueError(
            f"removed has {len(args.removed)} entries for {args.num_hidden_layers} layers"
        )
    widths = {"q": n * hd, "k": n_kv * hd, "v": n_kv * hd}
    for i, form in enumerate(args.removed):
        if form not in FORMS:
            raise ValueError(f"layer {i}: removed={form!r} is not one of {FORMS}")
        for name in form.replace("p", ""):
            if widths[name] != d:
                raise ValueError(
                    f"layer {i}: cannot remove {name.upper()}: it is {d}x{widths[name]}, "
                    f"and only a square matrix can move into the previous layer. "
                    + ("K and V are square only in multi-head attention (MHA); "
                       "with MQA/GQA remove Q." if name != "q" else
                       "Q is square when num_attention_heads * head_dim == hidden_size.")
                )
        adds_attention_output = args.residual or args.parallel_block
        if "p" in form and adds_attention_output and n * hd != d:
            raise ValueError(
                f"layer {i}: without P the attention output ({n * hd} wide) "
                f"is added to a {d}-wide stream"
            )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, removed: str):
        super().__init__()
        d, bias = args.hidden_size, args.attention_bias
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        head_dim = args.head_dim
        self.scale = args.attention_scale or head_dim**-0.5
        widths = {"q": self.n_heads * head_dim, "k": self.n_kv_heads * head_dim}
        widths["v"] = widths["k"]
        for name, width in widths.items():
            if name not in removed:
                setattr(self, f"{name}_proj", nn.Linear(d, width, bias=bias))
        if "p" not in removed:
            self.o_proj = nn.Linear(widths["q"], d, bias=bias)
        if args.shaped_attention:
            # At α = β = γ = 1 and small logits, softmax ≈ C and A ≈ I: each block
            # starts near the identity, which a stack without skips needs to train.
            self.alpha = mx.ones((self.n_heads,))
            self.beta = mx.ones((self.n_heads,))
            self.gamma = mx.ones((self.n_heads,))
        self.rope = None
        if args.position_embedding_type == "rope":
            self.rope = initialize_rope(
                int(head_dim * args.partial_rotary_factor),
                args.rope_theta,
                args.rope_traditional,
                args.rope_scaling,
                args.max_position_embeddings,
            )

    group = None  # set by shard(): tensor parallelism over heads

    def _project(self, name: str, x: mx.array) -> mx.array:
        # A removed projection is the identity: its matrix lives upstream now.
        if name in self:
            return self[name](x)
        if self.group is None or name == "o_proj":
            return x
        # Sharded: this device's heads of the identity are a slice of its input.
        n, r = x.shape[-1] // self.group.size(), self.group.rank()
        return x[..., r * n : (r + 1) * n]

    def shard(self, group):
        """mlx-lm's llama scheme: q, k, v all-to-sharded, o sharded-to-all. Without
        P the FFN needs every head's output, so the outputs are gathered instead."""
        N = group.size()
        if self.n_heads % N or self.n_kv_heads % N:
            raise ValueError(f"cannot shard {self.n_heads} heads and {self.n_kv_heads} KV heads "
                             f"over {N} devices")
        for name in ("q_proj", "k_proj", "v_proj"):
            if name in self:
                self[name] = shard_linear(self[name], "all-to-sharded", group=group)
        if "o_proj" in self:
            self.o_proj = shard_linear(self.o_proj, "sharded-to-all", group=group)
        self.n_heads //= N
        self.n_kv_heads //= N
        self.group = group
        if "alpha" in self:
            r = group.rank() * self.n_heads
            for name in ("alpha", "beta", "gamma"):
                self[name] = self[name][r : r + self.n_heads]

    def _output(self, out: mx.array) -> mx.array:
        if "o_proj" in self or self.group is None:
            return self._project("o_proj", out)
        gathered = mx.distributed.all_gather(mx.moveaxis(out, -1, 0), group=self.group)
        return mx.moveaxis(gathered, 0, -1)

    def __call__(self, x, mask=None, cache=None, value_sum=None):
        B, L, _ = x.shape
        queries = self._project("q_proj", x).reshape(B, L, self.n_heads, -1)
        keys = self._project("k_proj", x).reshape(B, L, self.n_kv_heads, -1)
        values = self._project("v_proj", x).reshape(B, L, self.n_kv_heads, -1)
        queries, keys, values = (t.transpose(0, 2, 1, 3) for t in (queries, keys, values))

        offset = cache.offset if cache is not None else 0
        if self.rope is not None:
            queries = self.rope(queries, offset=offset)
            keys = self.rope(keys, offset=offset)
        if "alpha" in self:
            mean = causal_mean(values, value_sum)
        cached_keys, cached_values = keys, values
        if cache is not None:
            cached_keys, cached_values = cache.update_and_fetch(keys, values)

        out = scaled_dot_product_attention(
            queries, cached_keys, cached_values, cache=cache, scale=self.scale, mask=mask
        )
        if "alpha" in self:
            out = self._shape(out, values, mean)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self._output(out)

    def _shape(self, out, values, mean):
        """β·softmax(·)V + α·V_t − γ·C·V for this call's positions."""
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:
            mean, values = mx.repeat(mean, rep, axis=1), mx.repeat(values, rep, axis=1)
        a, b, g = (p[:, None, None] for p in (self.alpha, self.beta, self.gamma))
        return b * out + a * values - g * mean


def causal_mean(values: mx.array, state: Optional[ArraysCache] = None) -> mx.array:
    """C·V: at each position the mean of the values up to it, (B, heads, L, head_dim).

    The KV cache is not read: `state` (from `Model.make_cache`) carries the sum and
    count of the values so far, in float32, so the mean is over the whole past and
    exact under every KV cache (a quantized or rotating one too), and positions that
    mlx-lm marks as batch padding (`state.make_mask`) count for nothing."""
    B, H, L, D = values.shape
    v = values.astype(mx.float32)
    real = state.make_mask(L) if state is not None else None  # (B, L): not padding
    if real is None:
        steps = mx.broadcast_to(mx.arange(1, L + 1), (B, L))
    else:
        v = v * real[:, None, :, None]
        steps = mx.cumsum(real.astype(mx.int32), axis=1)
    if state is None or state[0] is None:
        sums = mx.cumsum(v, axis=2)
    else:
        # The running sum goes first so each position sums in time order, as one
        # pass over the whole sequence would.
        sums = mx.cumsum(mx.concatenate([state[0], v], axis=2), axis=2)[:, :, 1:]
        steps = steps + state[1][:, None]
    if state is not None:
        state[0], state[1] = sums[:, :, -1:], steps[:, -1]
        state.advance(L)
    return (sums / mx.maximum(steps, 1)[:, None, :, None]).astype(values.dtype)


class GLUActivation(nn.Module):
    """act(gate) ⊙ up, with the argument order of mlx_lm's SwitchGLU."""

    def __init__(self, act):
        super().__init__()
        self.act = act

    def __call__(self, up, gate):
        return self.act(gate) * up


class MLP(nn.Module):
    """Dense FFN. GLU keeps Llama's names (gate/up/down_proj), MLP uses fc1/fc2,
    the names mlx_lm's SwitchMLP gives its experts."""

    def __init__(self, args: ModelArgs, in_dims: int):
        super().__init__()
        d, f, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.act = ACTIVATIONS[args.hidden_act]
        self.glu = args.mlp_type == "glu"
        if self.glu:
            self.gate_proj = nn.Linear(in_dims, f, bias=bias)
            self.up_proj = nn.Linear(in_dims, f, bias=bias)
            self.down_proj = nn.Linear(f, d, bias=bias)
        else:
            self.fc1 = nn.Linear(in_dims, f, bias=bias)
            self.fc2 = nn.Linear(f, d, bias=bias)

    def __call__(self, x):
        if self.glu:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))

    def shard(self, group):
        for name in ("gate_proj", "up_proj", "fc1"):
            if name in self:
                self[name] = shard_linear(self[name], "all-to-sharded", group=group)
        for name in ("down_proj", "fc2"):
            if name in self:
                self[name] = shard_linear(self[name], "sharded-to-all", group=group)


class MoE(nn.Module):
    """Mixtral's top-k router. The chosen experts' weights sum to one, which is
    what lets every expert's output matrix absorb the next block's Q."""

    def __init__(self, args: ModelArgs, in_dims: int):
        super().__init__()
        d, f, n = args.hidden_size, args.intermediate_size, args.num_local_experts
        self.k = args.num_experts_per_tok
        self.gate = nn.Linear(in_dims, n, bias=args.mlp_bias)
        act = ACTIVATIONS[args.hidden_act]
        if args.mlp_type == "glu":
            self.switch_mlp = SwitchGLU(in_dims, f, n, GLUActivation(act), args.mlp_bias)
            out = "down_proj"
        else:
            self.switch_mlp = SwitchMLP(in_dims, f, n, act, args.mlp_bias)
            out = "fc2"
        if in_dims != d:  # the switch layers map back to their input width
            setattr(self.switch_mlp, out, SwitchLinear(f, d, n, bias=args.mlp_bias))

    def __call__(self, x):
        logits = self.gate(x)
        inds = mx.stop_gradient(mx.argpartition(-logits, kth=self.k - 1, axis=-1)[..., : self.k])
        scores = mx.softmax(mx.take_along_axis(logits, inds, axis=-1), axis=-1, precise=True)
        y = self.switch_mlp(x, inds)
        return (y * scores[..., None]).sum(axis=-2)

    def shard(self, group):
        raise ValueError("tensor parallelism is not implemented for MoE blocks "
                         "(nor in mlx-lm's mixtral); use pipeline or a single device")


class Block(nn.Module):
    def __init__(self, args: ModelArgs, removed: str):
        super().__init__()
        self.parallel, self.residual = args.parallel_block, args.residual
        self.self_attn = Attention(args, removed)
        # A serial block without P feeds the raw attention output to the FFN.
        no_p_serial = "p" in removed and not args.parallel_block
        ffn_in = args.num_attention_heads * args.head_dim if no_p_serial else args.hidden_size
        self.mlp = MoE(args, ffn_in) if args.num_local_experts else MLP(args, ffn_in)
        if args.block_norm:
            norm = NORMS[args.block_norm]
            self.input_layernorm = norm(args.hidden_size, eps=args.norm_eps)
            if not self.parallel:
                self.post_attention_layernorm = norm(ffn_in, eps=args.norm_eps)

    def shard(self, group):
        self.self_attn.shard(group)
        self.mlp.shard(group)

    def _norm(self, name: str, x: mx.array) -> mx.array:
        return self[name](x) if name in self else x

    def __call__(self, x, mask=None, cache=None, value_sum=None):
        h = self._norm("input_layernorm", x)
        if self.parallel:
            out = self.self_attn(h, mask, cache, value_sum) + self.mlp(h)
            return x + out if self.residual else out
        a = self.self_attn(h, mask, cache, value_sum)
        h = x + a if self.residual else a
        out = self.mlp(self._norm("post_attention_layernorm", h))
        return h + out if self.residual else out


class SkiplessModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        if args.position_embedding_type == "learned":
            self.embed_positions = nn.Embedding(args.max_position_embeddings, args.hidden_size)
        self.layers = [Block(args, form) for form in args.removed]
        self.shaped = args.shaped_attention
        if args.final_norm:
            self.norm = NORMS[args.final_norm](args.hidden_size, eps=args.norm_eps)

    def embed(self, inputs, offset=0):
        """Token (+ learned position) embeddings. `offset` is an int, or one per
        sequence in a batch cache (negative over left padding)."""
        h = self.embed_tokens(inputs)
        if "embed_positions" in self:
            offset = offset[:, None] if isinstance(offset, mx.array) else offset
            positions = offset + mx.arange(inputs.shape[1])
            # Padding positions fall outside the table; their outputs are never used.
            n = self.embed_positions.weight.shape[0]
            h = h + self.embed_positions(mx.clip(positions, 0, n - 1))
        return h

    def __call__(self, inputs, cache=None):
        n = len(self.layers)
        kv, sums = split_cache(cache, n, self.shaped)
        h = self.embed(inputs, kv[0].offset if kv[0] is not None else 0)
        mask = create_attention_mask(h, kv[0])
        for layer, c, s in zip(self.layers, kv, sums):
            h = layer(h, mask, c, s)
        return self.norm(h) if "norm" in self else h


def split_cache(cache, n: int, shaped: bool):
    """(KV caches, value-sum states) for n layers from `Model.make_cache`'s list."""
    if cache is None:
        return [None] * n, [None] * n
    if not shaped:
        return cache, [None] * n
    if len(cache) != 2 * n or not all(isinstance(c, ArraysCache) for c in cache[n:]):
        raise ValueError("shaped attention keeps a running sum of the values in its cache: "
                         "make caches with model.make_cache(), not one KV cache per layer")
    return cache[:n], cache[n:]


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = SkiplessModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None):
        return self.head(self.model(inputs, cache))

    def head(self, h):
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self):
        return self.model.layers

    @property
    def make_cache(self):
        """mlx-lm's caches, plus one state per shaped-attention layer for the running
        sum of its values (see causal_mean). Models without shaped attention have no
        make_cache, so mlx-lm builds its default caches (`--max-kv-size` included)."""
        if not self.args.shaped_attention:
            raise AttributeError("make_cache")
        return self._make_shaped_cache

    def _make_shaped_cache(self, max_kv_size: Optional[int] = None) -> list:
        """KV caches (rotating ones holding max_kv_size tokens, as mlx-lm makes
        them), then the value sums. mlx-lm's make_prompt_cache passes no size: a
        stock `--max-kv-size` keeps the full cache; pass it here to bound it."""
        n = len(self.layers)
        if max_kv_size is None:
            kv = [KVCache() for _ in range(n)]
        else:
            kv = [RotatingKVCache(max_size=max_kv_size, keep=4) for _ in range(n)]
        return kv + [ArraysCache(size=2) for _ in range(n)]

    def shard(self, group: Optional[mx.distributed.Group] = None):
        """Tensor parallelism, as mlx-lm's sharded_load expects (mlx.launch)."""
        group = group or mx.distributed.init()
        for layer in self.layers:
            layer.shard(group)

    def sanitize(self, weights):
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights
