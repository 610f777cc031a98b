"""An independent float64 numpy forward pass of the *vanilla* skipless model, and of
the standard blocks it is trained from (residual adds, pre-norms).

It shares nothing with the MLX model code but the weight dictionary, in the
paper's orientation (y = x·W + b), so it checks the MLX modules and the fusion
against the maths as the paper writes it: row vectors, y = x·W, W is in × out
(Hugging Face and MLX store `weight` as out × in, the paper's W is `weight.T`).
"""

import math

import numpy as np

_erf = np.vectorize(math.erf)
ACT = {
    "gelu": lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
    "gelu_new": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "silu": lambda x: x / (1 + np.exp(-x)),
    "relu": lambda x: np.maximum(x, 0),
}
ACT["gelu_pytorch_tanh"] = ACT["gelu_new"]


def affine(x, f):
    return x @ f.W + f.b


def rope(x, theta, rot):
    """Rotate-half RoPE on the first `rot` features. x: (heads, T, hd)."""
    T, half = x.shape[1], rot // 2
    inv_freq = theta ** (-np.arange(half) * 2.0 / rot)
    ang = np.arange(T)[:, None] * inv_freq[None]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., :half], x[..., half:rot]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]], axis=-1)


def causal_mean(v):
    """C·v per head: position t gets the mean of v over positions 0..t."""
    return np.cumsum(v, axis=1) / np.arange(1, v.shape[1] + 1)[None, :, None]


def attention(x, layer, a, shape=None, visible=None):
    T = x.shape[0]
    n, n_kv, hd = a.num_attention_heads, a.num_key_value_heads, a.head_dim
    q = affine(x, layer["self_attn.q_proj"]).reshape(T, n, hd).transpose(1, 0, 2)
    k = affine(x, layer["self_attn.k_proj"]).reshape(T, n_kv, hd).transpose(1, 0, 2)
    v = affine(x, layer["self_attn.v_proj"]).reshape(T, n_kv, hd).transpose(1, 0, 2)
    if a.position_embedding_type == "rope":
        rot = int(hd * a.partial_rotary_factor)
        q, k = rope(q, a.rope_theta, rot), rope(k, a.rope_theta, rot)
    k, v = np.repeat(k, n // n_kv, axis=0), np.repeat(v, n // n_kv, axis=0)
    s = q @ k.transpose(0, 2, 1) * (a.attention_scale or hd**-0.5)
    s = np.where(np.tril(np.ones((T, T), bool)) if visible is None else visible, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ v
    if shape:  # shaped attention: (αI + βA − γC)·V per head
        al, be, ga = (np.asarray(shape[k], np.float64)[:, None, None] for k in ("alpha", "beta", "gamma"))
        out = be * out + al * v - ga * causal_mean(v)
    out = out.transpose(1, 0, 2).reshape(T, n * hd)
    return affine(out, layer["self_attn.o_proj"])


def dense_ffn(x, get, act):
    """get(name) -> Affine of one dense FFN (or one expert)."""
    if get("gate_proj") is not None:
        return affine(act(affine(x, get("gate_proj"))) * affine(x, get("up_proj")), get("down_proj"))
    return affine(act(affine(x, get("fc1"))), get("fc2"))


def ffn(x, layer, a):
    act = ACT[a.hidden_act]
    if not a.num_local_experts:
        return dense_ffn(x, lambda n: layer.get(f"mlp.{n}"), act)
    logits = affine(x, layer["mlp.gate"])
    out = np.zeros((x.shape[0], a.hidden_size))
    for t in range(x.shape[0]):
        top = np.argsort(-logits[t])[: a.num_experts_per_tok]
        w = np.exp(logits[t, top] - logits[t, top].max())
        w /= w.sum()
        for e, we in zip(top, w):

            def expert(n, e=e):
                f = layer.get(f"mlp.switch_mlp.{n}")
                return None if f is None else type(f)(f.W[e], f.b[e])

            out[t] += we * dense_ffn(x[t : t + 1], expert, act)[0]
    return out


def norm(x, kind, gain, bias, eps):
    if kind == "layernorm":
        x = x - x.mean(-1, keepdims=True)
        y = x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * gain
        return y + bias
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * gain


def named_norm(x, w, a, kind, key):
    """The norm whose gain is w.other[key + ".weight"] (no-op where `kind` is None)."""
    if not kind:
        return x
    b = w.other.get(f"{key}.bias")
    return norm(
        x,
        kind,
        np.asarray(w.other[f"{key}.weight"], np.float64),
        0 if b is None else np.asarray(b, np.float64),
        a.norm_eps,
    )


def forward(w, a, tokens, visible=None):
    """Logits (T, vocab) for a 1-D token array: the vanilla skipless model, or with
    `a.residual` and `a.block_norm` the standard pre-norm block (x + Attn(norm(x)), then
    the same around the FFN; parallel: x + Attn(u) + FFN(u) with u = norm(x)).
    visible[t, s]: position t's softmax sees position s (default: causal). The
    causal mean of shaped attention always covers the whole past."""
    x = w.embed[tokens]
    if w.positions is not None:
        x = x + w.positions[: len(tokens)]
    skip = (lambda x, out: x + out) if a.residual else (lambda x, out: out)
    for i, layer in enumerate(w.layers):
        shape = (
            {k: w.other[f"model.layers.{i}.self_attn.{k}"] for k in ("alpha", "beta", "gamma")}
            if a.shaped_attention
            else None
        )
        u = named_norm(x, w, a, a.block_norm, f"model.layers.{i}.input_layernorm")
        if a.parallel_block:
            x = skip(x, attention(u, layer, a, shape, visible) + ffn(u, layer, a))
        else:
            h = skip(x, attention(u, layer, a, shape, visible))
            x = skip(h, ffn(named_norm(h, w, a, a.block_norm, f"model.layers.{i}.post_attention_layernorm"), layer, a))
    x = named_norm(x, w, a, a.final_norm, "model.norm")
    head = w.embed.T if w.head is None else w.head
    return x @ head
