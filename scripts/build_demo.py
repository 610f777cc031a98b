"""Build the packaged demo model, mlx_skipless/demo/skipless-python, and its card.

Every step is a command of this package, run as a subprocess and named in the
card beside the figures it produced:

  1. train a skipless model with pre-norms on the Python standard library;
  2. remove the norms (normfree);
  3. ship the norm-free checkpoint inside the package;
  4. convert it (float32 and bfloat16) and record the verification;
  5. generate a sample from the converted model.

    python scripts/build_demo.py                 # ~40 min on 2 CPU cores
    python scripts/build_demo.py --reuse-training
    python scripts/build_demo.py --card-only     # the card again, from the shipped model
"""

import argparse
import json
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "mlx_skipless" / "demo" / "skipless-python"
TRAIN = ["-m", "mlx_skipless.train", "--config", "zoo/skipless-python.toml", "--data", "stdlib",
         "--steps", "2000", "--lr", "2e-3", "--q-init-scale", "0.1", "--orthogonality", "0.01", "--eval-every", "250",
         "--save-every", "250"]
NORMFREE = ["-m", "mlx_skipless.normfree", "--data", "stdlib", "--steps-per-norm", "25",
            "--final-steps", "300", "--lr", "2e-4"]
PROMPT = "def fibonacci(n):"
SHIPPED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "trainer.json")


def run(args, work):
    shown = "python " + " ".join(shlex.quote(a.replace(str(work), "WORK")) for a in args)
    print(f"$ {shown}", flush=True)
    out = subprocess.run([sys.executable, *args], cwd=REPO, check=True, capture_output=True, text=True)
    return shown, out.stdout


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="demo-work", help="scratch directory (default: demo-work)")
    p.add_argument("--reuse-training", action="store_true", help="keep WORK/with-norms if present")
    p.add_argument("--card-only", action="store_true",
                   help="keep the shipped model; redo the conversions, samples and card")
    o = p.parse_args()
    work = Path(o.work).resolve()
    work.mkdir(exist_ok=True)
    commands = {}
    if o.card_only:
        o.reuse_training = True
    if not (o.reuse_training and (work / "with-norms" / "config.json").exists()):
        shutil.rmtree(work / "with-norms", ignore_errors=True)
        commands["train"], _ = run(TRAIN + ["--mlx-path", str(work / "with-norms")], work)
    else:
        commands["train"] = "python " + " ".join(TRAIN) + " --mlx-path WORK/with-norms"
    normfree = NORMFREE + ["--model", str(work / "with-norms"), "--mlx-path", str(work / "norm-free"), "--force"]
    if o.card_only:
        commands["normfree"] = "python " + " ".join(a.replace(str(work), "WORK") for a in normfree)
    else:
        commands["normfree"], _ = run(normfree, work)
        shutil.rmtree(DEMO, ignore_errors=True)
        DEMO.mkdir(parents=True)
        for name in SHIPPED:
            shutil.copy(work / "norm-free" / name, DEMO / name)
    reports = {}
    for dtype in ("float32", "bfloat16"):
        out = work / f"converted-{dtype}"
        commands[f"convert {dtype}"], _ = run(["-m", "mlx_skipless.convert", "--mlx-path", str(out),
                                               "--dtype", dtype, "--force"], work)
        reports[dtype] = json.loads((out / "config.json").read_text())["conversion"]
    commands["generate"], sample = run(["-m", "mlx_skipless.generate", "--model",
                                        str(work / "converted-bfloat16"), "--prompt", PROMPT,
                                        "--max-tokens", "60", "--verbose", "false"], work)
    commands["generate, sampled"], sampled = run(["-m", "mlx_skipless.generate", "--model",
                                                  str(work / "converted-bfloat16"), "--prompt", PROMPT,
                                                  "--max-tokens", "60", "--temp", "0.8", "--top-p", "0.95",
                                                  "--seed", "0", "--verbose", "false"], work)
    state = json.loads((DEMO / "trainer.json").read_text())
    (DEMO / "README.md").write_text(card(state, reports, commands, sample, sampled))
    size = sum(f.stat().st_size for f in DEMO.iterdir())
    print(f"[INFO] wrote {DEMO} ({size / 1e6:.1f} MB)")


def card(state, reports, commands, sample, sampled) -> str:
    trained, nf = state["trained"], state["normfree"]
    last = trained["history"][-1]
    conds = [e["cond"] for e in reports["float32"]["layers"] if "cond" in e]
    w = reports["float32"]["weights"]
    from mlx_skipless.convert import verification_rows

    rows = {}  # by label: the float32 row comes from the float32 conversion
    for r in reports.values():
        for label, m in verification_rows(r["verification"]):
            rows.setdefault(label, f"| {label} | {m['max_rel_error']:.2e} | {100 * m['top1_agreement']:.1f}% "
                                   f"| {m['kl']:.2e} |")
    rows = list(rows.values())
    t = trained["options"]
    return "\n".join([
        "# skipless-python: the mlx-skipless demo model", "",
        "A small skipless transformer (no residual adds, no norms between blocks; a final RMSNorm "
        "before the head) trained on the Python standard library, with MLX, on the CPU of a "
        f"Linux machine ({platform.machine()}, Python {platform.python_version()}, "
        f"mlx {mx.__version__}). It is the converter's embedded default input. "
        "It is small and briefly trained: it writes Python-flavoured text, not working code.", "",
        "Model: `zoo/skipless-python.toml` (d 64, 4 layers, 4 heads, shaped attention, SwiGLU 192, RoPE, "
        "byte-level BPE with 1,024 tokens, context 128).", "",
        "## How it was made", "",
        "`python scripts/build_demo.py` ran these commands (WORK is its scratch directory):", "",
        *[f"- {step}: `{cmd}`" for step, cmd in commands.items()], "",
        "## Figures (all from the commands above)", "",
        "| stage | validation loss (nats/token) |", "|---|---|",
        f"| trained with pre-norms, {trained['step']} steps of {t['batch_size']}x{t['context']} tokens "
        f"(training loss {last['train_loss']:.3f}) | {last['val_loss']:.3f} |",
        f"| norms frozen to their average scale, fine-tuned {nf['finetune_steps']} steps | "
        f"{nf['val_loss_fixed_norms']:.3f} |",
        f"| norms folded into the next layers: norm-free, shipped here | {nf['val_loss_norm_free']:.3f} |", "",
        f"Conversion (`--remove auto`): {w['before']:,} -> {w['after']:,} weights "
        f"({100 * w['removed_fraction']:.1f}% removed), predicted batch-1 speedup "
        f"{reports['float32']['predicted_speedup']['bytes_read']:.3f}x; condition numbers of the "
        f"inverted matrices {min(conds):.3g} to {max(conds):.3g}.", "",
        "Verification against the shipped model in float32 (4 x 32 random tokens):", "",
        "| model | max rel. logit error | top-1 agreement | KL |", "|---|---|---|---|", *rows, "",
        f"## Samples from the converted bfloat16 model, prompt `{PROMPT}`", "",
        "Greedy (the `generate` command above):", "", "```python", PROMPT + sample.rstrip(), "```", "",
        "Sampled (`generate, sampled`):", "", "```python", PROMPT + sampled.rstrip(), "```", "",
    ])


if __name__ == "__main__":
    main()
