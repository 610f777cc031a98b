"""Acceptance (issue 2): decoding one token at a time with mlx-lm's KV cache
gives the logits of a full forward pass, for every block form."""

import mlx.core as mx
import numpy as np
import pytest
from harness import build, logits, rel_err, tiny_args, tokens
from mlx_lm.models.cache import make_prompt_cache

from mlx_skipless import synthetic

FORMS = {
    "serial": ["", "p", "qp", "kp", "vp", "q"],
    "parallel": ["", "q", "k", "v", "qp"],  # "qp": He & Hofmann / Graef Figure 3
}
CASES = [(lay, form) for lay, forms in FORMS.items() for form in forms]
VARIANTS = {
    "glu-rope": dict(),
    "mlp-learned-bias": dict(
        mlp_type="mlp",
        hidden_act="gelu_new",
        position_embedding_type="learned",
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
    ),
    "moe-partial": dict(num_local_experts=3, num_experts_per_tok=2, partial_rotary_factor=0.5),
    "norms-residual": dict(block_norm="layernorm", residual=True, final_norm="layernorm"),
    "shaped-norms": dict(shaped_attention=True, block_norm="rmsnorm"),
}


def decode_step_by_step(model, toks):
    cache = make_prompt_cache(model)
    steps = [model(mx.array([[int(t)]]), cache=cache) for t in toks]
    return np.array(mx.concatenate(steps, axis=1)[0].astype(mx.float32), dtype=np.float64)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout_,form", CASES, ids=[f"{a}-{b or 'vanilla'}" for a, b in CASES])
def test_cached_decoding_matches_full_forward(layout_, form, variant):
    args = tiny_args(parallel_block=layout_ == "parallel", removed=[form] * 2, **VARIANTS[variant])
    model = build(args, synthetic.random_flat(args, seed=3))
    toks = tokens(10, args.vocab_size)
    full = logits(model, toks)
    assert rel_err(decode_step_by_step(model, toks), full) <= 1e-5
    # A prompt in one piece, then single tokens: the path mlx-lm's generate takes.
    cache = make_prompt_cache(model)
    first = model(mx.array(toks[:6])[None], cache=cache)
    rest = [model(mx.array([[int(t)]]), cache=cache) for t in toks[6:]]
    mixed = np.array(mx.concatenate([first, *rest], axis=1)[0], dtype=np.float64)
    assert rel_err(mixed, full) <= 1e-5
