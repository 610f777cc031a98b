"""Build the packaged model, mlx_skipless/demo/skipless-python, and its card.

It builds a size of the zoo recipe zoo/recipes/skipless-python.toml (the recipe's
settings, the size's over them; default: flagship) in WORK/SIZE, on the Python corpus of
`python -m mlx_skipless.corpus` (built first if missing). Every step is a command of this
package, run as a subprocess and named in the card beside the figures it produced: train
a skipless model with pre-norms, remove the norms (normfree), convert in bfloat16 and
quantize, score every stage on the corpus's held-out packages in bits per byte beside
gzip, bz2 and xz and time its decoding (scripts/price_of_skiplessness.py), sample three
prompts fixed in advance, and write the card to WORK/SIZE/README.md. `--baseline` also
trains the same model with residuals and pre-norms, for the price of skiplessness;
`--ship` makes the result the packaged model (at most 25 MB) and its card.

    python scripts/build_demo.py --baseline --ship                 # the packaged model
    python scripts/build_demo.py --size corpus-tiny --baseline     # the build's smoke test

Run the same command again to continue: training resumes from its last checkpoint
(`train --resume`), and finished steps are kept (a step is redone when what it was made
from is newer). What it costs, measured on Linux x86_64 with 2 shared cores and OpenBLAS
preloaded (OPENBLAS_NUM_THREADS=1, one run per core): the flagship's two training runs took
about 29 minutes each at about 1,450 tokens/s, normfree about 15 minutes, the table a few
more; the corpus-tiny build takes about 4 minutes with the token cache warm. On a cold cache
the first train command also trains the tokenizer and tokenizes the 53 MB corpus (about 50 s
of CPU); later commands read both back from the cache (mlx_skipless.tokencache).
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
    """The train command of `out` (add --resume to continue its checkpoint). A warmup-stable-decay
    run also keeps its last constant-rate step in OUT-stable, from which a later build extends it."""
    from mlx_skipless.zoo import _flags

    stable = ["--stable-path", str(out.with_name(out.name + "-stable"))] if options.get("schedule") == "wsd" else []
    return ["-m", "mlx_skipless.train", "--config", str(config), "--mlx-path", str(out), *_flags(options), *stable]


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
    price_args = ["scripts/price_of_skiplessness.py", *[f"{k}={v}" for k, v in runs.items()],
                  "--data", str(corpus_dir), "--json"]
    kept = work / "price.json"  # the table is the slow part of a rerun: kept until a model changes
    if kept.exists() and all(kept.stat().st_mtime > (path / "model.safetensors").stat().st_mtime
                             for path in runs.values()):
        commands["price"], price = shown(price_args, work, names), kept.read_text()
    else:
        price = step("price", price_args)
        kept.write_text(price)
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
             *conversion_section(work, commands), "",
             *compute_section(work, t, weights), "",
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


def conversion_section(work, commands) -> list:
    """What the conversions removed and how close they stayed, from their own reports."""
    from mlx_skipless.report import verification_rows

    reports = {d.name: json.loads((d / "config.json").read_text())["conversion"]
               for d in sorted(work.iterdir()) if d.name == "bf16" or d.name.startswith("q")
               if (d / "config.json").exists()}
    bf16 = reports["bf16"]
    w, conds = bf16["weights"], [e["cond"] for e in bf16["layers"] if "cond" in e]
    removed = sorted({e["removed"] for e in bf16["layers"]})
    rows = {}
    for report in reports.values():
        for label, m in verification_rows(report["verification"]):
            rows.setdefault(label, f"| {label} | {m['max_rel_error']:.2e} | {100 * m['top1_agreement']:.1f}% "
                                   f"| {m['kl']:.2e} |")
    return ["## Conversion", "",
            f"`{commands['convert']}` (the main job's plan, `--remove auto`, verification on) removed "
            f"{' or '.join(' and '.join(r.upper()) for r in removed)} per block: {w['before']:,} -> {w['after']:,} weights "
            f"({100 * w['removed_fraction']:.1f}% removed), predicted batch-1 speedup "
            f"{bf16['predicted_speedup']['bytes_read']:.3f}x; condition numbers of the inverted matrices "
            f"{min(conds):.3g} to {max(conds):.3g}. Verification against the norm-free model in float32, "
            "beside what plain rounding of the unconverted model costs:", "",
            "| model | max rel. logit error | top-1 agreement | KL |", "|---|---|---|---|", *rows.values()]


def compute_section(work, options, weights) -> list:
    """Validation loss against training compute (6 x weights x tokens), from the runs' own
    evaluations: what this build says a larger budget would buy."""
    from mlx_skipless.modeldir import training_state

    runs = {name: {h["step"]: h["val_loss"] for h in training_state(work / name).get("history", [])}
            for name in ("with-norms", "residual")}
    tokens = options["batch_size"] * options["context"]
    rows = [f"| {step} | {step * tokens / 1e6:.2f} | {6 * weights * step * tokens / 1e15:.3f} | "
            + " | ".join(f"{runs[n][step]:.3f}" if step in runs[n] else "-" for n in runs) + " |"
            for step in sorted(runs["with-norms"])]
    steps = sorted(runs["with-norms"])
    drops = ", ".join(f"{name} {runs[name][a] - runs[name][b]:.3f}" for name in runs
                      for a, b in [steps[-2:]] if a in runs[name] and b in runs[name])
    return ["## What more compute would buy", "",
            "Validation loss (nats/token, the corpus's validation split) at each evaluation of the two "
            "training runs, against training compute (6 x weights x tokens). Each run is one "
            f"schedule ({options.get('schedule', 'cosine')}), so this shows how fast the model was still "
            f"learning, not a scaling law: over the last {steps[-1] - steps[-2]} steps, as the learning rate "
            f"decayed, the loss still fell by {drops} nats.", "",
            "| step | tokens (M) | PFLOP | skipless (with norms) | standard |", "|---|---|---|---|---|", *rows]


def price_table(price, command) -> str:
    sys.path.insert(0, str(REPO / "scripts"))
    from price_of_skiplessness import markdown

    return markdown(price, command.removesuffix(" --json")).rstrip()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--work", default="demo-work", help="scratch directory (default: demo-work)")
    p.add_argument("--size", default="flagship",
                   help="the size of zoo/recipes/skipless-python.toml to build, in WORK/SIZE (default: flagship)")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS),
                   help=f"the corpus directory, built if missing (default: {DEFAULT_CORPUS})")
    p.add_argument("--baseline", action="store_true",
                   help="also train the same model with residuals and pre-norms (the price of skiplessness)")
    p.add_argument("--ship", action="store_true", help="make the result the packaged demo")
    o = p.parse_args()
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


if __name__ == "__main__":
    sys.exit(main())
