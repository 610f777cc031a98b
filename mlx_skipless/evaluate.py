"""python -m mlx_skipless.evaluate: bits per byte of a model on text, beside gzip, bz2 and xz.

Bits per byte compares models whatever their tokenizers: the summed negative
log-likelihood of every token, in bits, over the UTF-8 bytes of the text. The
files are joined as the trainer joins them, each followed by the end-of-text
token, and the stream starts with one, so every token of every file is scored
(the end-of-text tokens too: they are what a model pays to mark file ends).
Windows of the model's context slide by `--stride` tokens; each scores only
tokens no earlier window scored, so every token past the first window sees at
least context - stride tokens of the past. The same bytes, joined without
separators, are compressed by gzip -9, bz2 -9 and xz -9e for scale.

    python -m mlx_skipless.evaluate                    # the packaged demo on the held-out packages
    python -m mlx_skipless.evaluate --model DIR --data corpus      # the same, spelled out
    python -m mlx_skipless.evaluate --model DIR --data path/to/files_or_folders
"""

import argparse
import bz2
import gzip
import json
import lzma
import math
import sys
from typing import Dict, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import cli, corpus, data
from .convert import DEFAULT_SOURCE
from .hub import read_config, resolve

PATTERNS = ("*.py",)


def compressed_bits_per_byte(text: bytes) -> Dict[str, float]:
    """The standard compressors' bits per byte of `text`, at their strongest settings."""
    sizes = {
        "gzip -9": len(gzip.compress(text, compresslevel=9, mtime=0)),
        "bz2 -9": len(bz2.compress(text, compresslevel=9)),
        "xz -9e": len(lzma.compress(text, preset=9 | lzma.PRESET_EXTREME)),
    }
    return {k: 8 * v / len(text) for k, v in sizes.items()}


def windows(n: int, context: int, stride: int):
    """(start, first scored target) of equal windows of `context` inputs over a stream of n
    tokens; window s predicts targets s+1 .. s+context, and scores those from `first` on."""
    if n - 1 <= context:
        return [(0, 1)]
    starts = list(range(0, n - 1 - context, stride)) + [n - 1 - context]
    out, done = [], 0  # done: the last target scored
    for s in starts:
        out.append((s, max(done + 1, s + 1)))
        done = s + context
    return out


def nll_bits(model, ids: np.ndarray, context: int, stride: int, batch_size: int = 16, progress=None) -> float:
    """Summed negative log-likelihood, in bits, of ids[1:] given the tokens before each."""
    length = min(context, len(ids) - 1)
    spans = windows(len(ids), context, stride)
    total = 0.0
    for i in range(0, len(spans), batch_size):
        batch = spans[i : i + batch_size]
        x = np.stack([ids[s : s + length] for s, _ in batch])
        y = np.stack([ids[s + 1 : s + 1 + length] for s, _ in batch])
        logits = model(mx.array(x)).astype(mx.float32)
        nats = np.array(nn.losses.cross_entropy(logits, mx.array(y), reduction="none"), np.float64)
        for row, (s, first) in zip(nats, batch):
            total += row[first - s - 1 :].sum()
        if progress:
            progress(len(batch))
    return total / math.log(2)


def read_files(paths: Sequence[str]) -> list:
    """The files under `paths`; a built corpus directory stands for its held-out packages."""
    return data.find_files(paths, PATTERNS, split="heldout")


def bits_per_byte(
    model, tok, texts: Sequence[str], context: int, stride: int = None, batch_size: int = 16, progress=None
) -> dict:
    """The model's bits per byte on `texts` (joined as the trainer joins them), with the
    counts it is made of and the standard compressors' figures on the same bytes."""
    stride = stride or max(context // 2, 1)
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in 1..{context}, not {stride}")
    eos = tok.token_to_id(data.EOS)
    if eos is None:
        raise ValueError(f"the tokenizer has no {data.EOS} token to separate files with")
    ids = np.concatenate([[eos], data.encode(tok, texts)]).astype(np.int32)
    raw = "".join(texts).encode("utf-8")
    if not raw:
        raise ValueError(f"nothing to score: the {len(texts)} file(s) are empty")
    bits = nll_bits(model, ids, context, stride, batch_size, progress)
    if not math.isfinite(bits):
        raise ValueError(f"the model's loss on this text is {bits}: its weights or logits are not finite")
    return {
        "bits_per_byte": bits / len(raw),
        "nats_per_token": bits * math.log(2) / (len(ids) - 1),
        "tokens": len(ids) - 1,
        "bytes": len(raw),
        "files": len(texts),
        "context": context,
        "stride": stride,
        "compressors": compressed_bits_per_byte(raw),
    }


def load(path: str):
    """(model, `tokenizers` tokenizer, context) of a vanilla or converted model directory."""
    from .loading import load_model

    path = resolve(path)
    from .loading import check_tokenizer_fits

    model, config = load_model(str(path))
    context = read_config(path).get("max_position_embeddings")
    if not context:
        raise ValueError(f"{path}: config.json names no max_position_embeddings (the model's context)")
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"{path} has no tokenizer.json to score text with")
    tok = data.read_tokenizer_json(path)
    check_tokenizer_fits(tok, model.args.vocab_size, path)
    return model, tok, int(context)


def report(name: str, r: dict) -> str:
    lines = [
        f"{r['files']} files, {r['bytes']:,} bytes, {r['tokens']:,} tokens "
        f"(context {r['context']}, stride {r['stride']})",
        "",
        "| model or compressor | bits per byte |",
        "|---|---|",
        f"| {name} | {r['bits_per_byte']:.3f} |",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in r["compressors"].items()]
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(
        prog="mlx-skipless evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument(
        "--model", default=str(DEFAULT_SOURCE), help="vanilla or converted model directory (default: the packaged demo)"
    )
    p.add_argument(
        "--data",
        nargs="+",
        default=["corpus"],
        help="Python files or folders; a corpus built by mlx_skipless.corpus stands for its "
        f"held-out packages (default: 'corpus', the one built in {corpus.DEFAULT_OUT})",
    )
    p.add_argument("--stride", type=int, help="tokens each window advances (default: half the context)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="windows scored at once: more is faster and takes more memory (default %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p


@cli.command(build_parser)
def main(o):
    files = read_files(o.data)
    model, tok, context = load(o.model)
    texts = data.read_texts(files)
    from tqdm import tqdm

    with tqdm(desc="scoring", unit="window", disable=o.json, file=sys.stderr) as bar:
        r = bits_per_byte(model, tok, texts, context, o.stride, o.batch_size, bar.update)
    r["model"], r["data"] = o.model, o.data
    print(json.dumps(r, indent=2) if o.json else report(o.model, r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
