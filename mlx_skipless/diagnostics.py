"""Signal propagation through a stack of blocks: what a skipless model needs to train.

Without residual adds every block must pass on both the scale and the token-to-token
differences of its input; `signal_propagation` measures both, per layer, on a batch:

  rms        root mean square of the block's output
  cos        mean cosine similarity between the positions of a sequence at the
             block's output; 1 is rank collapse (every token looks the same, the
             model can only predict token frequencies)
  attn_cos   the same at the attention's output, before the FFN
  entropy    entropy of the attention softmax over the causal window, divided by
             that of the uniform window (1: uniform, 0: one key per query)
  alpha, beta, gamma   the mean shaped-attention coefficients (when present)
"""

import time

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import create_attention_mask

from . import names


def _mean_cosine(h: mx.array) -> float:
    """Mean over sequences of the mean off-diagonal cosine between positions."""
    u = h / mx.maximum(mx.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
    g = u @ u.swapaxes(-1, -2)
    L = h.shape[1]
    return ((mx.sum(g, axis=(-1, -2)) - L) / (L * (L - 1))).mean().item()


def attention_entropy(attn, x: mx.array) -> float:
    """Normalized entropy of the softmax of `attn` (an Attention) applied to `x`."""
    B, L, _ = x.shape
    q = attn._project(names.projection("q"), x).reshape(B, L, attn.n_heads, -1).transpose(0, 2, 1, 3)
    k = attn._project(names.projection("k"), x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    if attn.rope is not None:
        q, k = attn.rope(q), attn.rope(k)
    k = mx.repeat(k, attn.n_heads // attn.n_kv_heads, axis=1)
    causal = mx.tril(mx.ones((L, L), dtype=mx.bool_))
    logits = mx.where(causal, (q * attn.scale) @ k.swapaxes(-1, -2), -mx.inf)
    p = mx.softmax(logits, axis=-1, precise=True)
    h = -mx.sum(mx.where(causal, p * mx.log(mx.maximum(p, 1e-30)), 0.0), axis=-1)
    uniform = mx.log(mx.arange(1, L + 1, dtype=mx.float32))
    return (mx.sum(h, axis=-1)[..., 1:] / mx.sum(uniform[1:])).mean().item() if L > 1 else 1.0


def signal_propagation(model, inputs: mx.array) -> list:
    """One dict per layer (see the module docstring) for `inputs` (batch, length)."""
    h = model.model.embed(inputs)
    mask = create_attention_mask(h, None)
    rows = []
    for layer in model.layers:
        attn = layer.self_attn
        x = layer._norm(names.INPUT_NORM, h)
        has_qk = names.projection("q") in attn and names.projection("k") in attn
        row = {"entropy": attention_entropy(attn, x) if has_qk else None}
        a = attn(x, mask)
        row["attn_cos"] = _mean_cosine(a)
        h = layer(h, mask)
        row.update(rms=mx.sqrt(mx.mean(mx.square(h))).item(), cos=_mean_cosine(h))
        for name in names.SHAPED:
            if name in attn:
                row[name] = float(np.mean(np.array(attn[name])))
        rows.append(row)
    return rows


def table(rows: list) -> str:
    """The per-layer rows as fixed-width text, one line per layer."""
    keys = [k for k in ("rms", "cos", "attn_cos", "entropy", "alpha", "beta", "gamma") if k in rows[0]]
    lines = ["layer " + " ".join(f"{k:>8}" for k in keys)]
    for i, r in enumerate(rows):
        cells = ("       -" if r[k] is None else f"{r[k]:8.3f}" for k in keys)
        lines.append(f"{i:5d} " + " ".join(cells))
    return "\n".join(lines)


def matmul_rate() -> float:
    """MLX's float32 matmul rate here, GFLOP/s, from a few 512-wide products (~0.1 s at worst)."""
    a = mx.random.normal((512, 512))
    mx.eval(a @ a)
    start = time.perf_counter()
    for _ in range(4):
        mx.eval(a @ a)
    return 4 * 2 * 512**3 / (time.perf_counter() - start) / 1e9


def warn_if_slow(log=print):
    """Linux's mlx[cpu] wheel multiplies through a reference BLAS, tens of times slower than
    an optimized one: say so in one line before hours of training."""
    if mx.default_device() != mx.cpu:
        return
    rate = matmul_rate()
    if rate < 10:
        log(
            f"[WARNING] MLX multiplies at {rate:.1f} GFLOP/s on this CPU, too slow to train: on Linux, "
            "install OpenBLAS (apt-get install libopenblas0-pthread) and run with "
            "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
        )
