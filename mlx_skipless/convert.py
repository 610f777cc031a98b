"""python -m mlx_skipless.convert: fuse a skipless checkpoint into its reduced form.

Reads a Hugging Face skipless checkpoint block by block, fuses in float64,
writes an mlx-lm model directory, and verifies the result as it goes: the
original and the converted model advance through the same probe tokens one
block at a time, so peak memory stays near two blocks plus the embeddings.
"""

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from . import __version__, counting, fusion, layout, verify
from .checkpoint import CheckpointError, ShardWriter, copy_tokenizer, staged_directory
from .loading import SkiplessCheckpoint, block_module, shell_module, store
from .models import skipless

DEFAULT_SOURCE = Path(__file__).parent / "demo" / "skipless-python"
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
# Keep B when cond(B) exceeds both: fusion multiplies the dtype's own rounding error by up
# to cond(B), which stays harmless while cond(B) * unit roundoff is tiny (float32) or
# cond(B) itself is small; measured in tests/test_convert.py (cond 1e2 and 1e4 in bf16).
AMPLIFICATION_BUDGET = 0.01
MAX_AMPLIFICATION = 10.0


class DegradedError(RuntimeError):
    """The converted model is clearly worse than the original stored the same way."""


def plan(ckpt: SkiplessCheckpoint, remove: str, dtype: str, log=print, quant=None):
    """The target `removed` form of every layer, and a note per layer.

    q, k or v: remove that matrix everywhere (an illegal or singular choice is an
    error). auto: per layer the best-conditioned square matrix among Q, K, V, or
    none where even that one would amplify the dtype's rounding past the budget:
    fusion multiplies rounding error by up to cond(B) (DESIGN §3)."""
    args = ckpt.args
    merge_p = "p" if fusion.merges_p(args) else ""
    if remove != "auto":
        return [remove + merge_p] * args.num_hidden_layers, {}
    candidates = fusion.square_projections(args)
    unit = max(UNIT_ROUNDOFF[dtype], 2.0 ** -quant["bits"] if quant else 0.0)
    stored = dtype + (f", {quant['bits']}-bit" if quant else "")
    limit = max(MAX_AMPLIFICATION, AMPLIFICATION_BUDGET / unit)
    forms, notes = [], {}
    for i in range(args.num_hidden_layers):
        layer = ckpt.layer(i)
        conds = {n: fusion.condition_number(layer[f"self_attn.{n}_proj.weight"]) for n in candidates}
        best = min(conds, key=conds.get) if conds else None
        if best is None or conds[best] > limit:
            forms.append(merge_p)
            notes[i] = (f"kept Q/K/V: best condition number {conds[best]:.3g} exceeds "
                        f"{limit:.3g} for {stored}" if best else "no square Q/K/V to remove")
            log(f"[layer {i}] {notes[i]}")
        else:
            forms.append(best + merge_p)
    return forms, notes


def convert(hf_path: Optional[str] = None, mlx_path: str = "mlx_model", remove: str = "auto",
            dtype: Optional[str] = None, quantize: bool = False, q_bits: int = 4,
            q_group_size: int = 64, assume_skipless: bool = False, verify_output: bool = True,
            allow_degraded: bool = False, force: bool = False, upload_repo: Optional[str] = None,
            revision: Optional[str] = None, progress: bool = True, log=print) -> dict:
    """Convert and return the conversion report (also stored in the output's config.json)."""
    out = Path(mlx_path)
    if out.exists() and not force:
        raise CheckpointError(f"{out} exists; pass --force to overwrite it")
    if remove not in ("auto", "q", "k", "v"):
        raise CheckpointError(f"--remove must be auto, q, k or v, not {remove!r}")
    source = str(hf_path or DEFAULT_SOURCE)
    ckpt = SkiplessCheckpoint(source, revision, assume_skipless)
    dtype = dtype or ckpt.dtype()
    if dtype not in verify.DTYPES:
        raise CheckpointError(f"--dtype must be one of {sorted(verify.DTYPES)}, not {dtype!r}")
    quant = {"group_size": q_group_size, "bits": q_bits, "mode": "affine"} if quantize else None
    args = ckpt.args
    log(f"[INFO] {source}: {ckpt.family}, {args.num_hidden_layers} layers, d={args.hidden_size}, "
        f"{'parallel' if args.parallel_block else 'serial'} blocks -> {dtype}"
        + (f", {q_bits}-bit" if quant else ""))

    forms, notes = plan(ckpt, remove, dtype, log, quant)
    new_args = fusion.reduced_args(args, forms)
    target = verify.DTYPES[dtype]
    streams = verify.Streams(verify.probe_tokens(args.vocab_size)) if verify_output else None
    names = ("original", "original_stored", "converted", "converted_stored")

    with staged_directory(out, force) as staging:
        writer = ShardWriter(staging)
        first = fusion.basis_of(_affines(ckpt.layer(0)), forms[0], 0)
        shells = _shells(ckpt, new_args, first, target, quant, bool(streams))
        writer.add(dict(tree_flatten(shells["converted_stored"].parameters())))
        if streams:
            for name in names:
                streams.start(name, shells[name])
                if not shells[name].args.tie_word_embeddings:
                    shells[name].model.pop("embed_tokens")  # from here on only the head is used
        else:
            shells.clear()  # written: nothing else needs them

        others = {}  # per block, tensors fusion passes through (attention shape)

        def read(i):
            linear, others[i] = layout.layer_from_flat(ckpt.layer(i))
            return linear

        layers = fusion.fuse_layers(read, forms, args.parallel_block)
        inverted = []
        for i, (original, fused, inv) in enumerate(_progress(layers, len(forms), progress)):
            inverted.append(inv)
            passed = others.pop(i)
            fused_flat = {**layout.layer_to_flat(fused, new_args), **passed}
            stored = store(block_module(new_args, i, fused_flat), target, quant)
            writer.add({f"model.layers.{i}.{k}": v for k, v in tree_flatten(stored.parameters())})
            if streams:
                orig_flat = {**layout.layer_to_flat(original, args), **passed}
                blocks = {"original": block_module(args, i, orig_flat),
                          "original_stored": store(block_module(args, i, orig_flat), target, quant),
                          "converted": block_module(new_args, i, fused_flat),
                          "converted_stored": stored}
                for name in names:
                    streams.step(name, blocks[name])
            # MLX keeps freed buffers for reuse; each block's shapes recur, the cache need not.
            mx.clear_cache()

        report = _report(source, ckpt, args, new_args, forms, notes, inverted, dtype, quant)
        if streams:
            report["verification"] = _verification(streams, shells, dtype, quant)
        writer.close(counting.count(new_args)["total"])
        _write_metadata(staging, ckpt, new_args, dtype, quant, report)
        _log_report(report, log)
        if streams and report["verification"]["degraded"] and not allow_degraded:
            raise DegradedError(
                "the converted model is clearly worse than the original stored in "
                f"{report['verification']['stored_as']}: see the figures above. Nothing was "
                "written. Try --remove auto, a wider --dtype, or --allow-degraded to keep it anyway."
            )
    log(f"[INFO] wrote {out}")
    if upload_repo:
        _upload(out, upload_repo)
    return report


def _affines(tensors):
    return layout.layer_from_flat(tensors)[0]


def _shells(ckpt, new_args, first, target, quant, verifying):
    """Embeddings, final norm and head as MLX models without blocks: the converted
    one as stored and, when verifying, the original and both in float32. The
    float64 tensors are freed on return; they are the largest thing held."""
    args, tensors = ckpt.args, ckpt.globals()
    embed, positions, head = fusion.fuse_embeddings(
        tensors["model.embed_tokens.weight"], tensors.get("model.embed_positions.weight"),
        None if args.tie_word_embeddings else tensors["lm_head.weight"].T, first and first[0])
    fused = {k: v for k, v in tensors.items() if "norm" in k}
    fused["model.embed_tokens.weight"] = embed
    if positions is not None:
        fused["model.embed_positions.weight"] = positions
    if not new_args.tie_word_embeddings:
        fused["lm_head.weight"] = head.T
    shells = {"converted_stored": store(shell_module(new_args, fused), target, quant)}
    if verifying:
        shells.update(original=shell_module(args, tensors), converted=shell_module(new_args, fused),
                      original_stored=store(shell_module(args, tensors), target, quant))
    return shells


def _progress(iterable, total, enabled):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc="fusing", unit="layer")


def _verification(streams, shells, dtype, quant):
    ref = streams.finish("original", shells["original"])
    stored_as = dtype + (f", {quant['bits']}-bit (group {quant['group_size']})" if quant else "")
    converted = verify.compare(streams.finish("converted", shells["converted"]), ref)
    stored = verify.compare(streams.finish("converted_stored", shells["converted_stored"]), ref)
    rounding = verify.compare(streams.finish("original_stored", shells["original_stored"]), ref)
    return {
        "reference": "the original model in float32",
        "probe": "4 x 32 random token ids, seed 0",
        "float32": converted,
        "stored_as": stored_as,
        "stored": {"converted": stored, "original": rounding},
        "degraded": verify.is_degraded(stored, rounding) or verify.is_degraded(converted, verify.EXACT),
    }


def _report(source, ckpt, args, new_args, forms, notes, inverted, dtype, quant):
    savings = counting.compare(args, new_args)
    layers = []
    for i, (form, inv) in enumerate(zip(forms, inverted)):
        entry = {"layer": i, "removed": form}
        if inv is not None:
            entry.update(inverted=inv.matrix, cond=inv.cond)
        if i in notes:
            entry["note"] = notes[i]
        layers.append(entry)
    return {
        "source": source,
        "family": ckpt.family,
        "mlx_skipless_version": __version__,
        "dtype": dtype,
        "quantization": quant,
        "layers": layers,
        "weights": {
            "before": savings["vanilla"]["total"],
            "after": savings["reduced"]["total"],
            "removed": savings["removed"],
            "removed_fraction": savings["removed_fraction"],
            "untied_head": savings["reduced"]["components"].get("lm_head", 0)
            - savings["vanilla"]["components"].get("lm_head", 0),
        },
        "predicted_speedup": {"paper": savings["speedup_paper"],
                              "bytes_read": savings["speedup_predicted"]},
    }


def _write_metadata(staging, ckpt, new_args, dtype, quant, report):
    config = {k: v for k, v in asdict(new_args).items() if v is not None}  # None: the default
    config.update(model_type="skipless", model_file="skipless.py", torch_dtype=dtype,
                  conversion=report)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in ckpt.config:
            config[key] = ckpt.config[key]
    if quant:
        config["quantization"] = config["quantization_config"] = quant
    (staging / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))
    shutil.copy(skipless.__file__, staging / "skipless.py")
    copy_tokenizer(ckpt.path, staging)
    (staging / "README.md").write_text(model_card(report))


def verification_rows(v):
    """(label, metrics): float32, then, if stored otherwise, converted and original as stored."""
    rows = [("converted, float32", v["float32"])]
    if v["stored_as"] != "float32":
        rows += [(f"converted, {v['stored_as']}", v["stored"]["converted"]),
                 (f"original, {v['stored_as']}", v["stored"]["original"])]
    return rows


def model_card(report) -> str:
    w, s = report["weights"], report["predicted_speedup"]
    lines = [
        "---", "library_name: mlx", "pipeline_tag: text-generation",
        "tags: [mlx, skipless]", "---", "",
        "# Skipless model, reduced with mlx-skipless", "",
        f"Converted from `{report['source']}` ({report['family']}) by mlx-skipless "
        f"{report['mlx_skipless_version']}, stored as {report['dtype']}"
        + (f", {report['quantization']['bits']}-bit" if report["quantization"] else "") + ".", "",
        f"Weights: {w['before']:,} -> {w['after']:,} ({100 * w['removed_fraction']:.1f}% removed"
        + (f"; the head was untied, adding {w['untied_head']:,}" if w["untied_head"] else "") + ").",
        f"Predicted batch-1 decode speedup: {s['bytes_read']:.3f}x from weights read per token "
        f"({s['paper']:.3f}x as the paper counts it).", "",
    ]
    v = report.get("verification")
    if v:
        lines += [
            f"Verification against {v['reference']} on {v['probe']}:", "",
            "| model | max rel. logit error | top-1 agreement | KL |", "|---|---|---|---|",
        ]
        lines += [f"| {n} | {m['max_rel_error']:.2e} | {100 * m['top1_agreement']:.1f}% | {m['kl']:.2e} |"
                  for n, m in verification_rows(v)]
        lines.append("")
    lines += [
        "## Use", "", "```bash", "pip install mlx-skipless",
        "mlx-skipless generate --model PATH --prompt 'def fib(n):'",
        "# or with stock mlx-lm:", "mlx_lm generate --model PATH --trust-remote-code --prompt 'def fib(n):'",
        "```", "",
        "Per-layer removals and condition numbers: `conversion` in config.json.", "",
    ]
    return "\n".join(lines)


def _log_report(report, log):
    w = report["weights"]
    conds = [entry["cond"] for entry in report["layers"] if "cond" in entry]
    log(f"[INFO] weights {w['before']:,} -> {w['after']:,} ({100 * w['removed_fraction']:.1f}% removed), "
        f"predicted batch-1 speedup {report['predicted_speedup']['bytes_read']:.3f}x")
    if conds:
        log(f"[INFO] inverted {len(conds)} matrices, condition numbers {min(conds):.3g} to {max(conds):.3g}")
    v = report.get("verification")
    if v:
        for name, m in verification_rows(v):
            log(f"[VERIFY] {name:<28} max rel. logit error {m['max_rel_error']:.2e}, "
                f"top-1 agreement {100 * m['top1_agreement']:.1f}%, KL {m['kl']:.2e}")
        if v["degraded"]:
            log("[WARNING] " + "!" * 60)
            log("[WARNING] FUSION MADE THIS MODEL CLEARLY WORSE than plain rounding of the original.")
            log("[WARNING] " + "!" * 60)


def _upload(path: Path, repo: str):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id=repo, exist_ok=True)
    api.upload_folder(folder_path=str(path), repo_id=repo, repo_type="model")
    print(f"[INFO] uploaded to https://huggingface.co/{repo}")


def build_parser():
    p = argparse.ArgumentParser(prog="mlx-skipless convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-path", help="local directory or Hugging Face repo id "
                   "(default: the packaged demo model)")
    p.add_argument("--revision", help="hub revision: branch, tag or commit")
    p.add_argument("--mlx-path", default="mlx_model", help="output directory (default: mlx_model)")
    p.add_argument("--remove", choices=["auto", "q", "k", "v"], default="auto",
                   help="matrix to fuse away per block (default auto: the best-conditioned "
                   "square one, or none where it would amplify rounding too much)")
    p.add_argument("--dtype", choices=sorted(verify.DTYPES), help="default: the checkpoint's")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights (mlx affine)")
    p.add_argument("--q-bits", type=int, default=4)
    p.add_argument("--q-group-size", type=int, default=64)
    p.add_argument("--assume-skipless", action="store_true",
                   help="treat a checkpoint not marked \"skipless\": true as skipless")
    p.add_argument("--verify", dest="verify_output", action=argparse.BooleanOptionalAction, default=True,
                   help="compare converted and original logits (default on)")
    p.add_argument("--allow-degraded", action="store_true",
                   help="write the model even if verification finds it clearly worse")
    p.add_argument("--force", action="store_true", help="overwrite --mlx-path")
    p.add_argument("--upload-repo", help="Hugging Face repo to upload the result to")
    return p


def main(argv=None):
    opts = build_parser().parse_args(argv)
    try:
        convert(**vars(opts))
    except (CheckpointError, fusion.FusionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except DegradedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
