"""python -m mlx_skipless.fidelity: how a conversion survives each storage dtype.

For a vanilla skipless checkpoint: the condition numbers of every square Q, K
and V, then, per dtype (float32, float16, bfloat16, 8- and 4-bit), the
converter's `--remove` plan for that dtype and the converted model's max
relative logit error, top-1 agreement and KL against the original in float32,
beside the same figures for the *unconverted* model stored that way. Each row is
a real conversion (to a temporary directory) with the converter's verification.
"""

import argparse
import json
import sys
import tempfile

from . import cli
from .convert import DEFAULT_SOURCE, convert
from .errors import CheckpointError
from .loading import SkiplessCheckpoint
from .planner import condition_numbers
from .verify import PROBE_BATCH, PROBE_LENGTH

TARGETS = {
    "float32": ("float32", None),
    "float16": ("float16", None),
    "bfloat16": ("bfloat16", None),
    "8bit": ("bfloat16", 8),
    "4bit": ("bfloat16", 4),
}


def measure(
    source: str,
    targets,
    remove="auto",
    assume_skipless=False,
    group_size=64,
    probe_batch=PROBE_BATCH,
    revision=None,
    tokenizer=None,
) -> dict:
    ckpt = SkiplessCheckpoint(source, revision, assume_skipless)
    out = {"source": source, "condition_numbers": condition_numbers(ckpt), "dtypes": {}}
    for name in targets:
        dtype, bits = TARGETS[name]
        with tempfile.TemporaryDirectory() as tmp:
            try:
                report = convert(
                    source,
                    f"{tmp}/out",
                    remove=remove,
                    dtype=dtype,
                    quantize=bool(bits),
                    q_bits=bits or 4,
                    q_group_size=group_size,
                    assume_skipless=assume_skipless,
                    allow_degraded=True,
                    revision=revision,
                    probe_batch=probe_batch,
                    tokenizer=tokenizer,
                    progress=False,
                    log=lambda *_: None,
                )
            except CheckpointError as e:  # e.g. the original itself overflows float16
                out["dtypes"][name] = {"error": str(e)}
                continue
        v = report["verification"]
        out["dtypes"][name] = {
            "removed": [e["removed"] for e in report["layers"]],
            "weights_removed": report["weights"]["removed"],
            "converted": v["stored"]["converted"],
            "original": v["stored"]["original"],
            "degraded": v["degraded"],
            "plan": report.get("plan"),
        }
    return out


def render(result) -> str:
    lines = [f"{result['source']}", "", "condition numbers (square Q, K, V per layer):"]
    for i, row in enumerate(result["condition_numbers"]):
        lines.append(f"  layer {i}: " + ", ".join(f"{m.upper()} {c:.3g}" for m, c in row.items()))
    lines += [
        "",
        "| stored as | plan | plans tried | weights removed | converted: max rel. err / top-1 / KL | "
        "original rounded: max rel. err / top-1 / KL | clearly worse |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["dtypes"].items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | | | |")
            continue
        c, o = r["converted"], r["original"]
        tried = len(r["plan"]["trials"]) if r.get("plan") and "trials" in r["plan"] else "-"
        lines.append(
            f"| {name} | {' '.join(f or '-' for f in r['removed'])} | {tried} | {r['weights_removed']:,} | "
            f"{c['max_rel_error']:.2e} / {100 * c['top1_agreement']:.1f}% / {c['kl']:.2e} | "
            f"{o['max_rel_error']:.2e} / {100 * o['top1_agreement']:.1f}% / {o['kl']:.2e} | "
            f"{'YES' if r['degraded'] else 'no'} |"
        )
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(prog="mlx-skipless fidelity", description=__doc__.split("\n\n")[0])
    cli.add_model_args(
        p, "vanilla skipless checkpoint, directory or hub id (default: the packaged demo)", default=str(DEFAULT_SOURCE)
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=list(TARGETS),
        choices=list(TARGETS),
        help="storage dtypes to convert to and measure, a row each (8bit and 4bit: bfloat16 quantized; default: all)",
    )
    p.add_argument(
        "--remove",
        choices=["auto", "q", "k", "v"],
        default="auto",
        help="the converter's --remove: the matrix each block loses, or auto to plan it per "
        "layer and dtype (default %(default)s)",
    )
    p.add_argument(
        "--q-group-size",
        type=int,
        default=64,
        help="group size of the 8bit and 4bit rows' quantization (default %(default)s)",
    )
    p.add_argument(
        "--probe-batch",
        type=int,
        default=PROBE_BATCH,
        help=f"sequences of {PROBE_LENGTH} random tokens to verify on (default %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p


@cli.command(build_parser)
def main(o):
    result = measure(o.model, o.dtypes, o.remove, o.assume_skipless, o.q_group_size, o.probe_batch, o.revision)
    print(json.dumps(result, indent=2) if o.json else render(result))


if __name__ == "__main__":
    sys.exit(main())
