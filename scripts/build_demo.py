"""Build the packaged model, mlx_skipless/demo/skipless-python, and its card.

It runs a size of the zoo recipe zoo/recipes/skipless-python.toml (the recipe's settings,
the size's over them; default: flagship) in WORK/SIZE through `mlx_skipless.zoo.run`, on
the Python corpus of `python -m mlx_skipless.corpus` (built first if missing): train a
skipless model with pre-norms, remove the norms (normfree), convert in bfloat16 and
quantize. It then scores every stage on the corpus's held-out packages in bits per byte
beside gzip, bz2 and xz and times its decoding (mlx_skipless.pricing, as
scripts/price_of_skiplessness.py does), samples three prompts fixed in advance, and writes
the card to WORK/SIZE/README.md, naming each step's command beside the figures it produced.
`--baseline` also trains the same model with residuals and pre-norms, for the price of
skiplessness; `--ship` makes the result the packaged model (at most 25 MB) and its card.

    python scripts/build_demo.py --baseline --ship                 # the packaged model
    python scripts/build_demo.py --size corpus-tiny --baseline     # the build's smoke test

Run the same command again to continue: training resumes from its last checkpoint
(`train --resume`), and finished steps are kept (a step is redone when what it was made
from is newer). What it costs, measured on Linux x86_64 with 2 cores and OpenBLAS preloaded
(OPENBLAS_NUM_THREADS=2), the cores shared with other work: the flagship's 2,000 training
steps about 2 h 45 min (1,300-1,700 tokens/s), then normfree, both conversions, the price table
(held-out scores of the stored weights in float32) and the samples about 28 minutes; the
corpus-tiny build takes about 4 minutes with the token cache warm. On a cold cache
the first train command also trains the tokenizer and tokenizes the 53 MB corpus (about 50 s
of CPU); later commands read both back from the cache (mlx_skipless.tokencache).
"""

import argparse
import contextlib
import io
import json
import platform
import shlex
import shutil
import sys
from pathlib import Path

import mlx.core as mx

from mlx_skipless import cli, evaluate, pricing, recipe, zoo
from mlx_skipless.corpus import DEFAULT_OUT as DEFAULT_CORPUS

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "mlx_skipless" / "demo" / "skipless-python"
ZOO_ENTRY = REPO / "zoo" / "skipless-python.toml"
SHIP_LIMIT = 25_000_000  # bytes: the most the repository carries for its embedded model

RECIPE = "skipless-python"
PROMPTS = ("def fibonacci(n):", "class Stack:", "import json")  # chosen before any model saw them
# where each step of the recipe leaves its model in WORK/SIZE; the card and --ship read them there
# MLX's CPU has no fast bfloat16 or quantized products: there the converted models' held-out
# scores take their stored weights in float32 (minutes, not an hour); the conversion section
# reports the bfloat16 arithmetic itself, on the converter's probe.
SCORE_IN = "float32" if mx.default_device() == mx.cpu else "stored"
DIRS = {"train": "with-norms", "normfree": "norm-free", "convert": "bf16"}  # quantize: q<bits>


def shown(command: str, names) -> str:
    """`command` as the card shows it: NAME for the path of each (path, NAME) of `names`."""
    for path, name in names:
        command = command.replace(str(path), name)
    return command


def nested(module, argv, names, capture=False):
    """Run `python -m mlx_skipless.MODULE ARGV` in this process: (the command as the card shows
    it, what it printed if `capture`)."""
    command = shown(f"python -m {module.__name__} {shlex.join(argv)}", names)
    print(f"$ {command}", flush=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out) if capture else contextlib.nullcontext():
        code = module.main.nested(argv)
    if code:
        raise cli.CommandError(f"{command} failed (exit status {code})")
    return command, out.getvalue()


def stable_path(options: dict, out: Path) -> dict:
    """A warmup-stable-decay run also keeps its last constant-rate step in OUT-stable, from
    which a later build extends it."""
    return {"stable_path": str(out.with_name(out.name + "-stable"))} if options.get("schedule") == "wsd" else {}


def train_baseline(work: Path, model: dict, options: dict, names) -> str:
    """The same model as a standard transformer (residual adds and pre-norms) in WORK/residual,
    trained as the recipe trains it and on the skipless run's tokenizer; its command."""
    from mlx_skipless import train

    config = {**model, "residual": True, "block_norm": model.get("block_norm") or "rmsnorm", "shaped_attention": False}
    path, out = work / "residual.json", work / "residual"
    path.write_text(json.dumps(config, indent=2))
    argv = [
        "--config",
        str(path),
        "--mlx-path",
        str(out),
        *recipe.flags({**options, **stable_path(options, out)}),
        "--tokenizer",
        str(work / DIRS["train"] / "tokenizer.json"),
    ]  # the same tokenizer, not one like it
    done = recipe.trained_to(out)
    if done >= options["steps"]:
        print(f"[INFO] residual: trained ({done} steps)")
    else:  # a new run, or the rest of an interrupted one
        nested(train, argv + (["--resume"] if done else []), names)
    return shown(f"python -m {train.__name__} {shlex.join(argv)}", names)


def price(work: Path, runs: dict, corpus_dir: Path, names):
    """(the table's command, its figures as JSON): kept in WORK/price.json until a model changes,
    being the slow part of a rerun."""
    argv = [
        "scripts/price_of_skiplessness.py",
        *[f"{k}={v}" for k, v in runs.items()],
        "--data",
        str(corpus_dir),
        *(["--score-in", SCORE_IN] if SCORE_IN != "stored" else []),
        "--json",
    ]
    command, kept = shown("python " + shlex.join(argv), names), work / "price.json"
    if kept.exists() and all(
        kept.stat().st_mtime > (path / "model.safetensors").stat().st_mtime for path in runs.values()
    ):
        return command, kept.read_text()
    print(f"$ {command}", flush=True)
    result = pricing.price(list(runs.items()), evaluate.read_files([str(corpus_dir)]), score_in=SCORE_IN)
    kept.write_text(json.dumps(result, indent=2) + "\n")
    return command, kept.read_text()


def build_size(size: str, work: Path, corpus_dir: Path, baseline: bool, ship: bool):
    from mlx_skipless import corpus, generate

    names = [(corpus_dir, "CORPUS"), (work, "WORK")]
    data = {"corpus": corpus_dir}
    model, steps = zoo.sized(RECIPE, size, data=data)
    steps = dict(steps)
    bits = steps["quantize"].get("q_bits", 4)
    dirs = {**DIRS, "quantize": f"q{bits}"}
    options = {"train": stable_path(steps["train"], work / dirs["train"])}
    commands = {}
    uses_corpus = any(str(corpus_dir) in o.get("data", []) for o in steps.values())
    if uses_corpus and not (corpus_dir / "manifest.json").exists():
        commands["corpus"], _ = nested(corpus, ["--out", str(corpus_dir)], names)
    work.mkdir(parents=True, exist_ok=True)
    zoo.run(RECIPE, size, work, data=data, options=options, dirs=dirs, keep=True)
    residual = train_baseline(work, model, steps["train"], names) if baseline else None
    for step in zoo.commands(RECIPE, size, work, data=data, options=options, dirs=dirs):
        if step.kind != "generate":  # its text is the recipe's check, not the card's samples
            commands[step.kind] = shown(step.command(), names)
        if step.kind == "train" and residual:
            commands["train residual"] = residual
    runs = {
        "skipless": work / dirs["train"],
        "norm-free": work / dirs["normfree"],
        "bf16": work / dirs["convert"],
        f"q{bits}": work / dirs["quantize"],
    }
    if baseline:
        runs = {"residual": work / "residual", **runs}
    commands["price"], figures = price(work, runs, corpus_dir, names)
    samples = {}
    for prompt in PROMPTS:
        for how, extra in (("greedy", []), ("sampled", ["--temp", "0.8", "--top-p", "0.95", "--seed", "0"])):
            argv = [
                "--model",
                str(work / dirs["convert"]),
                "--prompt",
                prompt,
                "--max-tokens",
                "80",
                "--verbose",
                "false",
                *extra,
            ]
            commands[f"{how} sample of `{prompt}`"], samples[prompt, how] = nested(generate, argv, names, capture=True)
    manifest = json.loads((corpus_dir / "manifest.json").read_text()) if uses_corpus else None
    built_by = f"python scripts/build_demo.py --size {size}" + (" --baseline" if baseline else "")
    text = size_card(size, built_by, model, json.loads(figures), commands, samples, manifest, work)
    (work / "README.md").write_text(text)
    print(f"[INFO] wrote {work / 'README.md'}")
    if ship:
        ship_build(work, text, names)


def ship_build(work: Path, card: str, names=(), demo: Path = DEMO, zoo_entry: Path = ZOO_ENTRY):
    """Make WORK/norm-free, with its card, the packaged demo `demo`, and the zoo entry describe
    it (WORK/with-norms: the model as trained). A model over SHIP_LIMIT bytes is refused
    before anything changes; the demo is replaced whole, never left half-copied."""
    source = work / "norm-free"
    # the model and its tokenizer; not the manifest that marks a build output as ours (the
    # packaged copy is the repository's, and its config.json is rewritten below)
    files = [f for f in sorted(source.iterdir()) if f.is_file() and not f.name.startswith(".")]
    size = sum(f.stat().st_size for f in files) + len(card.encode())
    if size > SHIP_LIMIT:
        raise ValueError(
            f"{source} and its card take {size / 1e6:.1f} MB; the packaged demo may take at most "
            f"{SHIP_LIMIT / 1e6:.0f} MB: ship a smaller size (or quantize it first)"
        )
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

    from mlx_skipless.families import model_fields
    from mlx_skipless.hub import read_config
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
    lines = [
        f"{k} = {json.dumps(getattr(args, k))}{comments.get(k, '')}"
        for k in names
        if getattr(args, k) is not None  # TOML has no null: an absent field is the default
        and (k in required or k in comments or getattr(args, k) != getattr(derived, k))
    ]
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
    lines = [
        f"# skipless-python ({size}): a skipless, norm-free transformer that writes Python",
        "",
        f"Built by `{built_by}` on {price['machine']}, Python {platform.python_version()}; "
        "every figure below comes from the command listed with it, on that machine.",
        "",
        f"Model: d {model['hidden_size']}, {model['num_hidden_layers']} layers, "
        f"{model['num_attention_heads']} heads, FFN {model['intermediate_size']}, context {t['context']}, "
        f"{weights:,} weights as trained; trained {trained['step']} steps of "
        f"{t['batch_size']} x {t['context']} tokens to validation loss {trained['history'][-1]['val_loss']:.3f} "
        f"nats/token (`train`); norms then removed (`normfree`, {nf['finetune_steps']} fine-tuning steps): "
        f"{nf['val_loss_norm_free']:.3f}.",
        "",
        "## Bits per byte on held-out packages, and decode speed",
        "",
        "Held-out packages (never in training or the tokenizer): "
        + (
            ", ".join(f"{e['package']} {e['version']}" for e in manifest["packages"] if e["split"] == "heldout")
            if manifest
            else "(files given)"
        )
        + ".",
        "",
        price_table(price, commands["price"]),
        "",
        *conversion_section(work, commands),
        "",
        *compute_section(work, t, weights),
        "",
        "## Commands (WORK: the build directory; CORPUS: the corpus directory)",
        "",
        *[f"- {k}: `{v}`" for k, v in commands.items()],
        "",
        "## Samples from the converted bfloat16 model (prompts chosen before training)",
        "",
    ]
    for (prompt, how), text in samples.items():
        lines += [f"{how.capitalize()}, `{prompt}`:", "", "```python", prompt + text.rstrip(), "```", ""]
    if manifest:
        lines += [
            "## Corpus manifest",
            "",
            f"Python {manifest['python']}; training {manifest['splits']['train']['bytes']:,} bytes in "
            f"{manifest['splits']['train']['files']} files, held out {manifest['splits']['heldout']['bytes']:,} "
            f"bytes in {manifest['splits']['heldout']['files']} files.",
            "",
            "| package | version | licence | split | files | bytes | wheel sha256 |",
            "|---|---|---|---|---|---|---|",
            *[
                f"| {e['package']} | {e['version']} | {e['licence']} | {e['split']} | {e['files']} | "
                f"{e['bytes']:,} | {(e['sha256'] or '')[:16]} |"
                for e in manifest["packages"]
            ],
            "",
        ]
    return "\n".join(lines)


def conversion_section(work, commands) -> list:
    """What the conversions removed and how close they stayed, from their own reports."""
    from mlx_skipless.report import verification_rows

    reports = {
        d.name: json.loads((d / "config.json").read_text())["conversion"]
        for d in sorted(work.iterdir())
        if d.name == "bf16" or d.name.startswith("q")
        if (d / "config.json").exists()
    }
    bf16 = reports["bf16"]
    w, conds = bf16["weights"], [e["cond"] for e in bf16["layers"] if "cond" in e]
    removed = sorted({e["removed"] for e in bf16["layers"]})
    rows = {}
    for report in reports.values():
        for label, m in verification_rows(report["verification"]):
            rows.setdefault(
                label, f"| {label} | {m['max_rel_error']:.2e} | {100 * m['top1_agreement']:.1f}% | {m['kl']:.2e} |"
            )
    return [
        "## Conversion",
        "",
        f"`{commands['convert']}` (the main job's plan, `--remove auto`, verification on) removed "
        f"{' or '.join(' and '.join(r.upper()) for r in removed)} per block: {w['before']:,} -> {w['after']:,} weights "
        f"({100 * w['removed_fraction']:.1f}% removed), predicted batch-1 speedup "
        f"{bf16['predicted_speedup']['bytes_read']:.3f}x; condition numbers of the inverted matrices "
        f"{min(conds):.3g} to {max(conds):.3g}. Verification against the norm-free model in float32, "
        "beside what plain rounding of the unconverted model costs:",
        "",
        "| model | max rel. logit error | top-1 agreement | KL |",
        "|---|---|---|---|",
        *rows.values(),
    ]


def compute_section(work, options, weights) -> list:
    """Validation loss against training compute (6 x weights x tokens), from the runs' own
    evaluations: what this build says a larger budget would buy."""
    from mlx_skipless.modeldir import training_state

    runs = {
        name: {h["step"]: h["val_loss"] for h in training_state(work / name).get("history", [])}
        for name in ("with-norms", "residual")
    }
    tokens = options["batch_size"] * options["context"]
    rows = [
        f"| {step} | {step * tokens / 1e6:.2f} | {6 * weights * step * tokens / 1e15:.3f} | "
        + " | ".join(f"{runs[n][step]:.3f}" if step in runs[n] else "-" for n in runs)
        + " |"
        for step in sorted(runs["with-norms"])
    ]
    steps = sorted(runs["with-norms"])
    drops = ", ".join(
        f"{name} {runs[name][a] - runs[name][b]:.3f}"
        for name in runs
        for a, b in [steps[-2:]]
        if a in runs[name] and b in runs[name]
    )
    return [
        "## What more compute would buy",
        "",
        "Validation loss (nats/token, the corpus's validation split) at each evaluation of the two "
        "training runs, against training compute (6 x weights x tokens). Each run is one "
        f"schedule ({options.get('schedule', 'cosine')}), so this shows how fast the model was still "
        f"learning, not a scaling law: over the last {steps[-1] - steps[-2]} steps, as the learning rate "
        f"decayed, the loss still fell by {drops} nats.",
        "",
        *history(work),
        "| step | tokens (M) | PFLOP | skipless (with norms) | standard |",
        "|---|---|---|---|---|",
        *rows,
    ]


def history(work) -> list:
    """WORK/history.md, the builder's account of how the runs were made where that differs from
    the commands listed (a run extended from its stable checkpoint, data-parallel processes), as
    card lines; none if absent."""
    path = work / "history.md"
    return [path.read_text().rstrip(), ""] if path.exists() else []


def price_table(price, command) -> str:
    return pricing.markdown(price, command.removesuffix(" --json")).rstrip()


def main():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--work", default="demo-work", help="scratch directory (default: demo-work)")
    p.add_argument(
        "--size",
        default="flagship",
        help="the size of zoo/recipes/skipless-python.toml to build, in WORK/SIZE (default: flagship)",
    )
    p.add_argument(
        "--corpus",
        default=str(DEFAULT_CORPUS),
        help=f"the corpus directory, built if missing (default: {DEFAULT_CORPUS})",
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also train the same model with residuals and pre-norms (the price of skiplessness)",
    )
    p.add_argument("--ship", action="store_true", help="make the result the packaged demo")
    o = p.parse_args()
    try:
        zoo.sized(RECIPE, o.size)
    except KeyError as e:
        p.error(e.args[0])
    code = cli.guarded(
        lambda: build_size(
            o.size, Path(o.work).resolve() / o.size, Path(o.corpus).expanduser().resolve(), o.baseline, o.ship
        )
    )
    if code not in (0, 130, 141):
        print("run the same command again to continue", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
