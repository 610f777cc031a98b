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

With `--size NAME` it builds a size of the zoo recipe zoo/recipes/skipless-python.toml
instead (the recipe's settings, the size's over them) in WORK/NAME, on the Python corpus
of `python -m mlx_skipless.corpus` (built first if missing): train, remove the norms,
convert in bfloat16 and quantize, then score every stage on the corpus's held-out
packages in bits per byte beside gzip, bz2 and xz and time its decoding
(scripts/price_of_skiplessness.py), sample three fixed prompts, and write the card to
WORK/NAME/README.md. Run the same command again to continue: training resumes from its
last checkpoint (`train --resume`), and finished steps are kept. `--baseline` also trains
the same model with residuals and pre-norms, for the price of skiplessness. The shipped
demo changes only with `--ship`.

    python scripts/build_demo.py --size corpus-tiny --baseline   # the build's smoke test
    python scripts/build_demo.py --size flagship --baseline      # rerun until it is done

What it costs, measured on a shared 2-core Linux x86_64 CPU with OpenBLAS preloaded: the
corpus-tiny build with --baseline took 4 minutes (114 s user and 50 s system CPU) with the
token cache warm, almost none of it training. On a cold cache the first train command also
trains the tokenizer and tokenizes the 53 MB corpus (about 50 s of CPU); every later command
on the same files reads both back from the cache in about a second (mlx_skipless.tokencache).
The flagship size has not been trained yet, so what a larger budget buys is not measured here.
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

from mlx_skipless.corpus import DEFAULT_OUT as DEFAULT_CORPUS

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "mlx_skipless" / "demo" / "skipless-python"
TRAIN = ["-m", "mlx_skipless.train", "--config", "zoo/skipless-python.toml", "--data", "stdlib",
         "--steps", "2000", "--lr", "2e-3", "--q-init-scale", "0.1", "--orthogonality", "0.01", "--eval-every", "250",
         "--save-every", "250"]
NORMFREE = ["-m", "mlx_skipless.normfree", "--data", "stdlib", "--steps-per-norm", "25",
            "--final-steps", "300", "--lr", "2e-4"]
PROMPT = "def fibonacci(n):"
SHIPPED = ("config.json", "model.safetensors", "model.safetensors.index.json", "skipless.py", "tokenizer.json",
           "tokenizer_config.json")
ZOO_ENTRY = REPO / "zoo" / "skipless-python.toml"
SHIP_LIMIT = 25_000_000  # bytes: the most the repository carries for its embedded model


def shown(args, work, names=()) -> str:
    """`python ARGS` as the card shows it: WORK (and each (path, NAME) of `names`) for paths."""
    text = " ".join(shlex.quote(a) for a in args)
    for path, name in (*names, (work, "WORK")):
        text = text.replace(str(path), name)
    return "python " + text


def run(args, work, stream=False, names=()):
    """Run `python ARGS` in the repository; (the command as the card shows it, its stdout)."""
    command = shown(args, work, names)
    print(f"$ {command}", flush=True)
    out = subprocess.run([sys.executable, *args], cwd=REPO, check=True, text=True,
                         stdout=None if stream else subprocess.PIPE, stderr=None if stream else subprocess.PIPE)
    return command, out.stdout


# -- a size of the zoo recipe, on the Python corpus ----------------------------------------------

RECIPE = "skipless-python"
PROMPTS = ("def fibonacci(n):", "class Stack:", "import json")  # chosen before any model saw them


def sized_steps(size: str, corpus_dir: Path):
    """(model config, {step: options}) of the recipe at `size`, with the data name `corpus`
    bound to `corpus_dir`."""
    from mlx_skipless import zoo

    model, steps = zoo.sized(RECIPE, size)
    steps = dict(steps)
    for options in steps.values():
        if "data" in options:
            options["data"] = [str(corpus_dir) if d == "corpus" else d for d in options["data"]]
    return model, steps


def trained_to(checkpoint: Path) -> int:
    """The step a training checkpoint reached (0: none yet)."""
    from mlx_skipless.modeldir import training_state

    return training_state(checkpoint).get("step", 0)


def train_command(config: Path, out: Path, options: dict):
    """The train command of `out` (add --resume to continue its checkpoint)."""
    from mlx_skipless.zoo import _flags

    return ["-m", "mlx_skipless.train", "--config", str(config), "--mlx-path", str(out), *_flags(options)]


def stale(target: Path, source: Path) -> bool:
    """`target` is missing or older than the checkpoint it was made from."""
    made, used = target / "config.json", source / "model.safetensors"
    return not made.exists() or made.stat().st_mtime < used.stat().st_mtime


def build_size(size: str, work: Path, corpus_dir: Path, baseline: bool, ship: bool):
    model, steps = sized_steps(size, corpus_dir)
    work.mkdir(parents=True, exist_ok=True)
    names = [(corpus_dir, "CORPUS")]
    commands = {}

    def step(label, args, stream=False):
        commands[label], out = run(args, work, stream, names)
        return out

    uses_corpus = any(str(corpus_dir) in o.get("data", []) for o in steps.values())
    if uses_corpus and not (corpus_dir / "manifest.json").exists():
        step("corpus", ["-m", "mlx_skipless.corpus", "--out", str(corpus_dir)], stream=True)
    twins = {"with-norms": model}
    if baseline:  # the same model as a standard transformer: residual adds and pre-norms
        twins["residual"] = {**model, "residual": True, "block_norm": model.get("block_norm") or "rmsnorm",
                             "shaped_attention": False}
    for name, config in twins.items():
        path = work / f"{name}.json"
        path.write_text(json.dumps(config, indent=2))
        args, done = train_command(path, work / name, steps["train"]), trained_to(work / name)
        if name != "with-norms":  # the same tokenizer, not merely the same recipe for one
            args += ["--tokenizer", str(work / "with-norms" / "tokenizer.json")]
        label = "train" if name == "with-norms" else f"train {name}"
        if done >= steps["train"]["steps"]:
            print(f"[INFO] {name}: trained ({done} steps)")
            commands[label] = shown(args, work, names)
        else:  # a new run, or the rest of an interrupted one
            step(label, args + (["--resume"] if done else []), stream=True)
            commands[label] = shown(args, work, names)
    from mlx_skipless.zoo import _flags

    runs = {"skipless": work / "with-norms", "norm-free": work / "norm-free"}
    normfree = ["-m", "mlx_skipless.normfree", "--model", str(work / "with-norms"), "--mlx-path",
                str(work / "norm-free"), "--force", *_flags(steps["normfree"])]
    convert = ["-m", "mlx_skipless.convert", "--hf-path", str(work / "norm-free"), "--force"]
    bits = steps["quantize"].get("q_bits", 4)
    later = [("normfree", normfree, work / "norm-free", work / "with-norms"),
             ("convert", convert + ["--mlx-path", str(work / "bf16"), *_flags(steps["convert"])],
              work / "bf16", work / "norm-free"),
             ("quantize", convert + ["--mlx-path", str(work / f"q{bits}"), "-q", *_flags(steps["quantize"])],
              work / f"q{bits}", work / "norm-free")]
    for label, args, target, source in later:
        if stale(target, source):
            step(label, args, stream=True)
        else:
            commands[label] = shown(args, work, names)
    runs.update({"bf16": work / "bf16", f"q{bits}": work / f"q{bits}"})
    if baseline:
        runs = {"residual": work / "residual", **runs}
    price = step("price", ["scripts/price_of_skiplessness.py", *[f"{k}={v}" for k, v in runs.items()],
                           "--data", str(corpus_dir), "--json"])
    samples = {}
    for prompt in PROMPTS:
        for how, extra in (("greedy", []), ("sampled", ["--temp", "0.8", "--top-p", "0.95", "--seed", "0"])):
            samples[prompt, how] = step(f"{how} sample of `{prompt}`", [
                "-m", "mlx_skipless.generate", "--model", str(work / "bf16"), "--prompt", prompt,
                "--max-tokens", "80", "--verbose", "false", *extra])
    manifest = json.loads((corpus_dir / "manifest.json").read_text()) if uses_corpus else None
    built_by = f"python scripts/build_demo.py --size {size}" + (" --baseline" if baseline else "")
    text = size_card(size, built_by, model, json.loads(price), commands, samples, manifest, work)
    (work / "README.md").write_text(text)
    print(f"[INFO] wrote {work / 'README.md'}")
    if ship:
        ship_build(work, text, names)


def ship_build(work: Path, card: str, names=(), demo: Path = DEMO, zoo_entry: Path = ZOO_ENTRY):
    """Make WORK/norm-free, with its card, the packaged demo `demo`, and the zoo entry describe
    it (WORK/with-norms: the model as trained). A model over SHIP_LIMIT bytes is refused
    before anything changes; the demo is replaced whole, never left half-copied."""
    source = work / "norm-free"
    files = [f for f in sorted(source.iterdir()) if f.is_file()]
    size = sum(f.stat().st_size for f in files) + len(card.encode())
    if size > SHIP_LIMIT:
        raise ValueError(f"{source} and its card take {size / 1e6:.1f} MB; the packaged demo may take at most "
                         f"{SHIP_LIMIT / 1e6:.0f} MB: ship a smaller size (or quantize it first)")
    entry = follow_trained(zoo_entry.read_text(), work / "with-norms")
    staged, old = demo.with_name(demo.name + ".partial"), demo.with_name(demo.name + ".old")
    for d in (staged, old):
        shutil.rmtree(d, ignore_errors=True)
    staged.mkdir(parents=True)
    for f in files:
        if f.name == "config.json":  # its records name paths of this machine: say WORK and CORPUS instead
            text = f.read_text()
            for path, name in (*names, (work, "WORK")):
                text = text.replace(str(path), name)
            (staged / f.name).write_text(text)
        else:
            shutil.copy(f, staged / f.name)
    (staged / "README.md").write_text(card)
    if demo.exists():
        demo.rename(old)
    staged.rename(demo)
    shutil.rmtree(old, ignore_errors=True)
    zoo_entry.write_text(entry)
    print(f"[INFO] shipped {source} as {demo} ({size / 1e6:.1f} MB); {zoo_entry} follows it")


def follow_trained(entry: str, trained: Path) -> str:
    """The zoo entry's text with its `parameters` and [model] table those of the checkpoint
    `trained` (the shipped model before its norms were removed): the fields the entry listed
    and those its config sets apart from what ModelArgs derives, with the entry's comments."""
    import dataclasses
    import re

    from mlx_skipless.checkpoint import read_config
    from mlx_skipless.families import model_fields
    from mlx_skipless.models.skipless import ModelArgs

    head, sep, table = entry.partition("\n[model]\n")
    if not sep or re.search(r"^\[", table, re.M):
        raise ValueError("the zoo entry must end with its [model] table")
    comments = {k: c for k, _, c in re.findall(r"^(\w+) = (.*?)(  # .*)?$", table, re.M)}  # "" if none
    fields = model_fields(read_config(trained))
    args = ModelArgs(**fields)
    required = [f.name for f in dataclasses.fields(ModelArgs) if f.default is dataclasses.MISSING]
    derived = ModelArgs(**{k: fields[k] for k in required})  # what the required fields alone give
    names = [f.name for f in dataclasses.fields(ModelArgs) if f.name in fields]
    lines = [f"{k} = {json.dumps(getattr(args, k))}{comments.get(k, '')}" for k in names
             if getattr(args, k) is not None  # TOML has no null: an absent field is the default
             and (k in required or k in comments or getattr(args, k) != getattr(derived, k))]
    count = sum(v.size for f in sorted(trained.glob("model*.safetensors")) for v in mx.load(str(f)).values())
    head, n = re.subn(r"^parameters = [\d_]+", f"parameters = {count:_}", head, flags=re.M)
    if n != 1:
        raise ValueError("the zoo entry has no `parameters = N` line to update")
    return head + sep + "\n".join(lines) + "\n"


def size_card(size, built_by, model, price, commands, samples, manifest, work) -> str:
    nf = json.loads((work / "norm-free" / "config.json").read_text())["normfree"]  # the run's record within it
    trained = nf["trained"]
    t = trained["options"]
    weights = next(r["parameters"] for r in price["rows"] if r["label"] == "skipless")
    lines = [f"# skipless-python ({size}): a skipless, norm-free transformer that writes Python", "",
             f"Built by `{built_by}` on {price['machine']}, Python {platform.python_version()}; "
             "every figure below comes from the command listed with it, on that machine.", "",
             f"Model: d {model['hidden_size']}, {model['num_hidden_layers']} layers, "
             f"{model['num_attention_heads']} heads, FFN {model['intermediate_size']}, context {t['context']}, "
             f"{weights:,} weights as trained; trained {trained['step']} steps of "
             f"{t['batch_size']} x {t['context']} tokens to validation loss {trained['history'][-1]['val_loss']:.3f} "
             f"nats/token (`train`); norms then removed (`normfree`, {nf['finetune_steps']} fine-tuning steps): "
             f"{nf['val_loss_norm_free']:.3f}.", "",
             "## Bits per byte on held-out packages, and decode speed", "",
             "Held-out packages (never in training or the tokenizer): "
             + (", ".join(f"{e['package']} {e['version']}" for e in manifest["packages"] if e["split"] == "heldout")
                if manifest else "(files given)") + ".", "",
             price_table(price, commands["price"]), "",
             "## Commands (WORK: the build directory; CORPUS: the corpus directory)", "",
             *[f"- {k}: `{v}`" for k, v in commands.items()], "",
             "## Samples from the converted bfloat16 model (prompts chosen before training)", ""]
    for (prompt, how), text in samples.items():
        lines += [f"{how.capitalize()}, `{prompt}`:", "", "```python", prompt + text.rstrip(), "```", ""]
    if manifest:
        lines += ["## Corpus manifest", "",
                  f"Python {manifest['python']}; training {manifest['splits']['train']['bytes']:,} bytes in "
                  f"{manifest['splits']['train']['files']} files, held out {manifest['splits']['heldout']['bytes']:,} "
                  f"bytes in {manifest['splits']['heldout']['files']} files.", "",
                  "| package | version | licence | split | files | bytes | wheel sha256 |", "|---|---|---|---|---|---|---|",
                  *[f"| {e['package']} | {e['version']} | {e['licence']} | {e['split']} | {e['files']} | "
                    f"{e['bytes']:,} | {(e['sha256'] or '')[:16]} |" for e in manifest["packages"]], ""]
    return "\n".join(lines)


def price_table(price, command) -> str:
    sys.path.insert(0, str(REPO / "scripts"))
    from price_of_skiplessness import markdown

    return markdown(price, command.removesuffix(" --json")).rstrip()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--work", default="demo-work", help="scratch directory (default: demo-work)")
    p.add_argument("--reuse-training", action="store_true", help="keep WORK/with-norms if present")
    p.add_argument("--card-only", action="store_true",
                   help="keep the shipped model; redo the conversions, samples and card")
    p.add_argument("--size", help="build this size of zoo/recipes/skipless-python.toml in WORK/SIZE instead")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS),
                   help=f"with --size: the corpus directory, built if missing (default: {DEFAULT_CORPUS})")
    p.add_argument("--baseline", action="store_true",
                   help="with --size: also train the same model with residuals and pre-norms")
    p.add_argument("--ship", action="store_true", help="with --size: make the result the packaged demo")
    o = p.parse_args()
    if o.size:
        try:
            sized_steps(o.size, Path(o.corpus))
        except KeyError as e:
            p.error(e.args[0])
        try:
            build_size(o.size, Path(o.work).resolve() / o.size, Path(o.corpus).expanduser().resolve(),
                       o.baseline, o.ship)
        except subprocess.CalledProcessError as e:
            print((e.stderr or "")[-2000:] + f"error: {shlex.join(e.cmd[1:])} failed (exit status "
                  f"{e.returncode}); run the same command again to continue", file=sys.stderr)
            return 1
        return 0
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
    nf = json.loads((DEMO / "config.json").read_text())["normfree"]  # normfree's record, the run's within it
    state = {"trained": nf["trained"], "normfree": nf}
    (DEMO / "README.md").write_text(card(state, reports, commands, sample, sampled))
    size = sum(f.stat().st_size for f in DEMO.iterdir())
    print(f"[INFO] wrote {DEMO} ({size / 1e6:.1f} MB)")


def card(state, reports, commands, sample, sampled) -> str:
    trained, nf = state["trained"], state["normfree"]
    last = trained["history"][-1]
    conds = [e["cond"] for e in reports["float32"]["layers"] if "cond" in e]
    w = reports["float32"]["weights"]
    from mlx_skipless.report import verification_rows

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
    sys.exit(main())
