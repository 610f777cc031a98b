"""The price of skiplessness: one table of bits per byte on held-out Python and decode speed.

Give it the trained model directories to compare, each under a label, e.g. the
same trainer, data, tokenizer, size and steps as

  - a standard pre-norm transformer with residuals (train with `residual = true`),
  - the skipless model with its block norms, and after `normfree`,
  - the norm-free model converted in bfloat16 and in 4-bit.

Each is scored by `mlx_skipless.evaluate` on the same files (bits per byte,
tokenizers aside) and timed with scripts/bench_decode.py's interleaved decode
steps (batch 1, after a prompt), all models in one loop so that drift on a
shared machine hits them alike. The compressors' figures on the same bytes
close the table.

    python scripts/price_of_skiplessness.py residual=RUNS/residual skipless=RUNS/with-norms \\
        norm-free=RUNS/norm-free bf16=RUNS/bf16 4-bit=RUNS/q4 --data corpus
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import describe_machine, measure, weight_bytes  # noqa: E402

from mlx_skipless import data, evaluate  # noqa: E402


def parse_run(text: str):
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=DIR")
    return label, path


def weight_count(model) -> int:
    """Every weight, those of quantized layers counted unpacked (not their uint32 words and scales)."""
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    for _, m in tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module)):
        if hasattr(m, "bits"):
            own = dict(tree_flatten(m.parameters()))
            n += m.weight.size * 32 // m.bits - sum(v.size for k, v in own.items() if k != "bias")
    return int(n)


def describe(config: dict) -> str:
    if config.get("conversion"):
        q = config.get("quantization")
        return f"converted, {q['bits']}-bit" if q else f"converted, {config.get('torch_dtype', '?')}"
    if config.get("residual"):
        return "residual, " + ("pre-norm" if config.get("block_norm") else "no block norms")
    return "skipless, " + ("block norms" if config.get("block_norm") else "norm-free")


def run(runs, files, prompt=32, steps=64, warmup=8, stride=None, log=print) -> dict:
    texts = data.read_texts(files)
    rows, models = [], {}
    for label, path in runs:
        model, tok, context = evaluate.load(path)
        log(f"[INFO] scoring {label} ({path})")
        with tqdm(desc=f"scoring {label}", unit="window", file=sys.stderr, leave=False) as bar:
            r = evaluate.evaluate(model, tok, texts, context, stride, progress=bar.update)
        config = json.loads((Path(path) / "config.json").read_text())
        rows.append({"label": label, "path": str(path), "form": describe(config),
                     "parameters": weight_count(model),
                     "weight_bytes": weight_bytes(model), **{k: r[k] for k in ("bits_per_byte", "nats_per_token",
                                                                                "tokens", "context")}})
        models[label] = (model, tok.get_vocab_size(), context)
        compressors, n_bytes = r["compressors"], r["bytes"]
    vocab = min(v for _, v, _ in models.values())
    room = min(c for _, _, c in models.values()) - 1  # a short context shortens the prompt, then the steps
    prompt = max(1, min(prompt, room - warmup - steps))
    steps = min(steps, room - warmup - prompt)
    if steps < 1:
        raise ValueError(f"a {room + 1}-token context leaves no room for {warmup} warm-up steps")
    log(f"[INFO] timing decode: {len(models)} models interleaved, {warmup} + {steps} steps after {prompt} tokens")
    timing = measure({k: m for k, (m, _, _) in models.items()}, prompt, steps, warmup, vocab)
    for row in rows:
        t = 1 / np.array(timing["step_times"][row["label"]])
        row["decode_tokens_per_s"] = {"median": float(np.median(t)), "min": float(t.min()), "max": float(t.max())}
    return {"machine": describe_machine(), "files": len(files), "bytes": n_bytes, "rows": rows, "compressors": compressors,
            "decode": {"prompt": prompt, "steps": steps, "warmup": warmup}}


def markdown(result: dict, command: str) -> str:
    d = result["decode"]
    lines = [f"{result['files']} held-out files, {result['bytes']:,} bytes; decode: batch 1, median of "
             f"{d['steps']} interleaved steps after a {d['prompt']}-token prompt. Measured on {result['machine']} "
             f"with `{command}`.", "",
             "| model | form | weights | weight MB | bits per byte | nats per token | decode tokens/s (min-max) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        t = r["decode_tokens_per_s"]
        lines.append(f"| {r['label']} | {r['form']} | {r['parameters']:,} | {r['weight_bytes'] / 1e6:.2f} | "
                     f"{r['bits_per_byte']:.3f} | {r['nats_per_token']:.3f} | "
                     f"{t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f}) |")
    lines += [f"| {k} | compressor | | | {v:.3f} | | |" for k, v in result["compressors"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("runs", nargs="+", type=parse_run, metavar="LABEL=DIR", help="model directories to compare")
    p.add_argument("--data", nargs="+", default=["corpus"],
                   help="held-out Python files or folders, or a built corpus (its held-out packages; "
                        "default: 'corpus', the one built by python -m mlx_skipless.corpus)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens before the timed decode steps")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--stride", type=int, help="evaluation window stride (default: half the context)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--markdown", help="also write the table to this file")
    o = p.parse_args(argv)
    command = "python scripts/price_of_skiplessness.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        files = evaluate.read_files(o.data)
        result = run(o.runs, files, o.prompt, o.steps, o.warmup, o.stride,
                     log=(lambda *_: None) if o.json else print)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    table = markdown(result, command)
    print(json.dumps(result, indent=2) if o.json else table)
    if o.markdown:
        Path(o.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
