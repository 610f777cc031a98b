"""What a model form costs: held-out bits per byte and batch-1 decode speed, side by side.

Each trained model is scored by `evaluate` on the same files (bits per byte, tokenizers
aside), then all are timed together: decode steps interleaved one by one, in alternating
order, so drift on a shared machine hits them alike. The compressors' figures on the same
bytes close the table.
"""

import json
import os
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import data, evaluate


def describe_machine() -> str:
    """The machine, as every table names it beside its figures (with OpenBLAS, when preloaded)."""
    blas = ", OpenBLAS preloaded" if "openblas" in os.environ.get("LD_PRELOAD", "") else ""
    system = f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores"
    return f"{system}, mlx {mx.__version__} ({mx.default_device()}){blas}"


def weight_bytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def weight_count(model) -> int:
    """Every weight, those of quantized layers counted unpacked (not their uint32 words and scales)."""
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    for _, m in tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module)):
        if hasattr(m, "bits"):
            own = dict(tree_flatten(m.parameters()))
            n += m.weight.size * 32 // m.bits - sum(v.size for k, v in own.items() if k != "bias")
    return int(n)


def time_decode(models: dict, prompt: int, steps: int, warmup: int, vocab: int = 1000) -> dict:
    """Prompt tokens/s of each model, and the seconds of each of its `steps` decode steps
    after `warmup` more, the models' steps interleaved in alternating order."""
    from mlx_lm.models.cache import make_prompt_cache

    names = list(models)
    caches = {n: make_prompt_cache(m) for n, m in models.items()}
    tokens = mx.array(np.random.default_rng(1).integers(0, vocab, (1, prompt)))
    prefill = {}
    for n in names:
        mx.reset_peak_memory()
        t = time.perf_counter()
        mx.eval(models[n](tokens, cache=caches[n]))
        prefill[n] = prompt / (time.perf_counter() - t)
    times = {n: [] for n in names}
    token = mx.array([[1]])
    for step in range(warmup + steps):
        order = names if step % 2 == 0 else names[::-1]
        for n in order:
            t = time.perf_counter()
            mx.eval(models[n](token, cache=caches[n]))
            if step >= warmup:
                times[n].append(time.perf_counter() - t)
    return {"prefill_tokens_per_s": prefill, "step_times": times}


def describe(config: dict) -> str:
    """A model directory's form, from its config.json."""
    if config.get("conversion"):
        q = config.get("quantization")
        return f"converted, {q['bits']}-bit" if q else f"converted, {config.get('torch_dtype', '?')}"
    if config.get("residual"):
        return "residual, " + ("pre-norm" if config.get("block_norm") else "no block norms")
    return "skipless, " + ("block norms" if config.get("block_norm") else "norm-free")


def in_float32(model):
    """`model` with its stored weights (dequantized where quantized) held and computed in float32:
    the same values, on this CPU's BLAS. MLX's CPU kernels for bfloat16 and quantized products
    run 7-14x slower than float32 on OpenBLAS, which makes a held-out score of a converted model
    take half an hour; in float32 it measures what the stored weights lost, not the arithmetic
    of bfloat16 activations (the converter's verification reports that on its probe)."""
    from mlx_lm.utils import dequantize_model

    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    return model


def price(runs, files, prompt=32, steps=64, warmup=8, stride=None, log=print, score_in=None) -> dict:
    """Every (label, model directory) of `runs` scored on `files` and timed: one row each.
    A short context shortens the prompt, then the timed steps. `score_in="float32"` scores
    each model's stored weights in float32 arithmetic (in_float32); decoding is timed as stored."""
    from tqdm import tqdm

    texts = data.read_texts(files)
    rows, models = [], {}
    for label, path in runs:
        model, tok, context = evaluate.load(path)
        log(f"[INFO] scoring {label} ({path})")
        scored = in_float32(evaluate.load(path)[0]) if score_in == "float32" else model
        with tqdm(desc=f"scoring {label}", unit="window", file=sys.stderr, leave=False) as bar:
            r = evaluate.bits_per_byte(scored, tok, texts, context, stride, progress=bar.update)
        del scored
        config = json.loads((Path(path) / "config.json").read_text())
        rows.append(
            {
                "label": label,
                "path": str(path),
                "form": describe(config),
                "parameters": weight_count(model),
                "weight_bytes": weight_bytes(model),
                **{k: r[k] for k in ("bits_per_byte", "nats_per_token", "tokens", "context")},
            }
        )
        models[label] = (model, tok.get_vocab_size(), context)
        compressors, n_bytes = r["compressors"], r["bytes"]
    vocab = min(v for _, v, _ in models.values())
    room = min(c for _, _, c in models.values()) - 1
    prompt = max(1, min(prompt, room - warmup - steps))
    steps = min(steps, room - warmup - prompt)
    if steps < 1:
        raise ValueError(f"a {room + 1}-token context leaves no room for {warmup} warm-up steps")
    log(f"[INFO] timing decode: {len(models)} models interleaved, {warmup} + {steps} steps after {prompt} tokens")
    timing = time_decode({k: m for k, (m, _, _) in models.items()}, prompt, steps, warmup, vocab)
    for row in rows:
        t = 1 / np.array(timing["step_times"][row["label"]])
        row["decode_tokens_per_s"] = {"median": float(np.median(t)), "min": float(t.min()), "max": float(t.max())}
    return {
        "machine": describe_machine(),
        "files": len(files),
        "bytes": n_bytes,
        "rows": rows,
        "compressors": compressors,
        "decode": {"prompt": prompt, "steps": steps, "warmup": warmup},
        "scored_in": score_in or "stored",
    }


def markdown(result: dict, command: str) -> str:
    """`price`'s result as a Markdown table, naming the machine and the `command` that measured it."""
    d = result["decode"]
    lines = [
        f"{result['files']} held-out files, {result['bytes']:,} bytes; decode: batch 1, median of "
        f"{d['steps']} interleaved steps after a {d['prompt']}-token prompt. Measured on {result['machine']} "
        f"with `{command}`."
        + (" Bits per byte: the stored weights computed in float32." if result.get("scored_in") == "float32" else ""),
        "",
        "| model | form | weights | weight MB | bits per byte | nats per token | decode tokens/s (min-max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        t = r["decode_tokens_per_s"]
        lines.append(
            f"| {r['label']} | {r['form']} | {r['parameters']:,} | {r['weight_bytes'] / 1e6:.2f} | "
            f"{r['bits_per_byte']:.3f} | {r['nats_per_token']:.3f} | "
            f"{t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f}) |"
        )
    lines += [f"| {k} | compressor | | | {v:.3f} | | |" for k, v in result["compressors"].items()]
    return "\n".join(lines) + "\n"
