"""python -m mlx_skipless.normfree: remove the norms inside a skipless model's blocks.

Heimersheim (2024) and Baroni et al. (2025), for skipless blocks: one norm at a
time, FFN-input norms first and then attention-input norms, each norm's live
scale is replaced by its average over data and the model is fine-tuned for a
few steps; the frozen norms then fold exactly into the layers they feed. The
final norm, before the head, stays: it does not stand between two blocks.
"""

import argparse
import sys
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from . import cli, data, modeldir, names
from .hub import recorded_name
from .loss import cross_entropy, validation_loss
from .models.skipless import Model, ModelArgs
from .names import EMBED, FFN_INPUTS, FFN_NORM, FFN_OUTPUTS, HEAD, INPUT_NORM
from .norms import FixedNorm, ScaleRecorder, center_output, fold
from .output_dir import OutputDir

WARMUP_STEPS = 20


def schedule(args: ModelArgs):
    """(layer, norm) in removal order: FFN inputs first, then attention inputs."""
    serial = [] if args.parallel_block else [(i, FFN_NORM) for i in range(args.num_hidden_layers)]
    return serial + [(i, INPUT_NORM) for i in range(args.num_hidden_layers)]


def consumers(args: ModelArgs, i: int, norm: str, params: dict):
    """The linear layers (paths relative to block i) that read the norm's output."""
    attention = list(names.ATTN_IN)
    if norm == INPUT_NORM:
        missing = [p for p in attention if f"{p}.weight" not in params]
        if missing:
            raise ValueError(
                f"layer {i}: the input norm feeds the removed {missing[0]}; normfree needs a model with Q, K and V"
            )
        paths = attention + (list(FFN_INPUTS) if args.parallel_block else [])
    else:
        paths = list(FFN_INPUTS)
    return [p for p in paths if f"{p}.weight" in params]


def producers(args: ModelArgs, i: int, norm: str, flat: dict):
    """(tensor name, feature axis) of everything that writes the norm's input."""
    if norm == FFN_NORM:
        paths = [names.block_key(i, names.ATTN_OUT)]
    elif i == 0:
        return [(k, -1) for k in (EMBED, names.POSITIONS) if k in flat]
    else:
        prev = names.block_key(i - 1)
        paths = [prev + p for p in FFN_OUTPUTS] + ([prev + names.ATTN_OUT] if args.parallel_block else [])
    if names.block_key(i, names.ATTN_OUT + ".weight") not in flat and norm == FFN_NORM:
        raise ValueError(f"layer {i}: the FFN norm's input has no P to centre")
    return [
        (f"{p}.{kind}", -2 if kind == "weight" else -1)
        for p in paths
        for kind in ("weight", "bias")
        if f"{p}.{kind}" in flat
    ]


def finetune(model, corpus, optimizer, steps, start, batch_size, context, seed, desc=None):
    """`steps` fine-tuning steps from `start`; with `desc`, a progress bar (on stderr) so that a
    long stretch is never silent."""
    from tqdm import tqdm

    loss_and_grad = nn.value_and_grad(model, cross_entropy)
    with tqdm(
        total=steps, desc=desc, unit="step", disable=desc is None or not steps, file=sys.stderr, leave=False
    ) as bar:
        for step in range(start, start + steps):
            x, y = corpus.batch(step, batch_size, context, seed)
            loss, grads = loss_and_grad(model, mx.array(x), mx.array(y))
            grads, _ = optim.clip_grad_norm(grads, 1.0)
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state, loss)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    return start + steps


def freeze_norm(model, corpus, i, name, batches, batch_size, context):
    """Replace a live norm by a FixedNorm with its average scale on calibration data."""
    block = model.layers[i]
    recorder = ScaleRecorder(block[name])
    block[name] = recorder
    for x, _ in corpus.validation(batches, batch_size, context):  # held-out text
        mx.eval(model(mx.array(x)))
    block[name] = FixedNorm(recorder.norm, recorder.scale)
    return recorder.scale


def fold_norms(model: Model, args: ModelArgs):
    """(model without block norms, its args): every FixedNorm folded into its consumers.

    A LayerNorm's centring folds into what produces its input: for the first
    block, the embedding. A tied head reads that embedding too, so it is untied
    first and keeps the embedding as it was; folding is then exact."""
    flat = {k: np.array(v, np.float64) for k, v in tree_flatten(model.parameters())}
    needs_bias = {"attention": False, "mlp": False}
    for i, block in enumerate(model.layers):
        pre = names.block_key(i)
        params = {k.removeprefix(pre): v for k, v in flat.items() if k.startswith(pre)}
        for name in names.BLOCK_NORMS:
            if name not in block:
                continue
            norm = block[name]
            if not isinstance(norm, FixedNorm):
                raise ValueError(f"layer {i}: {name} is still live")
            gain = flat.pop(f"{pre}{name}.weight")
            beta = flat.pop(f"{pre}{name}.bias", None)
            if norm.centered:
                for key, axis in producers(args, i, name, flat):
                    if key == EMBED and args.tie_word_embeddings and HEAD not in flat:
                        flat[HEAD] = flat[key]  # the head reads the embedding as it was: untie
                    flat[key] = center_output(flat[key], axis)
            for path in consumers(args, i, name, params):
                W, c = fold(flat[f"{pre}{path}.weight"], flat.get(f"{pre}{path}.bias"), gain, beta, norm.scale)
                flat[f"{pre}{path}.weight"] = W
                if c is not None:
                    flat[f"{pre}{path}.bias"] = c
                    needs_bias["attention" if names.is_attention(path) else "mlp"] = True
    new_args = replace(
        args,
        block_norm=None,
        tie_word_embeddings=args.tie_word_embeddings and HEAD not in flat,
        attention_bias=args.attention_bias or needs_bias["attention"],
        mlp_bias=args.mlp_bias or needs_bias["mlp"],
    )
    folded = Model(new_args)
    # Projections that gained no bias of their own get zeros where the config now has biases.
    full = {k: np.zeros(v.shape) for k, v in tree_flatten(folded.parameters())}
    full.update({k: v for k, v in flat.items() if k in full})
    folded.load_weights([(k, mx.array(v.astype(np.float32))) for k, v in full.items()])
    mx.eval(folded.parameters())
    return folded, new_args


def check_removable(args):
    if not args.block_norm:
        raise ValueError("this model has no norms inside its blocks")
    if args.residual:
        raise ValueError(
            "this model keeps residual adds: without its norms it still could not fuse (no "
            "matrix moves across a residual add), so normfree, which readies skipless models "
            "for fusion, does not apply; mlx_skipless.convert stores it as it is"
        )


def remove_norms(
    model,
    args,
    corpus,
    steps_per_norm=20,
    final_steps=200,
    lr=2e-4,
    batch_size=16,
    context=128,
    calibration_batches=4,
    seed=1,
    log=print,
    eval_batches=8,
) -> tuple:
    """(norm-free model, its args, report): the whole recipe, with measured losses."""

    def score(m):  # the same fixed validation windows for every stage
        return validation_loss(m, corpus, context, batches=eval_batches)

    check_removable(args)
    report = {"val_loss_with_norms": score(model), "stages": []}
    log(f"[normfree] validation loss with norms: {report['val_loss_with_norms']:.4f}")
    # A fresh Adam's first steps are full-size: warm up, or they undo the training. The final
    # steps anneal to zero, as training did, so the model is not left where a large step put it.
    warmup = optim.linear_schedule(lr / 20, lr, WARMUP_STEPS)
    stages = steps_per_norm * len(schedule(args))
    anneal = optim.linear_schedule(lr, 0.0, max(final_steps, 1))
    optimizer = optim.AdamW(
        optim.join_schedules([warmup, lambda _: lr, anneal], [WARMUP_STEPS, max(stages, WARMUP_STEPS)]),
        weight_decay=0.0,
    )
    step = 0
    for i, name in schedule(args):
        scale = freeze_norm(model, corpus, i, name, calibration_batches, batch_size, context)
        frozen = score(model)
        step = finetune(
            model, corpus, optimizer, steps_per_norm, step, batch_size, context, seed, desc=f"layer {i} {name}"
        )
        stage = {
            "layer": i,
            "norm": name,
            "scale": scale,
            "val_loss_frozen": frozen,
            "val_loss_finetuned": score(model) if steps_per_norm else frozen,
        }
        report["stages"].append(stage)
        log(
            f"[normfree] layer {i} {name}: scale {scale:.3g}, loss {frozen:.4f} frozen, "
            f"{stage['val_loss_finetuned']:.4f} after {steps_per_norm} steps"
        )
    log(f"[normfree] every norm frozen: {final_steps} final fine-tuning steps")
    step = finetune(model, corpus, optimizer, final_steps, step, batch_size, context, seed, desc="final steps")
    report["val_loss_fixed_norms"] = score(model)
    folded, new_args = fold_norms(model, args)
    report["val_loss_norm_free"] = score(folded)
    report["finetune_steps"] = step
    report["options"] = dict(
        steps_per_norm=steps_per_norm,
        final_steps=final_steps,
        lr=lr,
        batch_size=batch_size,
        context=context,
        calibration_batches=calibration_batches,
        eval_batches=eval_batches,
        seed=seed,
    )
    log(
        f"[normfree] validation loss: {report['val_loss_with_norms']:.4f} with norms, "
        f"{report['val_loss_norm_free']:.4f} norm-free (after folding)"
    )
    return folded, new_args, report


def build_parser():
    p = argparse.ArgumentParser(prog="mlx-skipless normfree", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a checkpoint written by mlx_skipless.train")
    p.add_argument(
        "--data",
        nargs="+",
        default=["stdlib"],
        help="text files or folders to fine-tune and calibrate on, or stdlib (default %(default)s)",
    )
    cli.add_output_arg(p, "output checkpoint directory", required=True)
    p.add_argument(
        "--steps-per-norm",
        type=int,
        default=20,
        help="fine-tuning steps after each norm is frozen (default %(default)s)",
    )
    p.add_argument(
        "--final-steps",
        type=int,
        default=200,
        help="fine-tuning steps once every norm is frozen, the rate annealing to zero (default %(default)s)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=2e-4,
        help=f"peak learning rate of the fine-tuning (AdamW, after a {WARMUP_STEPS}-step warm-up; default %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="sequences a fine-tuning and a calibration step (default %(default)s)",
    )
    p.add_argument(
        "--calibration-batches",
        type=int,
        default=4,
        help="held-out batches a norm's average scale is measured on before it is frozen (default %(default)s)",
    )
    p.add_argument(
        "--eval-batches",
        type=int,
        default=8,
        help="validation batches of 16 windows behind each reported loss (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the fine-tuning's data windows (default %(default)s)")
    p.add_argument(
        "--force", action="store_true", help="replace --mlx-path if it is empty or holds a model mlx-skipless wrote"
    )
    return p


@cli.command(build_parser)
def main(o):
    output = OutputDir(o.mlx_path, o.force, inputs=[o.model])
    output.check()  # before the work, not only after it
    model, args, tok, state = modeldir.read(o.model)
    check_removable(args)  # before the corpus is read: tokenizing it can take minutes
    if tok is None:
        raise ValueError(f"{o.model} has no tokenizer.json to read the --data with")
    context = state.get("options", {}).get("context", args.max_position_embeddings)
    corpus = data.TokenStreams.build(o.data, tok)
    folded, new_args, report = remove_norms(
        model,
        args,
        corpus,
        o.steps_per_norm,
        o.final_steps,
        o.lr,
        o.batch_size,
        context,
        o.calibration_batches,
        o.seed,
        eval_batches=o.eval_batches,
    )
    report["source"] = recorded_name(o.model)
    report["trained"] = state  # the run it came from: options, steps, losses
    with output, output.stage() as staging:
        modeldir.save(staging, folded, new_args, "normfree", tok, record=report)
    print(f"[INFO] wrote {o.mlx_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
