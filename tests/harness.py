"""Small shared helpers for the tests: tiny configs, MLX models from numpy weights."""

import mlx.core as mx
import numpy as np

from mlx_skipless import fusion, layout, synthetic
from mlx_skipless.models.skipless import Model, ModelArgs


def tiny_args(**kw) -> ModelArgs:
    base = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=48,
                num_attention_heads=4, vocab_size=64, max_position_embeddings=64)
    base.update(kw)
    return ModelArgs(**base)


def build(args: ModelArgs, flat: dict, dtype=mx.float32) -> Model:
    model = Model(args)
    model.load_weights([(k, mx.array(np.asarray(v, np.float32)).astype(dtype)) for k, v in flat.items()])
    mx.eval(model.parameters())
    return model


def logits(model, tokens) -> np.ndarray:
    return np.array(model(mx.array(tokens)[None]).astype(mx.float32), dtype=np.float64)[0]


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def fused_model(args, flat, plan):
    """(reduced model, reduced args, inverted matrices) for `plan`."""
    w, new_args, inverted = fusion.fuse(layout.weights_from_flat(flat, args), args, plan)
    return build(new_args, layout.weights_to_flat(w, new_args)), new_args, inverted


def tokens(n=8, vocab=64, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n)


__all__ = ["tiny_args", "build", "logits", "rel_err", "fused_model", "tokens", "synthetic"]
