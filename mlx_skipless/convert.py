"""python -m mlx_skipless.convert: fuse a skipless checkpoint into its reduced form.

Reads a Hugging Face skipless checkpoint block by block (each block once), fuses
(a matrix to invert is factored, and solved with, in float64; the other
products in float32 unless the output is float32, on the GPU of Apple silicon),
writes an mlx-lm model directory, and verifies the result as it goes: the
original and the converted model advance through the same probe tokens one
block at a time, their matrix products on numpy's BLAS, so peak memory stays
near two blocks plus the embeddings and verifying costs a fraction of fusing.

This module is the order of the steps and the CLI; each step lives in the
module named for it: planner (which matrix each layer loses), streaming (the
passes that fuse, store and verify), report, card (the model's README), upload.
"""

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from . import cli, counting, families, fusion, modeldir, planner, restore, verify
from .card import model_card
from .errors import CheckpointError
from .hub import TOKENIZER_FILES, copy_tokenizer, read_config, recorded_name, resolve
from .loading import SkiplessCheckpoint, check_quantization, check_tokenizer_fits, load_tokenizer
from .memory import keep_freed_memory
from .models.skipless import ModelArgs
from .output_dir import OutputDir
from .products import products_for
from .report import build_report, log_report
from .streaming import Passes
from .upload import upload

DEFAULT_SOURCE = Path(__file__).parent / "demo" / "skipless-python"


class DegradedError(cli.CommandError):
    """The converted model is clearly worse than the original stored the same way."""

    exit_code = 3


def convert(
    hf_path: Optional[str] = None,
    mlx_path: str = "mlx_model",
    remove: str = "auto",
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    q_mode: str = "affine",
    assume_skipless: bool = False,
    verify_output: bool = True,
    allow_degraded: bool = False,
    force: bool = False,
    upload_repo: Optional[str] = None,
    revision: Optional[str] = None,
    budget: Optional[verify.Budget] = None,
    probe_batch: int = verify.PROBE_BATCH,
    tokenizer: Optional[str] = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Convert and return the conversion report (also stored in the output's config.json).

    --remove auto plans per layer (planner.py): with verification on it measures
    each candidate plan against `budget` in the target dtype; without, it goes by
    the condition numbers alone."""
    out = Path(mlx_path)
    output = OutputDir(out, force)
    output.check()  # before any work; again with the input once it is known
    if remove not in ("auto", "q", "k", "v"):
        raise CheckpointError(f"--remove must be auto, q, k or v, not {remove!r}")
    source = str(hf_path or DEFAULT_SOURCE)
    path = resolve(source, revision)
    config = read_config(path)
    ckpt = None if restore.has_nothing_to_fuse(config) else SkiplessCheckpoint(str(path), None, assume_skipless)
    args = ckpt.args if ckpt else ModelArgs(**families.model_fields(config))
    # The tokenizer must load before any work, or the output could convert and then not generate.
    tokenizer = Path(tokenizer) if tokenizer else path
    loaded = load_tokenizer(tokenizer)  # it loads, or the error names the bad file
    if loaded is None:
        raise CheckpointError(
            f"{tokenizer} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): "
            "the converted model could not generate; pass --tokenizer DIR to ship one"
        )
    check_tokenizer_fits(loaded, args.vocab_size, tokenizer)
    if quantize:
        check_quantization(args, q_group_size, q_bits)
    dtype = dtype or (ckpt.dtype() if ckpt else config.get("torch_dtype", "float32"))
    if dtype not in verify.DTYPES:
        raise CheckpointError(f"--dtype must be one of {sorted(verify.DTYPES)}, not {dtype!r}")
    quant = {"group_size": q_group_size, "bits": q_bits, "mode": q_mode} if quantize else None
    if ckpt is None:
        report = restore.restore(
            recorded_name(source),
            path,
            output,
            dtype,
            quant,
            tokenizer,
            probe_batch,
            verify_output,
            upload_repo or str(out),
            log,
        )
        log(f"[INFO] wrote {out}")
        if upload_repo:
            upload(out, upload_repo)
        return report
    budget = budget or verify.Budget()
    mode = "" if q_mode == "affine" else f" {q_mode}"
    stored_as = dtype + (f", {q_bits}-bit{mode} (group {q_group_size})" if quant else "")
    log(
        f"[INFO] {source}: {ckpt.family}, {args.num_hidden_layers} layers, d={args.hidden_size}, "
        f"{'parallel' if args.parallel_block else 'serial'} blocks -> {stored_as}"
    )

    merge_p = "p" if fusion.merges_p(args) else ""
    tokens = verify.probe_tokens(args.vocab_size, probe_batch) if verify_output else None
    passes = Passes(ckpt, verify.DTYPES[dtype], quant, stored_as, tokens, progress, products_for(dtype, quant))
    unit = planner.storage_roundoff(dtype, q_bits if quant else None)
    plan = planner.first_plan(remove, merge_p, args.num_hidden_layers, unit, measured=verify_output)

    with output.protect(ckpt.path), output.stage() as staging:
        result = passes.write(staging, plan)
        if result.verification and not np.isfinite(result.verification["stored"]["original"]["kl"]):
            raise CheckpointError(
                f"the original model itself is not finite when stored as {stored_as} "
                "(overflow on the probe tokens): choose a wider --dtype"
            )
        forms, planning, notes = result.forms, None, {}
        if remove == "auto":
            forms, result, planning, notes = planner.settle(
                passes, staging, result, merge_p, unit, budget if verify_output else None, stored_as, log
            )
        for i, note in notes.items():
            log(f"[layer {i}] {note}")

        report = build_report(
            recorded_name(source), ckpt, args, result.args, forms, notes, result.inverted, dtype, quant
        )
        if planning:
            report["plan"] = planning
        if result.verification:
            report["verification"] = result.verification
        result.writer.close(counting.count(result.args)["total"])
        _write_metadata(staging, ckpt, result.args, dtype, quant, report, tokenizer, upload_repo or str(out))
        log_report(report, log)
        if result.verification and result.verification["degraded"] and not allow_degraded:
            raise DegradedError(
                "the converted model is clearly worse than the original stored in "
                f"{stored_as}: see the figures above. Nothing was "
                "written. Try --remove auto, a wider --dtype, or --allow-degraded to keep it anyway."
            )
    log(f"[INFO] wrote {out}")
    if upload_repo:
        upload(out, upload_repo)
    return report


def _write_metadata(staging, ckpt, new_args, dtype, quant, report, tokenizer: Path, model="PATH"):
    tokens = {k: ckpt.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in ckpt.config}
    quantization = {"quantization": quant, "quantization_config": quant} if quant else {}
    modeldir.write_config(staging, new_args, "convert", dtype, conversion=report, **tokens, **quantization)
    copy_tokenizer(tokenizer, staging)
    (staging / "README.md").write_text(model_card(report, model))


# mlx-lm's defaults per quantization mode: (bits, group size)
Q_MODES = {"affine": (4, 64), "mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}


def build_parser():
    p = argparse.ArgumentParser(prog="mlx-skipless convert", description=__doc__.split("\n\n")[0])
    cli.add_model_args(
        p, "local directory or Hugging Face repo id (default: the packaged demo model)", flags=("--hf-path", "--model")
    )
    p.add_argument("--mlx-path", default="mlx_model", help="output directory (default: mlx_model)")
    p.add_argument(
        "--remove",
        choices=["auto", "q", "k", "v"],
        default="auto",
        help="matrix to fuse away per block (default auto: per layer the best-"
        "conditioned square one, or none where the converted model would be over the "
        "fidelity budget in the target dtype)",
    )
    p.add_argument(
        "--dtype", choices=sorted(verify.DTYPES), help="dtype of the output weights (default: the checkpoint's)"
    )
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights as mlx-lm does")
    p.add_argument("--q-bits", type=int, help="with -q: bits per weight (default: the mode's, 4 for affine)")
    p.add_argument("--q-group-size", type=int, help="with -q: group size (default: the mode's, 64 for affine)")
    p.add_argument("--q-mode", choices=list(Q_MODES), help="with -q: quantization mode (default affine)")
    p.add_argument(
        "--verify",
        dest="verify_output",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare converted and original logits (default on)",
    )
    p.add_argument(
        "--budget-kl-ratio",
        type=float,
        default=verify.Budget.kl_ratio,
        help="auto's fidelity budget: converted KL at most this times the original's "
        "own rounding KL in the target dtype (default %(default)s)",
    )
    p.add_argument(
        "--budget-top1",
        type=float,
        default=verify.Budget.top1_points,
        help="auto's fidelity budget: top-1 agreement at most this many points below "
        "the original's own rounding (default %(default)s)",
    )
    p.add_argument(
        "--probe-batch",
        type=int,
        default=verify.PROBE_BATCH,
        help=f"verify on this many sequences of {verify.PROBE_LENGTH} random tokens "
        "(default %(default)s); more makes the plan's measurements less noisy",
    )
    p.add_argument(
        "--allow-degraded", action="store_true", help="write the model even if verification finds it clearly worse"
    )
    p.add_argument(
        "--force", action="store_true", help="replace --mlx-path if it is empty or a model mlx-skipless wrote"
    )
    p.add_argument("--tokenizer", help="directory of the tokenizer to ship (default: the checkpoint's own)")
    p.add_argument("--upload-repo", help="Hugging Face repo to upload the result to")
    return p


@cli.command(build_parser)
def main(opts):
    opts = vars(opts)
    opts.pop("verbose")
    opts.pop("trust_remote_code")
    mode = opts.pop("q_mode")
    if not opts["quantize"]:
        given = [
            f
            for f, v in (("--q-bits", opts["q_bits"]), ("--q-group-size", opts["q_group_size"]), ("--q-mode", mode))
            if v is not None
        ]
        if given:
            raise ValueError(f"{', '.join(given)} without -q/--quantize: add -q to quantize")
    bits, group_size = Q_MODES[mode or "affine"]
    opts.update(q_mode=mode or "affine", q_bits=opts["q_bits"] or bits, q_group_size=opts["q_group_size"] or group_size)
    opts["budget"] = verify.Budget(opts.pop("budget_kl_ratio"), opts.pop("budget_top1"))
    keep_freed_memory()
    convert(**opts)


if __name__ == "__main__":
    sys.exit(main())
