"""Store a model that has nothing to fuse in another dtype or quantization.

A model trained in a reduced form that keeps its skips and norms (Graef's
Figure 4, W_Q = I) or in any form with residual adds or block norms admits no
fusion: a matrix cannot move across a residual add or a norm. Converting it
means storing it again, cast and quantized as mlx-lm does, with the converter's
report and verification (the original in float32 against the stored model on
the same probe), so one command serves every model this project trains.
"""

from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import __version__, counting, modeldir, verify
from .card import model_card
from .hub import copy_tokenizer
from .loading import load_model, store
from .models.skipless import ModelArgs
from .output_dir import OutputDir
from .report import log_report, verification_record


def has_nothing_to_fuse(config: dict) -> bool:
    """A model of this project's own type whose blocks keep skips or norms, or that was
    trained reduced (and so has no vanilla original to fuse from). A model that fusion
    reduced is not one: its vanilla original is what to convert."""
    if config.get("model_type") != "skipless":
        return False
    if config.get("residual") or config.get("block_norm"):
        return True
    conversion = config.get("conversion")
    fused = isinstance(conversion, dict) and "restored" not in conversion
    return bool(any(config.get("removed") or ())) and not fused


def why(args: ModelArgs) -> str:
    kept = [
        what
        for what, present in (("residual adds", args.residual), (f"{args.block_norm} block norms", args.block_norm))
        if present
    ]
    if kept:
        return f"its blocks keep {' and '.join(kept)}, across which no matrix can move"
    return "it was trained in its reduced form"


def restore(
    source: str,
    path: Path,
    output: OutputDir,
    dtype: str,
    quant: Optional[dict],
    tokenizer: Path,
    probe_batch: int,
    verify_output: bool,
    model_name: str,
    log=print,
) -> dict:
    """Store the model at `path` as `dtype` (and `quant`) into `output`; the report."""
    model, config = load_model(str(path))
    args = model.args
    log(f"[INFO] nothing to fuse: {why(args)}; storing it as {dtype}" + (f", {quant['bits']}-bit" if quant else ""))
    model.set_dtype(mx.float32)
    tokens = verify.probe_tokens(args.vocab_size, probe_batch) if verify_output else None
    reference = np.array(model(tokens), np.float64) if verify_output else None
    store(model, verify.DTYPES[dtype], quant)
    n = counting.count(args)["total"]
    report = {
        "source": source,
        "family": "skipless",
        "mlx_skipless_version": __version__,
        "dtype": dtype,
        "quantization": quant,
        "restored": f"nothing fused: {why(args)}",
        "layers": [
            {"layer": i, "removed": form, "note": "trained without it" if form else ""}
            for i, form in enumerate(args.removed)
        ],
        "weights": {"before": n, "after": n, "removed": 0, "removed_fraction": 0.0, "untied_head": 0},
        "predicted_speedup": {"paper": 1.0, "bytes_read": 1.0},
    }
    if verify_output:
        stored = np.array(model(tokens).astype(mx.float32), np.float64)
        stored_as = dtype + (f", {quant['bits']}-bit (group {quant['group_size']})" if quant else "")
        report["verification"] = verification_record(
            {"converted": reference, "converted_stored": stored},
            {"original": reference, "original_stored": stored},
            stored_as,
            tokens.shape,
        )
    with output.protect(path), output.stage() as staging:
        modeldir.write_weights(staging, dict(tree_flatten(model.parameters())), n)
        quantization = {"quantization": quant, "quantization_config": quant} if quant else {}
        tokens_ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        modeldir.write_config(staging, args, "convert", dtype, conversion=report, **tokens_ids, **quantization)
        copy_tokenizer(tokenizer, staging)
        (staging / "README.md").write_text(model_card(report, model_name))
        log_report(report, log)
    return report
