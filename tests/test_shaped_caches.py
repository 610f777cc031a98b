"""Acceptance (issue 16, items 1 and 2): shaped attention under every mlx-lm cache.

The causal mean γ·C·V reads no cached values: each layer keeps a running sum of V
in the model's own cache state. So batched generation (padded prompts; merged,
extended and filtered batch caches) gives each prompt the tokens it gets alone,
saved prompt caches continue exactly, and quantized or rotating KV caches change
only the softmax term."""

import re
from pathlib import Path

import hf_checkpoints as hf
import mlx.core as mx
import numpy as np
import pytest
import reference
from harness import build, rel_err, tiny_args, tokens
from mlx_lm import batch_generate
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import ArraysCache, KVCache, QuantizedKVCache, load_prompt_cache, save_prompt_cache
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlx_skipless import layout, synthetic

FORMS = [(lay, form, "rope") for lay in ("serial", "parallel") for form in ("", "qp", "kp", "vp")]
VARIANTS = {
    "rope": dict(),
    "learned": dict(position_embedding_type="learned", tie_word_embeddings=True),
    "gqa": dict(num_key_value_heads=2, final_norm="rmsnorm"),
}
CASES = FORMS + [
    ("serial", "", "learned"),
    ("parallel", "", "learned"),
    ("serial", "", "gqa"),
    ("parallel", "qp", "gqa"),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    hf.write_tokenizer(directory, 64)
    return load_tokenizer(directory)


def shaped(layout_="serial", form="", variant="rope", beta=None, seed=3, **kw):
    """(args, flat weights, MLX model) of a tiny shaped-attention model. beta=0 drops
    the softmax term, the only one that reads the KV cache."""
    args = tiny_args(
        shaped_attention=True, parallel_block=layout_ == "parallel", removed=[form] * 2, **VARIANTS[variant], **kw
    )
    flat = synthetic.random_flat(args, seed=seed)
    if beta is not None:
        for i in range(args.num_hidden_layers):
            flat[f"model.layers.{i}.self_attn.beta"] = np.full(args.num_attention_heads, beta)
    return args, flat, build(args, flat)


def prompts(vocab=64):
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab, n).tolist() for n in (3, 11, 6)]


def alone(model, prompt, max_tokens, eos=(2,), **kw):
    """Greedy tokens and full log-probabilities from mlx-lm's single-sequence path."""
    toks, logprobs = [], []
    for t, lp in generate_step(mx.array(prompt), model, max_tokens=max_tokens, **kw):
        if int(t) in eos:
            break
        toks.append(int(t))
        logprobs.append(np.array(lp, dtype=np.float64))
    return toks, logprobs


def assert_batch_equals_alone(result, model, full_prompts, max_tokens):
    for got, got_lp, prompt, n in zip(result.token_ids, result.logprobs, full_prompts, max_tokens):
        want, want_lp = alone(model, prompt, n)
        assert got == want
        assert np.allclose(got_lp, [lp[t] for lp, t in zip(want_lp, want)], atol=1e-4)


@pytest.mark.parametrize("layout_,form,variant", CASES, ids=[f"{a}-{b or 'vanilla'}-{c}" for a, b, c in CASES])
def test_batch_generate_gives_each_prompt_its_tokens_alone(tokenizer, layout_, form, variant):
    _, _, model = shaped(layout_, form, variant)
    max_tokens = [8, 4, 8]  # the second finishes first: the batch is filtered, the third joins
    # Prompts of 3, 11 and 6 tokens, prefilled 4 at a time (right padding, then
    # rolled into left padding), two at a time (the third is added by extend).
    result = batch_generate(
        model,
        tokenizer,
        prompts(),
        max_tokens=max_tokens,
        return_token_ids=True,
        return_logprobs=True,
        prefill_step_size=4,
        prefill_batch_size=2,
        completion_batch_size=2,
    )
    assert_batch_equals_alone(result, model, prompts(), max_tokens)


def test_saved_prompt_caches_continue_exactly_in_a_batch(tokenizer, tmp_path):
    """Prompt caches of different lengths (one empty) are saved, loaded and merged
    into one left-padded batch cache."""
    _, _, model = shaped("parallel", "kp")
    full, caches, rests = prompts(), [], []
    for i, (prompt, cut) in enumerate(zip(full, (0, 7, 4))):
        cache = model.make_cache()
        if cut:
            mx.eval(model(mx.array(prompt[:cut])[None], cache=cache))
        save_prompt_cache(str(tmp_path / f"{i}.safetensors"), cache)
        caches.append(load_prompt_cache(str(tmp_path / f"{i}.safetensors")))
        rests.append(prompt[cut:])
    result = batch_generate(
        model, tokenizer, rests, prompt_caches=caches, max_tokens=6, return_token_ids=True, return_logprobs=True
    )
    assert_batch_equals_alone(result, model, full, [6] * 3)


def test_the_mlx_lm_floor_masks_left_padding_and_lengths_together():
    """A merged prompt cache (left padding) prefilled in a batch (lengths) has both set: the value
    sums must skip both. mlx-lm's ArraysCache.make_mask does so from 0.32.0 (before, left padding
    alone); pyproject's floor must not promise less."""
    state = ArraysCache(2, left_padding=[1, 0])
    state.prepare(lengths=[3, 2])
    assert state.make_mask(4).tolist() == [[False, True, True, False], [True, True, False, False]]
    floor = re.search(r'"mlx-lm>=([\d.]+)"', (Path(__file__).parents[1] / "pyproject.toml").read_text())[1]
    assert tuple(map(int, floor.split("."))) >= (0, 32, 0)


def steps(model, prompt, max_tokens, cache, **kw):
    return np.stack(alone(model, prompt, max_tokens, eos=(), prompt_cache=cache, **kw)[1])


QUANTIZED = dict(kv_bits=8, kv_group_size=32, quantized_kv_start=0)
WIDE = dict(hidden_size=64, num_attention_heads=2)  # heads of 32: KV quantization groups fit


def test_quantized_kv_cache_changes_only_the_softmax_term():
    _, _, model = shaped(beta=0.0, **WIDE)
    prompt = tokens(9, 64).tolist()
    cache = model.make_cache()
    quantized = steps(model, prompt, 8, cache, **QUANTIZED)
    assert all(isinstance(c, QuantizedKVCache) for c in cache[: len(model.layers)])
    # Without the softmax term nothing reads the rounded keys and values.
    assert rel_err(quantized, steps(model, prompt, 8, model.make_cache())) <= 1e-6
    _, _, model = shaped(**WIDE)
    full = steps(model, prompt, 8, model.make_cache())
    assert rel_err(steps(model, prompt, 8, model.make_cache(), **QUANTIZED), full) <= 0.02


def test_rotating_cache_larger_than_the_sequence_changes_nothing():
    _, _, model = shaped("parallel", "qp", "gqa")
    prompt = tokens(10, 64).tolist()
    full = steps(model, prompt, 8, model.make_cache())
    assert np.array_equal(steps(model, prompt, 8, model.make_cache(max_kv_size=64)), full)


def test_rotated_window_keeps_the_mean_over_the_whole_past():
    _, _, model = shaped(beta=0.0)
    prompt = tokens(12, 64).tolist()  # prefilled past the window, then decoded around it
    full = steps(model, prompt, 10, model.make_cache())
    assert rel_err(steps(model, prompt, 10, model.make_cache(max_kv_size=8)), full) <= 1e-6


@pytest.mark.parametrize("layout_", ["serial", "parallel"])
def test_rotated_window_matches_a_float64_reference(layout_):
    """Token by token through a window of 8 (4 kept): the softmax sees the window,
    the causal mean the whole past."""
    args, flat, model = shaped(layout_, variant="gqa")
    toks, size, keep = tokens(20, 64), 8, 4
    cache = model.make_cache(max_kv_size=size)
    got = np.concatenate([np.array(model(mx.array([[int(t)]]), cache=cache)[0], np.float64) for t in toks])
    t, s = np.arange(20)[:, None], np.arange(20)[None]
    window = (s <= t) & ((s < keep) | (s > t - size + keep))
    w = layout.weights_from_flat(flat, args)
    ref = reference.forward(w, args, toks, visible=window)
    assert rel_err(got, ref) <= 1e-5
    assert rel_err(reference.forward(w, args, toks), ref) > 1e-3  # the window did rotate


def test_caches_without_the_value_sums_are_refused():
    _, _, model = shaped()
    with pytest.raises(ValueError, match=r"model\.make_cache\(\)"):
        model(mx.array([[3, 4]]), cache=[KVCache() for _ in model.layers])
