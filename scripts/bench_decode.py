"""Batch-1 decode speed: vanilla skipless vs reduced (no Q, no P) vs mlx-lm's llama.

The three models share one shape and dtype; the reduced one has the shapes the
converter's fusion gives (no Q, no P), and all hold random weights, which decode
time does not depend on. Decode steps of the three run
interleaved one by one, in alternating order, after a warm-up, so drift on a
shared machine hits all three alike; the speedup is the
median of per-step time ratios. Prediction: bytes of weights read per token,
vanilla over reduced.

    python scripts/bench_decode.py                           # preset "small", float32 and bfloat16
    python scripts/bench_decode.py --preset mistral-7b --dtypes bfloat16 4bit --json
    python scripts/bench_decode.py --save f.json && python scripts/bench_decode.py --dtypes 4bit --save q.json
    python scripts/bench_decode.py --load f.json q.json --markdown docs/bench-decode.md --plot docs/bench-decode.png
"""

import argparse
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from mlx_skipless import fusion
from mlx_skipless.models.skipless import Model, ModelArgs
from mlx_skipless.pricing import describe_machine, time_decode, weight_bytes

PRESETS = {
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=2,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    ),  # a smoke test, not a measurement
    # runs on a laptop CPU; interleaved decode steps of this shape reach the predicted byte ratio
    "small": dict(
        hidden_size=2048,
        num_hidden_layers=8,
        intermediate_size=5632,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "mistral-7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    "pythia-6.9b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=16384,
        num_attention_heads=32,
        vocab_size=50432,
        parallel_block=True,
        mlp_type="mlp",
        hidden_act="gelu",
        partial_rotary_factor=0.25,
        attention_bias=True,
        mlp_bias=True,
    ),
}


def load(model, dtype):
    """`model` with its own random initial weights (decode time does not depend on the values),
    cast or quantized: built lazily by MLX in its dtype, so no host copy of a 7B model is made."""
    if dtype in ("4bit", "8bit"):
        model.set_dtype(mx.bfloat16)
        nn.quantize(model, 64, int(dtype[0]))
    else:
        model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    return model


def mlx_lm_llama(args: ModelArgs):
    return llama.Model(
        llama.ModelArgs(
            model_type="llama",
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_hidden_layers,
            intermediate_size=args.intermediate_size,
            num_attention_heads=args.num_attention_heads,
            num_key_value_heads=args.num_key_value_heads,
            rms_norm_eps=1e-5,
            vocab_size=args.vocab_size,
            tie_word_embeddings=False,
        )
    )


def bytes_read_per_token(model) -> int:
    """Every weight once per token, except the embedding table, of which one row is read."""
    embed = model.model.embed_tokens
    table = weight_bytes(embed)
    return weight_bytes(model) - table + table // embed.weight.shape[0]


def peak_memory(model, prompt: int, decode: int = 4) -> int:
    """Peak MLX memory of the process while `model` processes a prompt and decodes."""
    cache = make_prompt_cache(model)
    mx.eval(model(mx.zeros((1, prompt), dtype=mx.int32), cache=cache))
    for _ in range(decode):
        mx.eval(model(mx.array([[1]]), cache=cache))
    return mx.get_peak_memory()


def run(preset: str, dtype: str, prompt: int, steps: int, warmup: int) -> dict:
    args = ModelArgs(**PRESETS[preset])
    reduced_args = fusion.reduced_args(args, fusion.default_plan(args, "q"))  # the shapes fusion makes
    makers = {"vanilla": lambda: Model(args), "reduced": lambda: Model(reduced_args)}
    if not args.parallel_block and args.mlp_type == "glu":  # mlx-lm's llama has that shape
        makers["mlx_lm_llama"] = lambda: mlx_lm_llama(args)
    result = {"preset": preset, "dtype": dtype, "bytes_read_per_token": {}, "weight_bytes": {}, "peak_memory_bytes": {}}
    models = {}
    for n, make in makers.items():
        # Each model's own peak while it generates: the MLX memory it adds (weights, cache,
        # activations). The peak is reset after loading, so casting and quantizing, which hold
        # two copies of the weights for a moment, do not count: a converted model is stored
        # in its dtype and loads without them.
        mx.synchronize()
        mx.clear_cache()
        base = mx.get_active_memory()
        models[n] = load(make(), dtype)
        mx.clear_cache()
        mx.reset_peak_memory()
        result["peak_memory_bytes"][n] = peak_memory(models[n], prompt) - base
        result["bytes_read_per_token"][n] = bytes_read_per_token(models[n])
        result["weight_bytes"][n] = weight_bytes(models[n])
    timing = time_decode(models, prompt, steps, warmup)
    result["prefill_tokens_per_s"] = timing["prefill_tokens_per_s"]
    t = {n: np.array(v) for n, v in timing["step_times"].items()}
    result["decode_tokens_per_s"] = {
        n: {"median": float(np.median(1 / v)), "min": float((1 / v).min()), "max": float((1 / v).max())}
        for n, v in t.items()
    }
    b = result["bytes_read_per_token"]
    result["predicted_speedup"] = b["vanilla"] / b["reduced"]
    result["measured_speedup"] = float(np.median(t["vanilla"] / t["reduced"]))
    result["measured_over_predicted"] = result["measured_speedup"] / result["predicted_speedup"]
    if "mlx_lm_llama" in t:
        result["vanilla_over_mlx_lm_time"] = float(np.median(t["vanilla"] / t["mlx_lm_llama"]))
    result["steps"], result["warmup"], result["prompt"] = steps, warmup, prompt
    return result


def markdown(results, machine: str) -> str:
    lines = [
        f"Measured on {machine} with `python scripts/bench_decode.py`; decode tok/s are medians of the "
        "interleaved steps, speedups medians of per-step time ratios.",
        "",
        "| preset | dtype | steps (warm-up), prompt | vanilla tok/s | reduced tok/s | mlx-lm llama tok/s | "
        "predicted | measured | vanilla / mlx-lm time | prompt tok/s v / r / llama | "
        "peak memory vanilla -> reduced | peak drop / weights removed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        d, pre, pm, wb = r["decode_tokens_per_s"], r["prefill_tokens_per_s"], r["peak_memory_bytes"], r["weight_bytes"]
        llama_ = f"{d['mlx_lm_llama']['median']:.2f}" if "mlx_lm_llama" in d else "n/a"
        ratio = f"{r['vanilla_over_mlx_lm_time']:.3f}" if "vanilla_over_mlx_lm_time" in r else "n/a"
        lines.append(
            f"| {r['preset']} | {r['dtype']} | {r['steps']} ({r['warmup']}), {r['prompt']} | "
            f"{d['vanilla']['median']:.2f} | {d['reduced']['median']:.2f} | {llama_} | "
            f"{r['predicted_speedup']:.3f}x | {r['measured_speedup']:.3f}x | {ratio} | "
            f"{' / '.join(f'{v:.1f}' for v in pre.values())} | "
            f"{pm['vanilla'] / 1e9:.2f} -> {pm['reduced'] / 1e9:.2f} GB | "
            f"{(pm['vanilla'] - pm['reduced']) / 1e6:.0f} / {(wb['vanilla'] - wb['reduced']) / 1e6:.0f} MB |"
        )
    return "\n".join(lines) + "\n"


def plot(results, machine: str, path: str):
    """Decode tokens/s per dtype, median with min-max bars, predicted and measured speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("vanilla", "reduced", "mlx_lm_llama") if n in results[0]["decode_tokens_per_s"]]
    labels = {"vanilla": "vanilla skipless", "reduced": "reduced (no Q, no P)", "mlx_lm_llama": "mlx-lm llama"}
    fig, axes = plt.subplots(1, len(results), figsize=(1.5 + 2.6 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        d = [r["decode_tokens_per_s"][n] for n in names]
        med = np.array([x["median"] for x in d])
        err = np.array([[m - x["min"] for m, x in zip(med, d)], [x["max"] - m for m, x in zip(med, d)]])
        bars = ax.bar(range(len(names)), med, yerr=err, capsize=3, color=["C0", "C1", "C2"][: len(names)])
        ax.set_xticks([])
        ax.set_ylim(0, 1.25 * max(x["max"] for x in d))
        ax.set_title(
            f"{r['preset']}, {r['dtype']}\npredicted {r['predicted_speedup']:.3f}x, "
            f"measured {r['measured_speedup']:.3f}x",
            fontsize=9,
        )
    axes[0][0].set_ylabel("batch-1 decode tokens/s\n(median, min-max)")
    fig.legend(bars, [labels[n] for n in names], loc="lower center", ncol=len(names), fontsize=8)
    fig.suptitle(machine, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="small")
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16", "float16", "4bit", "8bit"],
    )
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens processed before decoding")
    p.add_argument("--steps", type=int, default=160, help="interleaved decode steps measured")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.add_argument("--save", help="also write the results as JSON to this file")
    p.add_argument(
        "--load",
        nargs="+",
        help="render --markdown / --plot from files --save wrote, measuring "
        "nothing; several files are shown side by side (e.g. a slow dtype run with fewer --steps)",
    )
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument(
        "--plot", help="also draw the figure to this image file (needs matplotlib: pip install -e '.[plot]')"
    )
    o = p.parse_args()
    if o.load:
        saved = [json.loads(open(f).read()) for f in o.load]
        machines = {x["machine"] for x in saved}
        if len(machines) > 1:
            p.error(f"--load: runs from different machines cannot share a table: {sorted(machines)}")
        machine, results = machines.pop(), [r for x in saved for r in x["results"]]
    else:
        machine = describe_machine()
        results = []
        for dtype in o.dtypes:
            results.append(run(o.preset, dtype, o.prompt, o.steps, o.warmup))
            if not o.json:
                r = results[-1]
                print(
                    f"{o.preset} {dtype}: predicted {r['predicted_speedup']:.3f}x, measured "
                    f"{r['measured_speedup']:.3f}x; "
                    + ", ".join(f"{n} {v['median']:.2f} tok/s" for n, v in r["decode_tokens_per_s"].items()),
                    flush=True,
                )
    if o.json:
        print(json.dumps({"machine": machine, "results": results}, indent=2))
    else:
        print(markdown(results, machine))
    if o.save:
        with open(o.save, "w") as f:
            json.dump({"machine": machine, "results": results}, f, indent=2)
    if o.markdown:
        with open(o.markdown, "w") as f:
            f.write(markdown(results, machine))
    if o.plot:
        plot(results, machine, o.plot)


if __name__ == "__main__":
    main()
