"""python -m mlx_skipless.chat: an interactive session with a skipless model, as mlx_lm chat.

The KV cache is kept between turns, so each turn only processes its new tokens.
Type `q` to quit and `r` to reset the conversation.
"""

import argparse
import sys

from mlx_lm.generate import stream_generate

from . import cli
from .errors import CheckpointError
from .generate import (
    add_generation_args,
    check_generation_args,
    fit_context,
    load_for_generation,
    prompt_cache,
    sampler_of,
)


def build_parser():
    p = argparse.ArgumentParser(prog="mlx-skipless chat", description=__doc__.split("\n\n")[0])
    add_generation_args(p, max_tokens=256)
    return p


def turn_tokens(tokenizer, text, system_prompt, first):
    """A turn's new tokens: the chat template's rendering, or plain text for base models."""
    if not tokenizer.has_chat_template:
        return tokenizer.encode(text)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt and first else []
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


@cli.command(build_parser)
def main(opts, read=input, write=print):
    check_generation_args(opts)
    model, tokenizer = load_for_generation(opts)
    sampler = sampler_of(opts)

    def new_cache():
        return prompt_cache(model, opts.max_kv_size)

    cache, first = new_cache(), True
    write(f"[INFO] chatting with {opts.model}; 'q' quits, 'r' resets")
    while True:
        try:
            text = read(">> ")
        except EOFError:
            return 0
        if text.strip() == "q":
            return 0
        if text.strip() == "r":
            cache, first = new_cache(), True
            continue
        tokens = turn_tokens(tokenizer, text, opts.system_prompt, first)
        if len(tokens) == 0:
            continue
        try:  # a turn past the context is refused before the model sees it; the session goes on
            max_tokens = fit_context(model, len(tokens), opts.max_tokens, held=cache[0].offset, log=write)
        except CheckpointError as e:
            write(f"[INFO] {e}: this turn is not sent; 'r' resets the conversation")
            continue
        first = False
        for response in stream_generate(
            model,
            tokenizer,
            tokens,
            max_tokens=max_tokens,
            sampler=sampler,
            prompt_cache=cache,
            kv_bits=opts.kv_bits,
            kv_group_size=opts.kv_group_size,
            quantized_kv_start=opts.quantized_kv_start,
        ):
            write(response.text, end="", flush=True)
        write()


if __name__ == "__main__":
    sys.exit(main())
