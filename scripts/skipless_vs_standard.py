"""The price of skiplessness: the same shapes trained skipless and as a standard transformer.

Each size trains twice with `python -m mlx_skipless.train` and its default flags, on the
same data, tokenizer and steps: the standard library, and the 1,024-token byte-level BPE
tokenizer the trainer makes from it (deterministic: every run trains the same one, and the
token cache keeps it):

  skipless  no residual adds, shaped attention, pre-norms (removed after training by
            normfree: this is the model before that step)
  standard  pre-norm transformer with residual adds and plain softmax attention

Runs land in WORK/<size>-<kind>/ (checkpoints saved at every evaluation): a finished run
is reused, an interrupted one resumed, so sizes can run in separate invocations (or in
parallel) and a last one draws everything, partial runs included with --report-only:

    python scripts/skipless_vs_standard.py --sizes 256x4 512x8 --steps 100
    python scripts/skipless_vs_standard.py --sizes 768x12 --steps 100      # later, same WORK
    python scripts/skipless_vs_standard.py --sizes 256x4 512x8 768x12 --steps 100 --report-only \\
        --json docs/skipless-vs-standard.json --plot docs/skipless-vs-standard.png
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from mlx_skipless import modeldir, train
from mlx_skipless.comparisons import KINDS, kind_config

REPO = Path(__file__).resolve().parents[1]


def run(size: str, kind: str, o):
    """The run's validation curve, training (or resuming) it first unless --report-only."""
    out = Path(o.work) / f"{size}-{kind}"
    state = out / modeldir.TRAINING_DIR / modeldir.STATE
    done = state.exists() and json.loads(state.read_text())["step"] >= o.steps
    if not done and not o.report_only:
        Path(o.work).mkdir(parents=True, exist_ok=True)
        cfg = Path(o.work) / f"{size}-{kind}.json"
        cfg.write_text(json.dumps(kind_config(size, kind), indent=2))
        cmd = [
            sys.executable,
            "-m",
            "mlx_skipless.train",
            "--config",
            str(cfg),
            "--data",
            "stdlib",
            "--vocab-size",
            "1024",
            "--steps",
            str(o.steps),
            "--eval-every",
            str(o.eval_every),
            "--save-every",
            str(o.eval_every),
            "--mlx-path",
            str(out),
        ] + (["--resume"] if state.exists() else [])
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)  # its progress bar shows on stderr
    if not state.exists():
        return None
    history = json.loads(state.read_text())["history"]
    if history[-1]["step"] < o.steps:
        print(f"[WARN] {out}: step {history[-1]['step']} of {o.steps}", flush=True)
    model = modeldir.read(out)[0]  # what a conversion would invert, at the last save
    cond = max((float(np.linalg.cond(np.array(w))) for w in train.inverted_candidates(model)), default=None)
    return {
        "size": size,
        "kind": kind,
        "steps": [h["step"] for h in history],
        "val_loss": [h["val_loss"] for h in history],
        "max_cond_qkv": cond,
    }


def table(runs: list) -> str:
    """Final validation losses, compared at the last step both kinds of a size reached."""
    rows = [
        "| size (d x layers) | step | standard val loss | skipless val loss | skipless vs standard "
        "| skipless max cond Q/K/V (step) |",
        "|---|---|---|---|---|---|",
    ]
    by = {(r["size"], r["kind"]): r for r in runs}
    for size in dict.fromkeys(r["size"] for r in runs):
        pair = [by.get((size, kind)) for kind in ("standard", "skipless")]
        common = set.intersection(*(set(r["steps"]) for r in pair if r))
        step = max(common) if common else max(r["steps"][-1] for r in pair if r)
        loss = [dict(zip(r["steps"], r["val_loss"])).get(step) if r else None for r in pair]
        cells = [f"{v:.3f}" if v is not None else "-" for v in loss]
        ratio = f"{100 * (loss[1] / loss[0] - 1):+.1f}%" if None not in loss else "-"
        k = pair[1]
        cond = f"{k['max_cond_qkv']:.3g} ({k['steps'][-1]})" if k and k["max_cond_qkv"] else "-"
        rows.append(f"| {size} | {step} | {cells[0]} | {cells[1]} | {ratio} | {cond} |")
    return "\n".join(rows)


def plot(runs: list, path: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = {}
    for r in runs:
        color = colors.setdefault(r["size"], f"C{len(colors)}")
        ax.plot(
            r["steps"],
            r["val_loss"],
            color=color,
            marker="o",
            ms=3,
            ls="-" if r["kind"] == "standard" else "--",
            label=f"{r['size']} {r['kind']}",
        )
    ax.set_xlabel("step (16 x 128 tokens)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["256x4", "512x8", "768x12"], help="d x layers")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--work", default="skipless-vs-standard-work", help="run directories (reused)")
    p.add_argument("--report-only", action="store_true", help="train nothing; report what WORK holds")
    p.add_argument("--json", help="write the validation curves here")
    p.add_argument("--plot", help="draw them here (needs matplotlib: pip install -e '.[plot]')")
    p.add_argument("--markdown", help="write the table, the machine and this command here")
    o = p.parse_args()
    runs = [r for size in o.sizes for kind in o.kinds if (r := run(size, kind, o))]
    machine = f"{platform.system()} {platform.machine()} ({os.cpu_count()} cores), Python {platform.python_version()}"
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        machine += ", OpenBLAS preloaded"
    if o.json:
        Path(o.json).write_text(
            json.dumps({"machine": machine, "steps": o.steps, "batch": "16 x 128", "runs": runs}, indent=2)
        )
    if o.plot:
        plot(runs, o.plot, f"default train flags, --data stdlib, 1,024-token BPE\n{machine}")
    print(table(runs))
    if o.markdown:
        command = "python scripts/skipless_vs_standard.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        Path(o.markdown).write_text(
            "\n".join(
                [
                    "# Skipless vs standard at equal settings",
                    "",
                    f"`{command}` on {machine}; `python -m mlx_skipless.train` with its default flags, "
                    "16 x 128 tokens per step of the standard library, its 1,024-token BPE tokenizer, validation "
                    "loss in nats/token (unigram entropy 5.92).",
                    "",
                    table(runs),
                    "",
                ]
            )
        )


if __name__ == "__main__":
    main()
