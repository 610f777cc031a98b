"""python -m mlx_skipless.train: train any skipless model form in MLX.

Muon for the block matrices and AdamW for the rest (or AdamW throughout), warm-up then
a constant rate and a short cooldown (or cosine decay), gradient clipping, validation loss,
checkpoints in the project's format (HF-style config.json + safetensors +
tokenizer) that `--resume` continues bit for bit: data windows are a function of
the step, and the optimizer state and options are saved in training/, beside the
weights but where no model loader reads them. A resumed run keeps its recorded
options; a flag given again overrides its option, and the log says so.

What makes a skipless stack train (He & Hofmann 2023; He et al. 2023): square
projections start orthogonal, so every block starts close to an isometry and
signal neither dies nor explodes without residuals; a small orthogonal Q
(`--q-init-scale 0.1`) starts shaped attention near the identity; the
`--orthogonality` penalty pulls the square Q/K/V a later conversion inverts
towards orthogonal. Its default is 1: at 0.01 (the demo's, which ended at
condition numbers 1.9-3.9 after 2,000 steps) a d 256 x 4 model after 100 steps
had a Q with condition number 3,406 (d 512 x 8: square Q/K/V up to 12,500
at step 100), too
ill-conditioned to invert in bfloat16; at 1 it had 1.5-4.7, and a lower
validation loss (4.50 against 4.56; docs/training.md, "Training recipe at scale").

The optimizer, its learning-rate schedule and why wider and deeper stacks step their
block matrices by less: optimizers.py.
"""

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Optional

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten

from . import cli, data, families, modeldir, names
from .diagnostics import warn_if_slow
from .errors import CheckpointError
from .loss import cross_entropy, validation_loss
from .models.skipless import Model, ModelArgs
from .optimizers import OPTIMIZERS, SCHEDULES, cooldown_start, hidden_lr_scale, make_optimizer
from .output_dir import OutputDir

# flags a resumed run takes from its recorded options unless given again
RECORDED = (
    "steps",
    "batch_size",
    "context",
    "lr",
    "warmup",
    "weight_decay",
    "clip",
    "orthogonality",
    "seed",
    "eval_every",
    "eval_batches",
    "save_every",
    "data",
    "val_fraction",
    "optimizer",
    "muon_lr",
    "schedule",
    "cooldown",
)
# what a run recorded before these options existed trained with (no record of them: the old way)
RECORDED_BEFORE = {"optimizer": "adamw", "schedule": "cosine"}
NEW_RUN_ONLY = ("config", "tokenizer", "vocab_size", "q_init_scale")


def read_model_config(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such model config")
    if not p.is_file():
        raise ValueError(f"{path} is not a regular file")
    try:
        config = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
    except ValueError as e:  # both parsers' errors are ValueErrors
        raise ValueError(f"{path}: not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {e}") from None
    config = config.get("model", config) if isinstance(config, dict) else config
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a model config is a JSON object (or TOML table) of ModelArgs fields")
    families.check_config(config, path)  # typed as the converter reads config.json: "false" is no boolean
    return families.model_fields(config)


def initialize(model: Model, seed: int, q_scale: float = 1.0):
    """Orthogonal square projections, 1/sqrt(fan-in) elsewhere, unit norm gains and
    attention shape. `q_scale` < 1 starts attention near uniform (shaped attention:
    near the identity) while Q stays invertible, unlike He & Hofmann's Q = 0."""
    rng = np.random.default_rng(seed)
    params = []
    for name, p in tree_flatten(model.parameters()):
        shape = p.shape
        if names.is_norm(name) or names.leaf(name) in names.SHAPED:
            w = np.ones(shape)
        elif name.endswith(".bias"):
            w = np.zeros(shape)
        elif name in (names.EMBED, names.POSITIONS):
            # A tied head reads the embedding back against a normalized (unit-variance) state:
            # unit-variance rows would start the logits at std sqrt(d), far from uniform, and a
            # short run never recovers. At 1/sqrt(d) the tied head starts where an untied one does.
            tied = model.args.tie_word_embeddings
            w = rng.standard_normal(shape) / (np.sqrt(shape[-1]) if tied else 1.0)
        elif len(shape) == 2 and shape[0] == shape[1]:
            w, _ = np.linalg.qr(rng.standard_normal(shape))
            w = w * (q_scale if name.endswith(names.Q + ".weight") else 1.0)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        params.append((name, mx.array(w.astype(np.float32))))
    model.load_weights(params)


def inverted_candidates(model: Model):
    """The square attention matrices a conversion may invert: none in a model with
    residual adds, which converts without fusing."""
    if model.args.residual:
        return
    for layer in model.layers:
        for name in map(names.projection, "qkv"):
            if name in layer.self_attn:
                w = layer.self_attn[name].weight
                if w.shape[0] == w.shape[1]:
                    yield w


def orthogonality(model: Model) -> mx.array:
    """Mean over square Q/K/V of ||W Wᵀ / mean(diag) − I||² / d: zero exactly when W
    is a scaled orthogonal matrix (condition number 1), and blind to scale."""
    terms = []
    for w in inverted_candidates(model):
        g = w @ w.T
        g = g / mx.mean(mx.diag(g))
        terms.append(mx.sum(mx.square(g - mx.eye(g.shape[0]))) / g.shape[0])
    return mx.mean(mx.stack(terms)) if terms else mx.array(0.0)


@dataclass
class TrainOptions:
    """How `train` trains: each field is a flag of `mlx-skipless train` under its dest
    name, and its default here is the flag's. A run records them (all but stable_path)
    in its state, so that `--resume` continues with the same ones."""

    steps: int = 2000
    batch_size: int = 16
    context: int = 128
    lr: float = 1e-3
    warmup: float = 0.05  # a fraction of the steps
    weight_decay: float = 0.1
    clip: float = 1.0
    orthogonality: float = 1.0
    seed: int = 0
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 500
    block_lr_scale: Optional[float] = None  # None: a resumed run's own, else hidden_lr_scale(args)
    optimizer: str = "muon"  # at the flagship shape 0.29 nats below AdamW at equal steps (docs/flagship-ab.md)
    muon_lr: float = 0.02
    schedule: str = "wsd"  # as good as cosine there, and extendable from its stable checkpoint
    cooldown: float = 0.2
    stable_path: Optional[Path] = None

    @classmethod
    def of(cls, namespace) -> "TrainOptions":
        """The options of a parsed command line (a field it has no flag for keeps its default)."""
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)})


# The rest of a run's command line (its text and the model it starts from), with the
# defaults its flags have.
SOURCE_DEFAULTS = {
    "data": ("stdlib",),
    "val_fraction": 0.05,
    "config": None,
    "tokenizer": None,
    "vocab_size": 1024,
    "q_init_scale": 0.1,
}


def default_of(dest: str):
    """The default of a flag that a resumed run may take from its record."""
    if dest in SOURCE_DEFAULTS:
        value = SOURCE_DEFAULTS[dest]
        return list(value) if isinstance(value, tuple) else value
    return getattr(TrainOptions(), dest)


class TrainingDiverged(ValueError):
    """The loss stopped being a number: nothing more is saved."""


def check_finite(model: Model, step: int, out: Path, last_saved: int):
    bad = [name for name, w in tree_flatten(model.parameters()) if not mx.isfinite(w).all().item()]
    if bad:
        raise TrainingDiverged(
            f"{bad[0]} holds non-finite values at step {step}: training diverged; "
            f"{out} keeps its last good save (step {last_saved})"
        )


def save(target: OutputDir, model: Model, args: ModelArgs, tok, optimizer, state: dict):
    """A new version of the claimed output, atomically: a crash never leaves a half-written one."""
    with target.stage() as tmp:
        record = {"step": state["step"], "options": state.get("options", {})}
        modeldir.save(tmp, model, args, "train", tok, record=record, training=state, optimizer=optimizer)


def train(
    model,
    args,
    tok,
    corpus,
    out: Path,
    options: TrainOptions,
    *,
    state: dict = None,
    optimizer_state=None,
    progress: bool = True,
    log=print,
    stop_at: int = None,
    record: dict = None,
    probe=None,
) -> dict:
    """Train to `options.steps` (from state["step"] when resuming) and return the trainer state.
    `stop_at` ends the run early, as an interruption would, schedule unchanged.
    `out` is claimed for the run; it may exist only when resuming. `record`: more
    options to keep with the run (the data it was trained on).
    `probe(model)`, when given, returns a dict that joins each validation entry
    (e.g. the per-layer signal propagation of mlx_skipless.diagnostics).
    `options.schedule` "wsd" with `options.stable_path`: the run as it stands at the last
    constant-rate step is also saved there, a run that `--resume` with more
    `--steps` extends. A non-finite loss stops the run before it saves, so the last
    save stays the last good one."""
    steps, batch_size, context, seed = options.steps, options.batch_size, options.context, options.seed
    ortho, clip, eval_every, save_every = options.orthogonality, options.clip, options.eval_every, options.save_every
    state = state or {"step": 0, "history": []}
    block_lr_scale = options.block_lr_scale
    if block_lr_scale is None:  # a resumed run keeps the scale it started with
        block_lr_scale = state.get("options", {}).get("block_lr_scale", hidden_lr_scale(args))
    # the warm-up's length is fixed when a run starts: extending it to more steps moves
    # only the cooldown
    warmup_steps = state.get("options", {}).get("warmup_steps", int(options.warmup * steps))
    opts = {f.name: getattr(options, f.name) for f in fields(options) if f.name != "stable_path"}
    opts.update(block_lr_scale=block_lr_scale, warmup_steps=warmup_steps)
    state["options"] = {**state.get("options", {}), **opts, **(record or {})}
    stable_path = Path(options.stable_path) if options.stable_path else None
    stable_step = cooldown_start(steps, options.cooldown) if options.schedule == "wsd" and stable_path else None
    opt = make_optimizer(
        options.lr,
        block_lr_scale,
        steps,
        warmup_steps,
        options.weight_decay,
        options.optimizer,
        options.muon_lr,
        options.schedule,
        options.cooldown,
    )
    if optimizer_state is not None:
        opt.state = optimizer_state

    def loss_fn(m, x, y):
        ce = cross_entropy(m, x, y)
        return ce + ortho * orthogonality(m) if ortho else ce, ce

    grad_fn = nn.value_and_grad(model, loss_fn)
    compiled = [model.state, opt.state, mx.random.state]
    # Data parallel (mlx.launch): each process takes its share of the global batch and the
    # gradients are averaged, so N processes take the steps one process would.
    group = mx.distributed.init()
    world, rank = group.size(), group.rank()
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} does not split over {world} processes")
    share = slice(rank * batch_size // world, (rank + 1) * batch_size // world)

    @partial(mx.compile, inputs=compiled, outputs=compiled)
    def step_fn(x, y):
        (_, ce), grads = grad_fn(model, x, y)
        if world > 1:
            grads = average_gradients(grads, group=group)
            ce = mx.distributed.all_sum(ce, group=group) / world
        grads, norm = optim.clip_grad_norm(grads, clip)
        opt.update(model, grads)
        return ce, norm

    lead = rank == 0  # the one process that writes and reports
    resuming = state["step"] > 0
    # held for the run: one writer at a time
    with OutputDir(out, force=resuming) if lead else contextlib.nullcontext() as target:
        bar = None
        if progress and lead:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=state["step"], desc="training", unit="step")
        tokens, t0, losses = 0, time.perf_counter(), []
        last_saved = state["step"]
        while state["step"] < min(steps, stop_at or steps):
            x, y = corpus.batch(state["step"], batch_size, context, seed)
            ce, _ = step_fn(mx.array(x[share]), mx.array(y[share]))
            mx.eval(compiled, ce)
            if not np.isfinite(ce.item()):
                raise TrainingDiverged(
                    f"the loss became {ce.item()} at step {state['step'] + 1}: training diverged; "
                    f"{out} keeps its last good save (step {last_saved}); lower --lr or --muon-lr "
                    "and --resume"
                )
            state["step"] += 1
            losses.append(ce.item())
            tokens += x.size
            if bar:
                bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
                bar.update(1)
            last = state["step"] == steps
            if lead and (state["step"] % eval_every == 0 or last):
                entry = {
                    "step": state["step"],
                    "train_loss": float(np.mean(losses)),
                    "val_loss": validation_loss(model, corpus, context, batches=options.eval_batches),
                    **(probe(model) if probe else {}),
                }
                state["history"].append(entry)
                losses = []
                log(f"[step {entry['step']}] train loss {entry['train_loss']:.4f}, val loss {entry['val_loss']:.4f}")
            saving = state["step"] % save_every == 0 or last
            if saving or state["step"] == stable_step:
                check_finite(model, state["step"], out, last_saved)  # every process: the same verdict
            if saving and lead:
                save(target, model, args, tok, opt, state)
            last_saved = state["step"] if saving else last_saved
            if state["step"] == stable_step and lead:
                with OutputDir(stable_path, force=True) as stable:
                    save(stable, model, args, tok, opt, state)
                log(
                    f"[INFO] the last constant-rate step, {stable_step}, saved to {stable_path}: "
                    "resume it with more --steps to extend the run"
                )
    if bar:
        bar.close()
    final = state["history"][-1]["val_loss"] if state["history"] else None
    if lead and final is not None and final > math.log(args.vocab_size):
        log(
            f"[WARNING] validation loss {final:.3f} is worse than guessing every token uniformly "
            f"(ln {args.vocab_size} = {math.log(args.vocab_size):.3f}): this run did not learn; try a lower --lr"
        )
    return state


def build_parser():
    p = argparse.ArgumentParser(prog="mlx-skipless train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="model config: JSON or TOML with ModelArgs (HF) names (required for a new run)")
    resumable(p, "--data", "text files or folders; 'stdlib' is this Python's standard library", nargs="+")
    cli.add_output_arg(p, "checkpoint directory", required=True)
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --mlx-path")
    p.add_argument("--tokenizer", help="an existing tokenizer.json (default: train byte-level BPE)")
    resumable(
        p,
        "--vocab-size",
        "vocabulary of the trained tokenizer (not given: the config's vocab_size if it names one)",
        type=int,
    )
    resumable(p, "--steps", "optimizer steps of the whole run", type=int)
    resumable(p, "--batch-size", "sequences a step", type=int)
    resumable(p, "--context", "tokens a sequence", type=int)
    resumable(
        p,
        "--lr",
        "peak learning rate (AdamW); the block matrices of a model wider than 256 or a "
        "skipless stack deeper than 4 layers take a smaller one",
        type=float,
    )
    resumable(p, "--warmup", "linear warm-up, as a fraction of the steps", type=float)
    resumable(p, "--weight-decay", "AdamW's decoupled weight decay", type=float)
    resumable(
        p,
        "--optimizer",
        "adamw for every weight, or muon for the block matrices (AdamW for the rest)",
        choices=OPTIMIZERS,
    )
    resumable(p, "--muon-lr", "Muon's learning rate (--optimizer muon)", type=float)
    resumable(
        p,
        "--schedule",
        "after the warm-up: cosine decay to lr/10, or wsd: constant, then a 1-sqrt cooldown",
        choices=SCHEDULES,
    )
    resumable(p, "--cooldown", "wsd: fraction of the steps that cool down", type=float)
    p.add_argument(
        "--stable-path",
        help="wsd: also save the run at its last constant-rate step here, to extend it later (default: not saved)",
    )
    resumable(p, "--clip", "gradient norm clipping", type=float)
    resumable(p, "--q-init-scale", "scale of the orthogonal initial Q (small: attention starts uniform)", type=float)
    resumable(
        p, "--orthogonality", "penalty weight keeping square Q/K/V near-orthogonal (well-conditioned)", type=float
    )
    resumable(p, "--val-fraction", "fraction of the files held out for the validation loss", type=float)
    resumable(p, "--eval-every", "steps between validation losses", type=int)
    resumable(p, "--eval-batches", "batches of 16 held-out windows behind each validation loss", type=int)
    resumable(p, "--save-every", "steps between saves to --mlx-path", type=int)
    resumable(p, "--seed", "seed of the initial weights and of the data windows", type=int)
    return p


def resumable(p: argparse.ArgumentParser, flag: str, help: str, **kwargs):
    """A flag that parses to None when not given, so that a resumed run can tell a flag
    given again from one left to its record; settle_options fills in the rest, and the
    help names the default."""
    dest = flag[2:].replace("-", "_")
    note = f"default {default_of(dest)}" + (", or the run's own with --resume" if dest in RECORDED else "")
    p.add_argument(flag, default=None, help=f"{help}; {note}", **kwargs)


def settle_options(o, recorded: Optional[dict] = None, log=print):
    """Fill the options not given: from the run's record when resuming (`recorded`),
    else the defaults. Options given again on resuming override; one line says which."""
    if recorded is not None:  # a run older than an option trained with that option's first default
        recorded = {**RECORDED_BEFORE, **recorded}
    changed, ignored = [], []
    for key in RECORDED + NEW_RUN_ONLY:
        value = getattr(o, key)
        if recorded is not None and key in NEW_RUN_ONLY and value is not None:
            ignored.append("--" + key.replace("_", "-"))
        if value is None:
            setattr(o, key, recorded[key] if recorded and key in recorded else default_of(key))
        elif recorded and key in recorded and value != recorded[key]:
            changed.append(f"{key} {recorded[key]} -> {value}")
    if changed:
        log("[INFO] overriding the run's recorded settings: " + ", ".join(changed))
    if ignored:
        log(f"[INFO] ignored when resuming (the model already exists): {', '.join(ignored)}")


@cli.command(build_parser)
def main(o):
    out = Path(o.mlx_path)
    given_vocab = o.vocab_size  # None unless given: the config's size then wins over the default
    optimizer_state = None
    if o.resume:
        model, args, tok, state = modeldir.read(out)
        if not state:
            raise CheckpointError(f"{out} holds no training state to resume")
        optimizer_state = modeldir.read_optimizer_state(out)
        settle_options(o, state.get("options", {}))
        if args.position_embedding_type == "learned" and o.context > args.max_position_embeddings:
            raise ValueError(
                f"--context {o.context} exceeds the model's {args.max_position_embeddings} learned positions"
            )
        print(f"[INFO] resuming {out} at step {state['step']}")
    else:
        settle_options(o)
        if not o.config:
            raise ValueError("--config is required for a new run")
        if out.exists():
            raise ValueError(f"{out} exists; use --resume to continue it, or choose another --mlx-path")
        OutputDir(out).check()  # fail before training a tokenizer
        fields = read_model_config(o.config)
        if o.tokenizer:
            tok = data.read_tokenizer_json(o.tokenizer)
        else:  # the config's vocabulary size, unless --vocab-size says otherwise
            vocab = given_vocab or fields.get("vocab_size") or o.vocab_size
            tok = data.cached_tokenizer(data.find_files(o.data), vocab)
        fields.update(vocab_size=tok.get_vocab_size(), max_position_embeddings=o.context)
        args = ModelArgs(**fields)
        model = Model(args)
        initialize(model, o.seed, o.q_init_scale)
        state = None
    corpus = data.TokenStreams.build(o.data, tok, o.val_fraction)
    warn_if_slow()
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(
        f"[INFO] {n:,} parameters; {len(corpus.train):,} training and {len(corpus.val):,} "
        f"validation tokens from {corpus.files} files"
    )
    state = train(
        model,
        args,
        tok,
        corpus,
        out,
        TrainOptions.of(o),
        state=state,
        optimizer_state=optimizer_state,
        record=dict(data=o.data, val_fraction=o.val_fraction),
    )
    print(f"[INFO] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
