"""Every block form at equal settings: one table of weights, loss, bits per byte and decode speed.

At each size (d x layers: GLU 3d, heads of 64, RoPE, RMSNorm, untied head) the same
trainer, data, tokenizer, steps and seed train

  standard           pre-norm transformer with residual adds: the baseline
  wq-identity        the same without Q (q = norm(x)); attention scale 1/(2 sqrt(head_dim)) and
                     weight decay 2^-5, as Karbevski & Mijoski trained it
  figure-4           serial, skips and pre-norms, no Q and no P (Graef's Figure 4a)
  figure-4-parallel  x + Attn(u) + FFN(u), u = norm(x), no Q and no P (Figure 4b)
  figure-4-wide      figure-4 with the saved bytes spent back on FFN width: at most the
                     standard's bytes read per token (the question "does it win at equal speed?")
  skipless           no skips, shaped attention, pre-norms; then `normfree` (norm-free: 5 steps
                     after each norm is frozen, a tenth of --steps at the end) and
                     `convert --dtype bfloat16` (every legal matrix fused away)

Every final model is also stored in 4 bits (`convert -q`, group 32) and scored again:
residual-free transformers are reported to survive low-bit quantization much better than
residual ones. Bits per byte are on the corpus's held-out packages; decode is batch 1,
every model's steps interleaved (the standard first), so drift hits them alike.

Each step is a command of this package run as a subprocess; finished steps are kept and
an interrupted training resumes, so the table can be built over several invocations:

    python scripts/price_of_forms.py --sizes 256x4 512x8 --steps 600 --work forms-work
    python scripts/price_of_forms.py --sizes 256x4 512x8 --steps 600 --work forms-work --markdown docs/forms.md
"""

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from mlx_skipless import counting, evaluate, modeldir
from mlx_skipless.comparisons import FORMS, Q_GROUP, form_config
from mlx_skipless.models.skipless import ModelArgs
from mlx_skipless.pricing import price

REPO = Path(__file__).resolve().parents[1]


def command(*argv, log=print):
    argv = [sys.executable, "-m", *map(str, argv)]
    log("$ " + " ".join(shlex.quote(a) for a in argv[1:]))
    subprocess.run(argv, cwd=REPO, check=True)


def done(path: Path) -> bool:
    return (path / "config.json").exists()


def trained(work: Path, size: str, form: str, o, log=print) -> Path:
    """The run's directory, training (or resuming) it to o.steps first."""
    out = work / f"{size}-{form}"
    state = out / modeldir.TRAINING_DIR / modeldir.STATE
    if state.exists() and json.loads(state.read_text())["step"] >= o.steps:
        return out
    cfg = work / f"{size}-{form}.json"
    cfg.write_text(json.dumps(form_config(size, form, o.vocab_size), indent=2))
    _, flags = FORMS[form]
    argv = [
        "mlx_skipless.train",
        "--config",
        cfg,
        "--data",
        *o.data,
        "--mlx-path",
        out,
        "--steps",
        o.steps,
        "--batch-size",
        o.batch_size,
        "--context",
        o.context,
        "--vocab-size",
        o.vocab_size,
        "--eval-every",
        o.eval_every,
        "--save-every",
        o.eval_every,
        "--seed",
        o.seed,
    ]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    command(*(argv + (["--resume"] if state.exists() else [])), log=log)
    return out


def made(out: Path, *argv, log=print) -> Path:
    if not done(out):
        command(*argv, "--mlx-path", out, log=log)
    return out


def models_of(work: Path, size: str, o, log=print) -> dict:
    """{label: model directory}: every form in o.forms trained, the skipless one carried to norm-free
    and bfloat16, and a 4-bit copy of each final model."""
    runs = {form: trained(work, size, form, o, log) for form in o.forms}
    if "skipless" in runs:
        runs["skipless (norms)"] = runs.pop("skipless")
        runs.update(carried(work, size, runs["skipless (norms)"], o, log))
    for label in [k for k in runs if k not in ("skipless (norms)", "norm-free bf16")]:
        runs[f"{label} 4-bit"] = made(
            work / f"{size}-{label.replace(' ', '-')}-q4",
            "mlx_skipless.convert",
            "--hf-path",
            runs[label],
            "-q",
            "--q-group-size",
            Q_GROUP,
            log=log,
        )
    return runs


# normfree's own defaults (20 steps a norm, 200 at the end) suit a long run; after a short one they
# would train the norm-free row on more tokens than the others saw, so it gets a tenth of the steps
NORMFREE_STEPS_PER_NORM = 5


def carried(work: Path, size: str, skipless: Path, o, log=print) -> dict:
    """The skipless run with its norms removed, then converted to bfloat16."""
    runs = {}
    runs["norm-free"] = made(
        work / f"{size}-norm-free",
        "mlx_skipless.normfree",
        "--model",
        skipless,
        "--data",
        *o.data,
        "--batch-size",
        o.batch_size,
        "--steps-per-norm",
        NORMFREE_STEPS_PER_NORM,
        "--final-steps",
        max(1, o.steps // 10),
        log=log,
    )
    runs["norm-free bf16"] = made(
        work / f"{size}-norm-free-bf16",
        "mlx_skipless.convert",
        "--hf-path",
        runs["norm-free"],
        "--dtype",
        "bfloat16",
        log=log,
    )
    return runs


def row_facts(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    args = ModelArgs(**{k: v for k, v in cfg.items() if k in ModelArgs.__dataclass_fields__})
    state = path / modeldir.TRAINING_DIR / modeldir.STATE
    val, steps = None, "-"
    if state.exists():
        history = json.loads(state.read_text())["history"]
        val, steps = history[-1]["val_loss"], str(history[-1]["step"])
    elif "normfree" in cfg:  # its own validation windows; the fine-tuning steps come on top of training's
        val, steps = cfg["normfree"]["val_loss_norm_free"], f"+{cfg['normfree']['finetune_steps']}"
    counts = counting.count(args)
    return {
        "weights": counts["total"],
        "per_block": counting.block_weights(args),
        "steps": steps,
        "read_per_token": counts["read_per_token"],
        "val_loss": val,
    }


def table(size: str, runs: dict, priced: dict) -> list:
    by = {r["label"]: r for r in priced["rows"]}
    base = by["standard"]["decode_tokens_per_s"]["median"]
    standard_read = row_facts(runs["standard"])["read_per_token"]
    lines = []
    for label, path in runs.items():
        if label.endswith(" 4-bit"):
            continue
        r, f = by[label], row_facts(path)
        q = by.get(f"{label} 4-bit") or (by.get("norm-free 4-bit") if label == "norm-free bf16" else None)
        cells = [
            size,
            label,
            f["steps"],
            f"{f['weights']:,}",
            f"{f['per_block']:,}",
            "-" if f["val_loss"] is None else f"{f['val_loss']:.3f}",
            f"{r['bits_per_byte']:.3f}",
            f"{q['bits_per_byte'] - r['bits_per_byte']:+.3f}" if q else "-",
            f"{r['decode_tokens_per_s']['median']:.1f}",
            f"{standard_read / f['read_per_token']:.3f}x",
            f"{r['decode_tokens_per_s']['median'] / base:.3f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(results: dict, path: str, title: str):
    """Held-out bits per byte against decode speed: one panel a size, one point a model, the
    4-bit copies hollow, so a glance shows which form buys speed and which loses bits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.2), squeeze=False)
    for ax, (size, priced) in zip(axes[0], results.items()):
        by = {r["label"]: r for r in priced["rows"]}
        rows = [r for r in priced["rows"] if not r["label"].endswith(" 4-bit")]
        for i, r in enumerate(rows):
            color = f"C{i}"
            x, y = r["decode_tokens_per_s"]["median"], r["bits_per_byte"]
            ax.plot(x, y, "o", color=color, label=r["label"])
            q = by.get(f"{r['label']} 4-bit")
            if q:
                ax.plot(q["decode_tokens_per_s"]["median"], q["bits_per_byte"], "o", mfc="none", color=color)
                ax.plot([x, q["decode_tokens_per_s"]["median"]], [y, q["bits_per_byte"]], ":", color=color, lw=0.8)
        ax.set_title(f"d x layers = {size}", fontsize=9)
        ax.set_xlabel("decode tokens/s, batch 1 (hollow: 4-bit copy)")
        ax.set_ylabel("held-out bits per byte (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


HEADER = [
    "| size | form | steps | weights | per block | val loss (nats/token) | held-out bits/byte | 4-bit change "
    "| decode tok/s | predicted vs standard | measured vs standard |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--sizes", nargs="+", default=["256x4", "512x8"], help="d x layers")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", nargs="+", default=["corpus"], help="training data (default: the Python corpus)")
    p.add_argument(
        "--heldout", nargs="+", default=["corpus"], help="scored text (default: the corpus's held-out packages)"
    )
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument(
        "--score-in",
        choices=["stored", "float32"],
        default="stored",
        help="score models as stored (default), or their stored weights in float32 arithmetic: the same "
        "weights, 7-14x faster on a CPU, where MLX's bfloat16 and quantized products are slow",
    )
    p.add_argument(
        "--forms",
        nargs="+",
        choices=list(FORMS),
        default=list(FORMS),
        help="the forms to train (default: all); with --train-only, one invocation per core builds the table "
        "in parallel, and a last one with every form prices it",
    )
    p.add_argument("--train-only", action="store_true", help="train and convert, then stop before scoring and timing")
    p.add_argument("--work", default="forms-work", help="run directories (kept: a rerun continues)")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--markdown", help="write the table, the machine and this command here")
    p.add_argument("--plot", help="draw bits per byte against decode speed here (needs matplotlib: '.[plot]')")
    o = p.parse_args(argv)
    if not o.train_only and "standard" not in o.forms:
        p.error("pricing compares every form with the standard: add standard to --forms, or pass --train-only")
    work = Path(o.work)
    work.mkdir(parents=True, exist_ok=True)
    files = evaluate.read_files(o.heldout)
    lines, results = list(HEADER), {}
    for size in o.sizes:
        runs = models_of(work, size, o)
        if o.train_only:
            continue
        print(f"[INFO] {size}: scoring and timing {len(runs)} models", flush=True)
        priced = price(list(runs.items()), files, steps=o.decode_steps, score_in=o.score_in)
        results[size] = priced
        lines += table(size, runs, priced)
    if o.train_only:
        return 0
    machine = next(iter(results.values()))["machine"]
    text = "\n".join(lines)
    print(text)
    if o.plot:
        plot(results, o.plot, f"{o.steps} steps of {o.batch_size} x {o.context} tokens, seed {o.seed}; {machine}")
    if o.json:
        Path(o.json).write_text(json.dumps(results, indent=2))
    if o.markdown:
        cmd = "python scripts/price_of_forms.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        Path(o.markdown).write_text(
            "\n".join(
                [
                    "# Every form at equal settings",
                    "",
                    f"`{cmd}` on {machine}. Bits per byte on the held-out packages; the 4-bit change is the 4-bit "
                    "copy's bits per byte minus its own; decode is batch 1, interleaved steps, medians; predicted "
                    "speed-up from the weights read per token.",
                    "",
                    text,
                    "",
                ]
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
