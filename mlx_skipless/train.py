"""python -m mlx_skipless.train: train any skipless model form in MLX.

AdamW with linear warm-up and cosine decay, gradient clipping, validation loss,
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
validation loss (4.50 against 4.56; README, "Training recipe at scale").

Why wider and deeper stacks need a smaller step for their block matrices.
With every matrix at lr 1e-3, a d 256 x 4 skipless model learns but
d 512 x 8 stays at the corpus's unigram entropy (5.9 nats: token frequencies
only). `scripts/signal_propagation.py` logs, per layer, the output RMS and the
mean cosine between the positions of a sequence (1: every token maps to the same
vector, rank collapse) and the attention entropy. At initialisation both shapes
are healthy in every layer (cosine 0.02-0.03, entropy 0.999 of uniform, RMS
0.6): the initialisation is not the cause. The first steps are. Adam moves each
weight by about lr per step whatever the width, so a block's output moves in
proportion to lr x width, and without a residual path each layer's change
compounds through every layer above it; the early gradient is dominated by the
direction every position shares (token frequencies), so the stack grows a common
component layer by layer until it swamps the token-specific signal. Measured
(`scripts/signal_propagation.py --size 256x8 --steps 20`, 16 x 128 tokens of the
standard library, 1,024-token BPE, OpenBLAS preloaded), d 256 x 8 after 20 steps
at a flat lr 1e-3 (`--block-lr-scale 1`): cosine 0.05-0.89 in layers 0-6 and
0.996 in the last, last-layer RMS 23.5, attention entropy down to 0.50, val loss
6.02 (unigram 5.92): depth alone suffices. d 512 x 8 collapses faster (cosine
0.998-1.00 in layers 4-7 and entropy 0.16-0.33 by step 10, val loss rising from
6.69 at step 5 to 7.05 at step 10). The fix, a default: the matrices inside the
blocks train at lr x hidden_lr_scale(args) = lr x min(1, 256 / d) x
min(1, 4 / layers) (muP's 1/width for hidden matrices under Adam, and 1/depth
for a stack without skips); embeddings, head and norm gains keep lr, and up to
d 256 x 4 nothing changes. d 256 x 8 then keeps cosine 0.03-0.14 in layers 0-6
(0.49 in the last), entropy >= 0.985, and reaches val loss 5.41 at step 20
(README, "Training recipe at scale").
"""

import argparse
import contextlib
import json
import math
import sys
import time
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
from .loss import cross_entropy, evaluate
from .checkpoint import CheckpointError, OutputDir
from .models.skipless import Model, ModelArgs

# flags a resumed run takes from its recorded options unless given again
RECORDED = ("steps", "batch_size", "context", "lr", "warmup", "weight_decay", "clip", "orthogonality",
            "seed", "eval_every", "save_every", "data", "val_fraction", "optimizer", "muon_lr", "schedule",
            "cooldown")
NEW_RUN_ONLY = ("config", "tokenizer", "vocab_size", "q_init_scale")
DEFAULTS = {}  # of those options, filled by build_parser
BASE_WIDTH, BASE_DEPTH = 256, 4  # the largest shape the unscaled learning rate trains


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
            w = rng.standard_normal(shape)
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


def hidden_lr_scale(args: ModelArgs) -> float:
    """The learning rate of the matrices inside the blocks, relative to `lr`: a model
    wider or deeper than BASE_WIDTH x BASE_DEPTH steps its block matrices by less
    (μP-style, lr ∝ 1/width, and ∝ 1/depth for a stack without skips, where every
    layer's change compounds through all the layers above it; a residual stack adds
    each layer's change instead). See the module docstring."""
    depth = 1.0 if args.residual else min(1.0, BASE_DEPTH / args.num_hidden_layers)
    return min(1.0, BASE_WIDTH / args.hidden_size) * depth


def is_hidden(path: str, w: mx.array) -> bool:
    return path.startswith(names.BLOCKS) and w.ndim >= 2


OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")


def make_optimizer(lr: float, scale: float, steps: int, warmup: int, weight_decay: float,
                   kind: str = "adamw", muon_lr: float = 0.02, shape: str = "cosine", cooldown: float = 0.2):
    """AdamW, the block matrices at lr · scale; or Muon for the block matrices (at
    muon_lr · scale) with AdamW for embeddings, head and the 1-D gains, which
    Muon's orthogonalized update does not suit."""
    rate = lambda r: schedule(r, steps, warmup, shape, cooldown)
    adamw = lambda r: optim.AdamW(rate(r), weight_decay=weight_decay)
    if kind == "muon":
        # Muon's update has unit spectral norm whatever the width; weight decay through
        # its coupled L2 term would be orthogonalized away, so it has none.
        return optim.MultiOptimizer([optim.Muon(rate(muon_lr * scale), weight_decay=0.0), adamw(lr)],
                                    [is_hidden])
    if scale == 1.0:
        return adamw(lr)
    return optim.MultiOptimizer([adamw(lr * scale), adamw(lr)], [is_hidden])


def cooldown_start(steps: int, cooldown: float) -> int:
    """The first step of a warmup-stable-decay run's cooldown."""
    return steps - max(1, round(cooldown * steps))


def schedule(lr: float, steps: int, warmup: int, shape: str = "cosine", cooldown: float = 0.2):
    """Linear warm-up, then cosine decay to lr/10; or ("wsd") a constant rate and a
    1 − sqrt cooldown to zero over the last `cooldown` of the steps (Hägele et al.
    2024): as good as cosine, and a run saved before its cooldown can be extended
    to more steps without starting over."""
    warmup = max(warmup, 1)
    warm = optim.linear_schedule(lr / warmup, lr, warmup)
    if shape == "cosine":
        decay = optim.cosine_decay(lr, max(steps - warmup, 1), end=lr / 10)
        return optim.join_schedules([warm, decay], [warmup])
    start = max(cooldown_start(steps, cooldown), warmup)
    length = max(steps - start, 1)

    def stable_then_cool(step):  # join_schedules counts its steps from the warm-up's end
        # the optimizer's step is unsigned: subtract in floating point, or it wraps around
        done = mx.clip((step.astype(mx.float32) + warmup - start) / length, 0.0, 1.0)
        return lr * (1 - mx.sqrt(done))

    return optim.join_schedules([warm, stable_then_cool], [warmup])


class TrainingDiverged(ValueError):
    """The loss stopped being a number: nothing more is saved."""


def check_finite(model: Model, step: int, out: Path, last_saved: int):
    bad = [name for name, w in tree_flatten(model.parameters()) if not mx.isfinite(w).all().item()]
    if bad:
        raise TrainingDiverged(f"{bad[0]} holds non-finite values at step {step}: training diverged; "
                               f"{out} keeps its last good save (step {last_saved})")


def save(target: OutputDir, model: Model, args: ModelArgs, tok, optimizer, state: dict):
    """A new version of the claimed output, atomically: a crash never leaves a half-written one."""
    with target.stage() as tmp:
        record = {"step": state["step"], "options": state.get("options", {})}
        modeldir.save(tmp, model, args, "train", tok, record=record, training=state, optimizer=optimizer)


def train(model, args, tok, corpus, out: Path, steps: int, batch_size: int = 16, context: int = 128,
          lr: float = 1e-3, warmup: float = 0.05, weight_decay: float = 0.1, clip: float = 1.0,
          ortho: float = 0.0, eval_every: int = 200, save_every: int = 500, seed: int = 0,
          state: dict = None, optimizer_state=None, progress: bool = True, log=print,
          stop_at: int = None, record: dict = None, probe=None, block_lr_scale: float = None,
          optimizer: str = "adamw", muon_lr: float = 0.02, schedule_shape: str = "cosine",
          cooldown: float = 0.2, stable_path: Path = None) -> dict:
    """Train to `steps` (from state["step"] when resuming) and return the trainer state.
    `stop_at` ends the run early, as an interruption would, schedule unchanged.
    `out` is claimed for the run; it may exist only when resuming. `record`: more
    options to keep with the run (the data it was trained on).
    `block_lr_scale` defaults to hidden_lr_scale(args).
    `probe(model)`, when given, returns a dict that joins each validation entry
    (e.g. the per-layer signal propagation of mlx_skipless.diagnostics).
    `schedule_shape` "wsd" with `stable_path`: the run as it stands at the last
    constant-rate step is also saved there, a run that `--resume` with more
    `--steps` extends. A non-finite loss stops the run before it saves, so the last
    save stays the last good one."""
    state = state or {"step": 0, "history": []}
    if block_lr_scale is None:  # a resumed run keeps the scale it started with
        block_lr_scale = state.get("options", {}).get("block_lr_scale", hidden_lr_scale(args))
    # the warm-up's length is fixed when a run starts: extending it to more steps moves
    # only the cooldown
    warmup_steps = state.get("options", {}).get("warmup_steps", int(warmup * steps))
    opts = dict(steps=steps, batch_size=batch_size, context=context, lr=lr, warmup=warmup,
                weight_decay=weight_decay, clip=clip, orthogonality=ortho, seed=seed,
                eval_every=eval_every, save_every=save_every, block_lr_scale=block_lr_scale,
                optimizer=optimizer, muon_lr=muon_lr, schedule=schedule_shape, cooldown=cooldown,
                warmup_steps=warmup_steps)
    state["options"] = {**state.get("options", {}), **opts, **(record or {})}
    stable_step = cooldown_start(steps, cooldown) if schedule_shape == "wsd" and stable_path else None
    opt = make_optimizer(lr, block_lr_scale, steps, warmup_steps, weight_decay, optimizer, muon_lr,
                         schedule_shape, cooldown)
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
                    "and --resume")
            state["step"] += 1
            losses.append(ce.item())
            tokens += x.size
            if bar:
                bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
                bar.update(1)
            last = state["step"] == steps
            if lead and (state["step"] % eval_every == 0 or last):
                entry = {"step": state["step"], "train_loss": float(np.mean(losses)),
                         "val_loss": evaluate(model, corpus, context), **(probe(model) if probe else {})}
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
                log(f"[INFO] the last constant-rate step, {stable_step}, saved to {stable_path}: "
                    "resume it with more --steps to extend the run")
    if bar:
        bar.close()
    final = state["history"][-1]["val_loss"] if state["history"] else None
    if lead and final is not None and final > math.log(args.vocab_size):
        log(f"[WARNING] validation loss {final:.3f} is worse than guessing every token uniformly "
            f"(ln {args.vocab_size} = {math.log(args.vocab_size):.3f}): this run did not learn; try a lower --lr")
    return state


def matmul_rate() -> float:
    """MLX's float32 matmul rate here, GFLOP/s, from a few 512-wide products (~0.1 s at worst)."""
    a = mx.random.normal((512, 512))
    mx.eval(a @ a)
    start = time.perf_counter()
    for _ in range(4):
        mx.eval(a @ a)
    return 4 * 2 * 512**3 / (time.perf_counter() - start) / 1e9


def warn_if_slow(log=print):
    """Linux's mlx[cpu] wheel multiplies through a reference BLAS, tens of times slower than
    an optimized one: say so in one line before hours of training."""
    if mx.default_device() != mx.cpu:
        return
    rate = matmul_rate()
    if rate < 10:
        log(f"[WARNING] MLX multiplies at {rate:.1f} GFLOP/s on this CPU, too slow to train: on Linux, "
            "install OpenBLAS (apt-get install libopenblas0-pthread) and run with "
            "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")


def build_parser():
    p = argparse.ArgumentParser(prog="mlx-skipless train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="model config: JSON or TOML with ModelArgs (HF) names")
    p.add_argument("--data", nargs="+", default=["stdlib"],
                   help="text files or folders; 'stdlib' is this Python's standard library")
    cli.add_output_arg(p, "checkpoint directory", required=True)
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --mlx-path")
    p.add_argument("--tokenizer", help="an existing tokenizer.json (default: train byte-level BPE)")
    p.add_argument("--vocab-size", type=int, default=1024, help="for a trained tokenizer")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="adamw for every weight, or muon for the block matrices (AdamW for the rest)")
    p.add_argument("--muon-lr", type=float, default=0.02, help="Muon's learning rate (--optimizer muon)")
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="after the warm-up: cosine decay to lr/10, or wsd: constant, then a 1-sqrt cooldown")
    p.add_argument("--cooldown", type=float, default=0.2, help="wsd: fraction of the steps that cool down")
    p.add_argument("--stable-path",
                   help="wsd: also save the run at its last constant-rate step here, to extend it later")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--q-init-scale", type=float, default=0.1,
                   help="scale of the orthogonal initial Q (small: attention starts uniform)")
    p.add_argument("--orthogonality", type=float, default=1.0,
                   help="penalty weight keeping square Q/K/V near-orthogonal (well-conditioned)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    return _unset_defaults(p)


def _unset_defaults(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Parse the options a resumed run takes from its record to None when not given
    (their defaults wait in DEFAULTS), so that what was given can be told apart."""
    for action in p._actions:
        if action.dest in RECORDED + NEW_RUN_ONLY and action.default is not None:
            DEFAULTS[action.dest] = action.default
            action.help = (action.help + "; " if action.help else "") + f"default {action.default}" + (
                ", or the run's own with --resume" if action.dest in RECORDED else "")
            action.default = None
    return p


def settle_options(o, recorded: Optional[dict] = None, log=print):
    """Fill the options not given: from the run's record when resuming (`recorded`),
    else the defaults. Options given again on resuming override; one line says which."""
    changed, ignored = [], []
    for key in RECORDED + NEW_RUN_ONLY:
        value = getattr(o, key)
        if recorded is not None and key in NEW_RUN_ONLY and value is not None:
            ignored.append("--" + key.replace("_", "-"))
        if value is None:
            setattr(o, key, recorded[key] if recorded and key in recorded else DEFAULTS.get(key))
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
            raise ValueError(f"--context {o.context} exceeds the model's {args.max_position_embeddings} "
                             "learned positions")
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
            tok = data.load_tokenizer(o.tokenizer)
        else:  # the config's vocabulary size, unless --vocab-size says otherwise
            vocab = given_vocab or fields.get("vocab_size") or o.vocab_size
            tok = data.cached_tokenizer(data.find_files(o.data), vocab)
        fields.update(vocab_size=tok.get_vocab_size(), max_position_embeddings=o.context)
        args = ModelArgs(**fields)
        model = Model(args)
        initialize(model, o.seed, o.q_init_scale)
        state = None
    corpus = data.Corpus.build(o.data, tok, o.val_fraction)
    warn_if_slow()
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"[INFO] {n:,} parameters; {len(corpus.train):,} training and {len(corpus.val):,} "
          f"validation tokens from {corpus.files} files")
    state = train(model, args, tok, corpus, out, o.steps, o.batch_size, o.context, o.lr, o.warmup,
                  o.weight_decay, o.clip, o.orthogonality, o.eval_every, o.save_every, o.seed,
                  state, optimizer_state, record=dict(data=o.data, val_fraction=o.val_fraction),
                  optimizer=o.optimizer, muon_lr=o.muon_lr, schedule_shape=o.schedule, cooldown=o.cooldown,
                  stable_path=Path(o.stable_path) if o.stable_path else None)
    print(f"[INFO] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
