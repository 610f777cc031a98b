"""Recipe levers at the flagship's shape, each at equal CPU time: held-out bits per byte.

Every variant changes one thing against the trainer's defaults at the packaged model's shape
(zoo/skipless-python.toml: d 256, 4 layers, shaped attention, pre-norms, a 2,048-token BPE,
Muon + wsd). Its seconds per step are measured first (a few compiled steps, on this machine,
under the load it will train under); it then trains for as many steps as fit in --minutes, and
`evaluate` scores the corpus's held-out packages in bits per byte, a measure that compares
models whatever their tokenizers (a validation loss per token does not).

One process per core, each with its share of the variants, then one that writes the table:

    OPENBLAS_NUM_THREADS=1 python scripts/flagship_ab.py --variants defaults vocab-4k vocab-8k &
    OPENBLAS_NUM_THREADS=1 python scripts/flagship_ab.py --variants adamw-cosine d192x4 d384x4 &
    wait; python scripts/flagship_ab.py --markdown flagship-ab-work/table.md

The step timing is a prediction made under the load of its moment; the table also gives the
wall and CPU minutes each run then used, which are the figures to compare. Finished variants
are kept in --work (a rerun skips them); a run's directory stays there too.
"""

import argparse
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from mlx_skipless import data, train, zoo
from mlx_skipless.comparisons import dims
from mlx_skipless.manifest import TRAINER_STATE, TRAINING_DIR
from mlx_skipless.models.skipless import Model, ModelArgs
from mlx_skipless.pricing import describe_machine

REPO = Path(__file__).resolve().parents[1]
SHAPE = zoo.models()["skipless-python"]["model"]


# name: (what changes, config fields, train flags)
VARIANTS = {
    "defaults": ("today's defaults (Muon + wsd, 2,048-token BPE, d 256 x 4)", {}, []),
    "adamw-cosine": ("AdamW for every weight, cosine schedule", {}, ["--optimizer", "adamw", "--schedule", "cosine"]),
    "vocab-4k": ("4,096-token BPE", {"vocab_size": 4096}, []),
    "vocab-8k": ("8,192-token BPE", {"vocab_size": 8192}, []),
    "d192x4": ("narrower: d 192, 3 heads, FFN 576", dims("192x4"), []),
    "d384x4": ("wider: d 384, 6 heads, FFN 1152", dims("384x4"), []),
    "d256x2": ("shallower: 2 layers", dims("256x2"), []),
    "d256x6": ("deeper: 6 layers", dims("256x6"), []),
}


def train_argv(o, name: str, config: Path, steps: int, out: Path) -> list:
    _, fields, flags = VARIANTS[name]
    return [
        "mlx_skipless.train", "--config", config, "--data", *o.data, "--mlx-path", out,
        "--steps", steps, "--batch-size", o.batch_size, "--context", o.context,
        "--vocab-size", fields.get("vocab_size", SHAPE["vocab_size"]),
        "--eval-every", o.eval_every, "--save-every", steps, "--seed", o.seed, *flags,
    ]  # fmt: skip


def seconds_per_step(o, name: str, config: Path, probe: int = 10) -> float:
    """The time of `probe` more steps than a 2-step run takes, compile and start-up cancelling."""
    ns = train.build_parser().parse_args(map(str, train_argv(o, name, config, 10**6, Path("unused"))[1:]))
    train.settle_options(ns, log=lambda *_: None)
    fields = {**train.read_model_config(str(config)), "max_position_embeddings": o.context}
    tok = data.cached_tokenizer(data.find_files(o.data), fields["vocab_size"])
    corpus = data.TokenStreams.build(o.data, tok, ns.val_fraction)
    args = ModelArgs(**{**fields, "vocab_size": tok.get_vocab_size()})
    times = {}
    opts, silent = train.TrainOptions.of(ns), lambda *_: None
    with tempfile.TemporaryDirectory() as tmp:
        for stop in (2, 2 + probe):
            model = Model(args)
            train.initialize(model, o.seed, ns.q_init_scale)
            mx.eval(model.parameters())
            t0 = time.perf_counter()
            train.train(model, args, tok, corpus, Path(tmp) / str(stop), opts, stop_at=stop, progress=False, log=silent)
            times[stop] = time.perf_counter() - t0
    return (times[2 + probe] - times[2]) / probe


def run_variant(o, name: str) -> dict:
    result_path = o.work / f"{name}.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    o.work.mkdir(parents=True, exist_ok=True)
    config = o.work / f"{name}-config.json"
    config.write_text(json.dumps({**SHAPE, **VARIANTS[name][1]}, indent=2))
    sps = seconds_per_step(o, name, config)
    steps = max(10, int(o.minutes * 60 / sps))
    out = o.work / name
    argv = [sys.executable, "-m", *map(str, train_argv(o, name, config, steps, out))]
    print(f"[INFO] {name}: {sps:.2f} s a step -> {steps} steps\n$ " + shlex.join(argv[1:]), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, cwd=REPO)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    scored = subprocess.run(
        [sys.executable, "-m", "mlx_skipless.evaluate", "--model", str(out), "--data", *o.heldout, "--json"],
        check=True, cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    state = json.loads((out / TRAINING_DIR / TRAINER_STATE).read_text())
    result = {
        "variant": name,
        "seconds_per_step": sps,
        "steps": steps,
        "tokens": steps * o.batch_size * o.context,
        "train_wall_s": wall,
        "train_cpu_s": cpu,
        "val_loss": state["history"][-1]["val_loss"],
        "evaluate": json.loads(scored.stdout),
        "command": shlex.join(argv[1:]),
    }
    result_path.write_text(json.dumps(result, indent=2))
    return result


def markdown(o) -> str:
    rows = {n: json.loads((o.work / f"{n}.json").read_text()) for n in VARIANTS if (o.work / f"{n}.json").exists()}
    base = rows.get("defaults")
    lines = [
        "| variant | change | s a step | steps | tokens | training wall / CPU min | val loss (nats/token) "
        "| held-out bits per byte | vs defaults |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        bpb = r["evaluate"]["bits_per_byte"]
        delta = f"{bpb - base['evaluate']['bits_per_byte']:+.3f}" if base and name != "defaults" else ""
        lines.append(
            f"| {name} | {VARIANTS[name][0]} | {r['seconds_per_step']:.2f} | {r['steps']} | {r['tokens']:,} | "
            f"{r['train_wall_s'] / 60:.1f} / {r['train_cpu_s'] / 60:.1f} | {r['val_loss']:.3f} | {bpb:.3f} | {delta} |"
        )
    return "\n".join(lines) + f"\n\nMeasured on {describe_machine()}; each run's command is in {o.work}/VARIANT.json.\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=[])
    p.add_argument("--minutes", type=float, default=12.0, help="training time of each variant (default 12)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", nargs="+", default=["corpus"], help="training data (default: the Python corpus)")
    p.add_argument("--heldout", nargs="+", default=["corpus"], help="scored text (default: its held-out packages)")
    p.add_argument("--work", type=Path, default=Path("flagship-ab-work"))
    p.add_argument("--markdown", type=Path, help="write the table of every finished variant here")
    o = p.parse_args()
    for name in o.variants:
        r = run_variant(o, name)
        print(f"[INFO] {name}: {r['evaluate']['bits_per_byte']:.3f} bits per byte", flush=True)
    if o.markdown:
        o.markdown.write_text(markdown(o))
        print(f"[INFO] wrote {o.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
