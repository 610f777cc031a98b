"""Acceptance (issue 2): every reduced form computes the vanilla model's function.

Each case compares three things on random, well-conditioned weights: the
vanilla MLX model, the reduced MLX model made by fusion, and an independent
float64 numpy forward of the vanilla model (tests/reference.py)."""

import itertools

import numpy as np
import pytest
import reference
from harness import build, fused_model, logits, rel_err, tiny_args, tokens
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_skipless import fusion, layout, linalg, synthetic

TOL = 1e-5
ATTENTION = {"mha": 4, "mqa": 1, "gqa": 2}  # num_key_value_heads with 4 heads
FFN = {
    "mlp": dict(mlp_type="mlp", hidden_act="gelu"),
    "glu": dict(mlp_type="glu", hidden_act="silu"),
    "moe": dict(mlp_type="glu", hidden_act="silu", num_local_experts=4, num_experts_per_tok=2),
}
POSITIONS = {
    "rope": dict(position_embedding_type="rope"),
    "partial": dict(position_embedding_type="rope", partial_rotary_factor=0.5),
    "learned": dict(position_embedding_type="learned"),
    "none": dict(position_embedding_type="none"),
}
GRID = list(itertools.product("qkv", ATTENTION, ("serial", "parallel"), FFN, POSITIONS, (True, False), (True, False)))


def config(attention, layout_, ffn, positions, bias, tied, **kw):
    return tiny_args(
        num_key_value_heads=ATTENTION[attention],
        parallel_block=layout_ == "parallel",
        attention_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=tied,
        **FFN[ffn],
        **POSITIONS[positions],
        **kw,
    )


def check_exact(args, plan, seed=0):
    flat = synthetic.random_flat(args, seed=seed)
    toks = tokens(8, args.vocab_size, seed)
    ref = reference.forward(layout.weights_from_flat(flat, args), args, toks)
    vanilla = logits(build(args, flat), toks)
    reduced_model, reduced, _ = fused_model(args, flat, plan)
    reduced_logits = logits(reduced_model, toks)
    assert rel_err(vanilla, ref) <= TOL
    assert rel_err(reduced_logits, ref) <= TOL
    assert rel_err(reduced_logits, vanilla) <= TOL
    return reduced


@pytest.mark.parametrize(
    "remove,attention,layout_,ffn,positions,bias,tied", GRID, ids=["-".join(map(str, case)) for case in GRID]
)
def test_reduced_equals_vanilla_and_float64_reference(remove, attention, layout_, ffn, positions, bias, tied):
    args = config(attention, layout_, ffn, positions, bias, tied)
    plan = fusion.default_plan(args, remove)
    if remove != "q" and attention != "mha":
        with pytest.raises(ValueError, match=f"cannot remove {remove.upper()}.*MHA"):
            fusion.fuse(layout.weights_from_flat(synthetic.random_flat(args), args), args, plan)
        return
    reduced = check_exact(args, plan)
    assert reduced.removed == [remove + ("" if layout_ == "parallel" else "p")] * 2
    # The embedding absorbed the first block's matrix, so a tied head unties.
    assert not reduced.tie_word_embeddings


SHAPED = list(itertools.product("qkv", ("mha", "gqa"), ("serial", "parallel")))


@pytest.mark.parametrize("remove,attention,layout_", SHAPED, ids=["-".join(c) for c in SHAPED])
def test_shaped_attention_fuses_exactly(remove, attention, layout_):
    """αI + βA − γC acts on V linearly, so every fusion stays exact."""
    if remove != "q" and attention != "mha":
        return
    args = config(attention, layout_, "glu", "rope", True, False, shaped_attention=True)
    check_exact(args, fusion.default_plan(args, remove))


@st.composite
def configs(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([8, 16]))
    square = draw(st.booleans())  # head_dim * heads == hidden_size, else decoupled
    d = heads * head_dim if square else draw(st.sampled_from([16, 24, 48]))
    kv = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    parallel = draw(st.booleans())
    ffn = dict(draw(st.sampled_from(list(FFN.values()))))
    ffn["hidden_act"] = draw(st.sampled_from(["gelu", "gelu_new", "silu", "relu"]))
    kw = dict(
        hidden_size=d,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        num_hidden_layers=draw(st.integers(1, 3)),
        intermediate_size=draw(st.sampled_from([16, 40])),
        parallel_block=parallel,
        attention_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()),
        shaped_attention=draw(st.booleans()),
        final_norm=draw(st.sampled_from([None, "rmsnorm", "layernorm"])),
        **ffn,
        **draw(st.sampled_from(list(POSITIONS.values()))),
    )
    args = tiny_args(**kw)
    # A per-layer plan: each layer removes a legal square matrix, or keeps it.
    legal = [""] + [n for n, w in (("q", heads), ("k", kv), ("v", kv)) if w * head_dim == d]
    bases = draw(st.lists(st.sampled_from(legal), min_size=args.num_hidden_layers, max_size=args.num_hidden_layers))
    plan = [b + ("p" if fusion.merges_p(args) else "") for b in bases]
    return args, plan, draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(configs())
def test_random_configs_and_per_layer_plans_are_exact(case):
    args, plan, seed = case
    reduced = check_exact(args, plan, seed)
    assert reduced.removed == plan


def test_removal_needs_a_square_matrix_and_names_it():
    args = tiny_args(num_key_value_heads=2)
    with pytest.raises(ValueError, match="layer 0: cannot remove K: it is 32x16.*MQA/GQA remove Q"):
        fusion.reduced_args(args, ["kp", "kp"])
    decoupled = tiny_args(head_dim=16)  # 4 heads x 16 = 64 != 32
    with pytest.raises(ValueError, match="cannot remove Q: it is 32x64"):
        fusion.reduced_args(decoupled, ["q", "q"])


def test_parallel_conversion_never_drops_p():
    args = tiny_args(parallel_block=True)
    with pytest.raises(fusion.FusionError, match="parallel block cannot lose P exactly"):
        fusion.reduced_args(args, ["qp", "qp"])


def test_fusion_refuses_blocks_with_norms_or_residuals():
    for kw, what in ((dict(residual=True), "residual adds"), (dict(block_norm="rmsnorm"), "rmsnorm inside")):
        with pytest.raises(fusion.FusionError, match=what):
            fusion.reduced_args(tiny_args(**kw), ["qp", "qp"])


def test_singular_matrix_names_layer_and_matrix():
    args = tiny_args()
    flat = synthetic.random_flat(args)
    flat["model.layers.1.self_attn.q_proj.weight"][:, 3] = 0.0
    w = layout.weights_from_flat(flat, args)
    with pytest.raises(fusion.FusionError, match="layer 1: self_attn.q_proj is singular"):
        fusion.fuse(w, args, ["qp", "qp"])


def test_condition_numbers_are_reported_per_inverted_matrix():
    args = tiny_args(num_hidden_layers=3)
    flat = synthetic.random_flat(args)
    _, _, inverted = fused_model(args, flat, ["qp", "p", "qp"])
    assert [(m.layer, m.matrix) for m in inverted] == [(0, "q_proj"), (2, "q_proj")]
    for m in inverted:
        W = flat[f"model.layers.{m.layer}.self_attn.q_proj.weight"]
        assert m.cond == pytest.approx(np.linalg.cond(W), rel=1e-9)


@pytest.mark.parametrize("noise", [0.3, 3.0])
def test_condition_number_estimate_from_the_factors_matches_the_svd(monkeypatch, noise):
    # Above EXACT_COND_SIZE the figure comes from the factorization fusion takes anyway.
    monkeypatch.setattr(fusion, "EXACT_COND_SIZE", 16)
    rng = np.random.default_rng(0)
    W = np.eye(128) + noise * rng.standard_normal((128, 128)) / np.sqrt(128)
    estimate = fusion.condition_number(W, linalg.lu_factor(W))
    assert estimate == pytest.approx(np.linalg.cond(W), rel=0.03)
    assert fusion.factor_and_condition(W)[1] == estimate  # the figure fidelity reports is the converter's


@pytest.mark.parametrize("cond", [1e2, 1e6, 1e12, 1e20])
def test_condition_estimate_of_ill_conditioned_and_singular_matrices(monkeypatch, cond):
    """float32 factors would blur ‖B⁻¹‖ past 1/2⁻²⁴: the estimate then comes from the
    float64 ones, so a nearly singular matrix is still called so."""
    monkeypatch.setattr(fusion, "EXACT_COND_SIZE", 16)
    rng = np.random.default_rng(1)
    U, V = (np.linalg.qr(rng.standard_normal((96, 96)))[0] for _ in range(2))
    W = (U * np.logspace(0, -np.log10(cond), 96)) @ V.T
    estimate = fusion.factor_and_condition(W)[1]
    if cond < 1e15:
        assert estimate == pytest.approx(np.linalg.cond(W), rel=0.03)
    else:  # numerically singular in float64: only "past SINGULAR_COND" is meaningful
        assert estimate > fusion.SINGULAR_COND
    W[:, 5] = 0  # exactly singular
    assert fusion.factor_and_condition(W)[1] == np.inf


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("engine", ["float32", "float64", "float32 by MLX"])
def test_float32_products_stay_near_the_float64_fusion(engine, bias):
    # Products that invert nothing may run in float32 for outputs coarser than float32,
    # the biases' included (b_P·M and the next block's c); on Apple silicon, by MLX on its GPU.
    from mlx_skipless.products import mlx_matmul

    args = tiny_args(num_hidden_layers=3, attention_bias=bias, mlp_bias=bias)
    flat = synthetic.random_flat(args)
    w = layout.weights_from_flat(flat, args)
    exact, _, _ = fusion.fuse(w, args, ["qp"] * 3)
    products = {
        "float32": fusion.Products(np.float32),
        "float64": fusion.Products(np.float64),
        "float32 by MLX": fusion.Products(np.float32, mlx_matmul),
    }[engine]
    fast, _, _ = fusion.fuse(w, args, ["qp"] * 3, products)
    tol = 1e-12 if engine == "float64" else 1e-5
    for a, b in zip(layout.weights_to_flat(fast, args).values(), layout.weights_to_flat(exact, args).values()):
        assert rel_err(np.asarray(a, np.float64), b) <= tol


def test_fusion_maths_runs_without_mlx():
    import subprocess
    import sys

    code = (
        "import sys, mlx_skipless.fusion; "
        "assert not [m for m in sys.modules if m == 'mlx' or m.startswith('mlx.')], 'mlx imported'"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_products_take_float64_only_for_a_float32_output_and_the_gpu_where_metal_is():
    import mlx.core as mx

    from mlx_skipless.products import mlx_matmul, products_for

    assert products_for("float32", quantized=False) == fusion.Products(np.float64, np.matmul)
    for dtype, quantized in (("bfloat16", False), ("float16", False), ("float32", True)):
        expected = mlx_matmul if mx.metal.is_available() else np.matmul
        assert products_for(dtype, quantized) == fusion.Products(np.float32, expected)
    A, B = np.arange(6.0, dtype=np.float32).reshape(2, 3), np.ones((3, 4), np.float32)
    np.testing.assert_array_equal(mlx_matmul(A.T.T, B), A @ B)
