"""python -m mlx_skipless.generate: text from a skipless model, with mlx-lm's flags and output.

Everything after loading is mlx-lm's: samplers, KV caches, streaming detokenizer
and the timing lines. Only `load` is ours, so it opens converted directories and
vanilla skipless checkpoints of every supported family without a trust flag.
"""

import argparse
import sys
import types

import mlx.core as mx
from mlx_lm.generate import generate, stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .checkpoint import CheckpointError
from .loading import load

DEFAULT_MODEL = "mlx_model"  # where `python -m mlx_skipless.convert` writes
DEFAULT_PROMPT = "def fibonacci(n):"


class _Module(types.ModuleType):
    """`mlx_skipless.generate` is this module and, as in mlx-lm, the generate
    function: importing the module must not take the function away."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _Module


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError("expected true or false")
    return text.lower() == "true"


def build_parser():
    p = argparse.ArgumentParser(prog="mlx-skipless generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="converted directory, vanilla skipless checkpoint or hub id (default: mlx_model)")
    p.add_argument("--revision", help="hub revision")
    p.add_argument("--assume-skipless", action="store_true",
                   help="treat a checkpoint not marked \"skipless\": true as skipless")
    p.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="the prompt, or - to read stdin")
    p.add_argument("--system-prompt", help="system message for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true", help="use the prompt as it is")
    p.add_argument("--max-tokens", "-m", type=int, default=100)
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--max-kv-size", type=int, help="rotating KV cache of this many tokens")
    p.add_argument("--kv-bits", type=int, help="quantize the KV cache to this many bits")
    p.add_argument("--kv-group-size", type=int, default=64)
    p.add_argument("--quantized-kv-start", type=int, default=0,
                   help="step from which the KV cache is quantized (with --kv-bits)")
    p.add_argument("--verbose", type=_bool, default=True, help="print timings (default true)")
    return p


def encode_prompt(tokenizer, prompt: str, system_prompt=None, ignore_chat_template=False):
    """Token ids, through the chat template when the tokenizer has one, as mlx_lm generate does."""
    if ignore_chat_template or not tokenizer.has_chat_template:
        return tokenizer.encode(prompt)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def prompt_cache(model, max_kv_size=None):
    """mlx-lm's caches for `model`, rotating when max_kv_size is given. mlx-lm's
    make_prompt_cache drops the size for models with their own make_cache, as
    shaped-attention models have (their caches also keep running sums of V)."""
    if hasattr(model, "make_cache"):
        return model.make_cache(max_kv_size)
    return make_prompt_cache(model, max_kv_size)


def check_cache_flags(model, kv_bits, kv_group_size, max_kv_size):
    """Refuse, before generating, KV-cache flags that mlx-lm cannot honour."""
    if kv_bits is None:
        return
    if max_kv_size is not None:
        raise ValueError("--kv-bits and --max-kv-size do not combine: mlx-lm does not quantize "
                         "a rotating KV cache")
    if model.args.head_dim % kv_group_size:
        raise ValueError(f"--kv-group-size {kv_group_size} does not divide the head size "
                         f"{model.args.head_dim}, so the KV cache cannot be quantized")


def context_length(model) -> int:
    return model.args.max_position_embeddings


def main(argv=None):
    opts = build_parser().parse_args(argv)
    if opts.seed is not None:
        mx.random.seed(opts.seed)
    prompt = sys.stdin.read() if opts.prompt == "-" else opts.prompt.replace("\\n", "\n")
    try:
        model, tokenizer = load(opts.model, opts.revision, assume_skipless=opts.assume_skipless)
        check_cache_flags(model, opts.kv_bits, opts.kv_group_size, opts.max_kv_size)
        tokens = encode_prompt(tokenizer, prompt, opts.system_prompt, opts.ignore_chat_template)
        limit = context_length(model)
        if len(tokens) > limit:
            raise CheckpointError(f"the prompt is {len(tokens)} tokens; the model's context is {limit}")
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    max_tokens = opts.max_tokens
    if model.args.position_embedding_type == "learned" and len(tokens) + max_tokens > limit:
        # Learned positions end at the context length; nothing can be generated past it.
        max_tokens = limit - len(tokens)
        print(f"[INFO] generating {max_tokens} tokens: the context ends at {limit}", file=sys.stderr)
    sampler = make_sampler(opts.temp, opts.top_p, opts.min_p, top_k=opts.top_k)
    text = generate(model, tokenizer, tokens, verbose=opts.verbose, max_tokens=max_tokens,
                    sampler=sampler, prompt_cache=prompt_cache(model, opts.max_kv_size),
                    kv_bits=opts.kv_bits,
                    kv_group_size=opts.kv_group_size, quantized_kv_start=opts.quantized_kv_start)
    if not opts.verbose:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
