"""python -m mlx_skipless.generate: text from a skipless model, with mlx-lm's flags and output.

Everything after loading is mlx-lm's: samplers, KV caches, streaming detokenizer
and the timing lines. Only `load` is ours, so it opens converted directories and
vanilla skipless checkpoints of every supported family without a trust flag.
"""

import argparse
import sys
import types

import mlx.core as mx
from mlx_lm.generate import generate, stream_generate  # noqa: F401  (mlx_skipless.stream_generate)
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from . import cli
from .errors import CheckpointError
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


def add_generation_args(p, max_tokens: int):
    """The flags generate and chat share, spelled as mlx-lm spells them: the model
    (and LoRA adapters), the system prompt, sampling and the KV cache."""
    cli.add_model_args(
        p,
        f"converted directory, vanilla skipless checkpoint or hub id (default: {DEFAULT_MODEL})",
        default=DEFAULT_MODEL,
    )
    p.add_argument("--adapter-path", help="LoRA adapters trained by mlx_lm lora on this model")
    p.add_argument("--system-prompt", help="system message for the chat template")
    p.add_argument(
        "--max-tokens", "-m", type=int, default=max_tokens, help="most tokens to generate (default %(default)s)"
    )
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (default %(default)s: greedy)")
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample from the most likely tokens whose probabilities add up to this (default %(default)s: all)",
    )
    p.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="drop tokens less likely than this fraction of the likeliest one (default %(default)s: none)",
    )
    p.add_argument(
        "--top-k", type=int, default=0, help="sample from only this many likeliest tokens (default %(default)s: all)"
    )
    p.add_argument("--seed", type=int, help="random seed for sampling (default: unseeded)")
    p.add_argument(
        "--max-kv-size", type=int, help="rotating KV cache of this many tokens (default: the cache grows with the text)"
    )
    p.add_argument("--kv-bits", type=int, help="quantize the KV cache to this many bits (default: not quantized)")
    p.add_argument(
        "--kv-group-size",
        type=int,
        default=64,
        help="group size of the KV cache's quantization (with --kv-bits; default %(default)s)",
    )
    p.add_argument(
        "--quantized-kv-start",
        type=int,
        default=0,
        help="step from which the KV cache is quantized (with --kv-bits; default %(default)s)",
    )


def check_generation_args(opts):
    """Refuse, before loading anything, what mlx-lm would fail on mid-way or run forever with."""
    if opts.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, not {opts.max_tokens}")
    if opts.temp < 0 or not 0 < opts.top_p <= 1 or not 0 <= opts.min_p <= 1 or opts.top_k < 0:
        raise ValueError("sampling needs --temp >= 0, 0 < --top-p <= 1, 0 <= --min-p <= 1 and --top-k >= 0")
    if opts.max_kv_size is not None and opts.max_kv_size < 1:
        raise ValueError(f"--max-kv-size must be at least 1, not {opts.max_kv_size}")
    if opts.kv_bits is not None:
        try:  # whatever mlx's quantize accepts
            mx.eval(mx.quantize(mx.zeros((1, max(opts.kv_group_size, 1))), opts.kv_group_size, opts.kv_bits))
        except ValueError as e:
            raise ValueError(f"--kv-bits {opts.kv_bits} with --kv-group-size {opts.kv_group_size}: {e}") from None
    if opts.seed is not None:
        mx.random.seed(opts.seed)


def load_for_generation(opts):
    """(model, tokenizer) from --model, with --adapter-path's LoRA adapters applied as mlx-lm does."""
    model, tokenizer = load(opts.model, opts.revision, assume_skipless=opts.assume_skipless)
    if opts.adapter_path:
        from mlx_lm.tuner.utils import load_adapters

        model = load_adapters(model, opts.adapter_path)
        model.eval()
    check_cache_flags(model, opts.kv_bits, opts.kv_group_size, opts.max_kv_size)
    return model, tokenizer


def sampler_of(opts):
    return make_sampler(opts.temp, opts.top_p, opts.min_p, top_k=opts.top_k)


def build_parser():
    p = argparse.ArgumentParser(prog="mlx-skipless generate", description=__doc__.split("\n\n")[0])
    add_generation_args(p, max_tokens=100)
    p.add_argument(
        "--prompt", "-p", default=DEFAULT_PROMPT, help="the prompt, or - to read stdin (default: %(default)r)"
    )
    p.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="use the prompt as it is, not through the tokenizer's chat template",
    )
    p.add_argument(
        "--verbose",
        nargs="?",
        const=True,
        type=_bool,
        default=None,
        help="print timings (default true); given as true, also an error's traceback",
    )
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
        raise ValueError("--kv-bits and --max-kv-size do not combine: mlx-lm does not quantize a rotating KV cache")
    if model.args.head_dim % kv_group_size:
        raise ValueError(
            f"--kv-group-size {kv_group_size} does not divide the head size "
            f"{model.args.head_dim}, so the KV cache cannot be quantized"
        )


def context_length(model) -> int:
    return model.args.max_position_embeddings


def fit_context(model, prompt_len: int, max_tokens: int, held: int = 0, log=None) -> int:
    """How many tokens to generate after a prompt of prompt_len tokens that follows
    `held` tokens already in the cache (a chat's earlier turns); a CheckpointError
    where the prompt itself does not fit. Learned positions end at the context
    length (past it the model would reuse its last position and say nonsense), so
    there the conversation counts and generation is cut to fit, said through
    `log`; RoPE positions go on, so only the prompt is bounded, as mlx-lm does."""
    limit = context_length(model)
    learned = model.args.position_embedding_type == "learned"
    used = held + prompt_len if learned else prompt_len
    if used > limit or (learned and used == limit):
        if held and learned:
            raise CheckpointError(
                f"the conversation holds {held} tokens and this turn adds {prompt_len}; the model's context is {limit}"
            )
        raise CheckpointError(f"the prompt is {prompt_len} tokens; the model's context is {limit}")
    if learned and used + max_tokens > limit:
        max_tokens = limit - used
        if log:
            log(f"[INFO] generating {max_tokens} tokens: the context ends at {limit}")
    return max_tokens


def read_prompt(prompt: str) -> str:
    if prompt != "-":
        return prompt.replace("\\n", "\n")
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"stdin is not UTF-8 text ({e.reason} at byte {e.start})") from None


@cli.command(build_parser)
def main(opts):
    verbose = opts.verbose is not False
    check_generation_args(opts)
    prompt = read_prompt(opts.prompt)
    if not prompt:
        raise ValueError("the prompt is empty")
    model, tokenizer = load_for_generation(opts)
    tokens = encode_prompt(tokenizer, prompt, opts.system_prompt, opts.ignore_chat_template)
    if len(tokens) == 0:
        raise ValueError("the prompt encodes to no tokens")
    max_tokens = fit_context(model, len(tokens), opts.max_tokens, log=lambda note: print(note, file=sys.stderr))
    text = generate(
        model,
        tokenizer,
        tokens,
        verbose=verbose,
        max_tokens=max_tokens,
        sampler=sampler_of(opts),
        prompt_cache=prompt_cache(model, opts.max_kv_size),
        kv_bits=opts.kv_bits,
        kv_group_size=opts.kv_group_size,
        quantized_kv_start=opts.quantized_kv_start,
    )
    if not verbose:
        print(text)


if __name__ == "__main__":
    sys.exit(main())
