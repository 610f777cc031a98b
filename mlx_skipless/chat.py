"""python -m mlx_skipless.chat: an interactive session with a skipless model, as mlx_lm chat.

The KV cache is kept between turns, so each turn only processes its new tokens.
Type `q` to quit and `r` to reset the conversation.
"""

import argparse
import sys

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from .checkpoint import CheckpointError
from .generate import DEFAULT_MODEL, prompt_cache
from .loading import load


def build_parser():
    p = argparse.ArgumentParser(prog="mlx-skipless chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="converted directory, skipless checkpoint or hub id")
    p.add_argument("--system-prompt", help="system message for the chat template")
    p.add_argument("--max-tokens", "-m", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-kv-size", type=int)
    return p


def turn_tokens(tokenizer, text, system_prompt, first):
    """A turn's new tokens: the chat template's rendering, or plain text for base models."""
    if not tokenizer.has_chat_template:
        return tokenizer.encode(text)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt and first else []
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def main(argv=None, read=input, write=print):
    opts = build_parser().parse_args(argv)
    if opts.seed is not None:
        mx.random.seed(opts.seed)
    try:
        model, tokenizer = load(opts.model)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sampler = make_sampler(opts.temp, opts.top_p)
    cache, first = prompt_cache(model, opts.max_kv_size), True
    write(f"[INFO] chatting with {opts.model}; 'q' quits, 'r' resets")
    while True:
        try:
            text = read(">> ")
        except EOFError:
            return 0
        if text.strip() == "q":
            return 0
        if text.strip() == "r":
            cache, first = prompt_cache(model, opts.max_kv_size), True
            continue
        tokens = turn_tokens(tokenizer, text, opts.system_prompt, first)
        first = False
        for response in stream_generate(model, tokenizer, tokens, max_tokens=opts.max_tokens,
                                        sampler=sampler, prompt_cache=cache):
            write(response.text, end="", flush=True)
        write()


if __name__ == "__main__":
    sys.exit(main())
