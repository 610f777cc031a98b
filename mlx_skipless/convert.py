"""python -m mlx_skipless.convert: fuse a skipless checkpoint into its reduced form.

Reads a Hugging Face skipless checkpoint block by block (each block once), fuses
(inverses in float64; the other products in float32 unless the output is float32),
writes an mlx-lm model directory, and verifies the result as it goes: the
original and the converted model advance through the same probe tokens one
block at a time, their matrix products on numpy's BLAS, so peak memory stays
near two blocks plus the embeddings and verifying costs a fraction of fusing.
"""

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import __version__, cli, counting, fusion, layout, modeldir, planner, verify
from .checkpoint import TOKENIZER_FILES, CheckpointError, OutputDir, ShardWriter, copy_tokenizer
from .loading import SkiplessCheckpoint, block_module, check_quantization, load_tokenizer, shell_module, store
from .models.skipless import Block, Model

DEFAULT_SOURCE = Path(__file__).parent / "demo" / "skipless-python"
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
ORIGINALS = ("original", "original_stored")


class DegradedError(cli.CommandError):
    """The converted model is clearly worse than the original stored the same way."""

    exit_code = 3


def condition_numbers(ckpt: SkiplessCheckpoint) -> list:
    """Per layer {"q": cond(Q), ...} for every square projection, as the conversion reports them."""
    square = fusion.square_projections(ckpt.args)
    return [{m: fusion.inverse_and_condition(layer[f"self_attn.{m}_proj.weight"])[1] for m in square}
            for layer in map(ckpt.layer, range(ckpt.args.num_hidden_layers))]


def convert(hf_path: Optional[str] = None, mlx_path: str = "mlx_model", remove: str = "auto",
            dtype: Optional[str] = None, quantize: bool = False, q_bits: int = 4,
            q_group_size: int = 64, q_mode: str = "affine", assume_skipless: bool = False, verify_output: bool = True,
            allow_degraded: bool = False, force: bool = False, upload_repo: Optional[str] = None,
            revision: Optional[str] = None, budget: Optional[verify.Budget] = None,
            probe_batch: int = verify.PROBE_BATCH, tokenizer: Optional[str] = None,
            progress: bool = True, log=print) -> dict:
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
    ckpt = SkiplessCheckpoint(source, revision, assume_skipless)
    # The tokenizer must load before any work, or the output could convert and then not generate.
    tokenizer = Path(tokenizer) if tokenizer else ckpt.path
    if load_tokenizer(tokenizer) is None:  # else it loads, or the error names the bad file
        raise CheckpointError(f"{tokenizer} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): "
                              "the converted model could not generate; pass --tokenizer DIR to ship one")
    if quantize:
        check_quantization(ckpt.args, q_group_size, q_bits)
    dtype = dtype or ckpt.dtype()
    if dtype not in verify.DTYPES:
        raise CheckpointError(f"--dtype must be one of {sorted(verify.DTYPES)}, not {dtype!r}")
    quant = {"group_size": q_group_size, "bits": q_bits, "mode": q_mode} if quantize else None
    budget = budget or verify.Budget()
    args = ckpt.args
    mode = "" if q_mode == "affine" else f" {q_mode}"
    stored_as = dtype + (f", {q_bits}-bit{mode} (group {q_group_size})" if quant else "")
    log(f"[INFO] {source}: {ckpt.family}, {args.num_hidden_layers} layers, d={args.hidden_size}, "
        f"{'parallel' if args.parallel_block else 'serial'} blocks -> {stored_as}")

    merge_p = "p" if fusion.merges_p(args) else ""
    tokens = verify.probe_tokens(args.vocab_size, probe_batch) if verify_output else None
    # Products that invert nothing need float64 only for a float32 output.
    products = np.float64 if dtype == "float32" and not quant else np.float32
    passes = _Passes(ckpt, verify.DTYPES[dtype], quant, stored_as, tokens, progress, products)
    planning, notes = None, {}
    unit = max(UNIT_ROUNDOFF[dtype], 2.0 ** -q_bits if quant else 0.0)
    if remove != "auto":
        plan = [remove + merge_p] * args.num_hidden_layers
    elif verify_output:  # the ladder's top rung, decided block by block as each is read
        plan = lambda row: planner.ladder([row], merge_p)[0][0]  # noqa: E731
    else:
        plan = lambda row: planner.bound_plan([row], unit, merge_p)[0][0]  # noqa: E731
        planning = {"method": "bound: keep B where cond(B) is past "
                    f"max({planner.MAX_AMPLIFICATION:g}, {planner.AMPLIFICATION_BUDGET:g}/u), u = {unit:.3g}"}

    with output.protect(ckpt.path), output.stage() as staging:
        result = passes.write(staging, plan)
        forms = result.forms
        if result.verification and not np.isfinite(result.verification["stored"]["original"]["kl"]):
            raise CheckpointError(f"the original model itself is not finite when stored as {stored_as} "
                                  "(overflow on the probe tokens): choose a wider --dtype")
        if remove == "auto":
            conds = passes.conds
            if verify_output:
                rungs = planner.ladder(conds, merge_p)
                doubtful = len(planner.doubtful(conds, unit))
                forms, result, planning = _measured_plan(passes, staging, rungs, doubtful, result, budget,
                                                         stored_as, log)
                notes = planner.notes_for(conds, forms, f"removing it put the model over the budget in {stored_as}")
            else:
                notes = planner.notes_for(conds, forms, f"exceeds the bound's limit {planner.bound_limit(unit):.3g} "
                                          "(nothing measured)")
        for i, note in notes.items():
            log(f"[layer {i}] {note}")

        report = _report(source, ckpt, args, result.args, forms, notes, result.inverted, dtype, quant)
        if planning:
            report["plan"] = planning
        if result.verification:
            report["verification"] = result.verification
        result.writer.close(counting.count(result.args)["total"])
        _write_metadata(staging, ckpt, result.args, dtype, quant, report, tokenizer, upload_repo or str(out))
        _log_report(report, log)
        if result.verification and result.verification["degraded"] and not allow_degraded:
            raise DegradedError(
                "the converted model is clearly worse than the original stored in "
                f"{stored_as}: see the figures above. Nothing was "
                "written. Try --remove auto, a wider --dtype, or --allow-degraded to keep it anyway."
            )
    log(f"[INFO] wrote {out}")
    if upload_repo:
        _upload(out, upload_repo)
    return report


def _measured_plan(passes, staging, rungs, doubtful, first, budget, stored_as, log):
    """(forms, written pass, planning record) for --remove auto with verification.

    `first`, the top rung, is already written; if it is over the budget, the
    ladder is bisected and the chosen rung written instead. The first
    `doubtful` rungs remove a layer that the condition-number bound would keep:
    they must be within `budget`. Later rungs are at least as cautious as the
    bound and need only not be clearly worse than rounding, so that measuring
    never removes less than the bound would (on a sensitive model, noise on the
    probe can exceed a tight budget however well-conditioned B is). Rounding noise is
    measured twice where blocks merge P: the original as stored, and the
    original with only P merged, an exact re-expression that inverts nothing.
    The budget is relative to the worse of the two, because on a sensitive
    model two equally good roundings can differ several-fold in KL."""
    noise = {"original": first.verification["stored"]["original"]}
    figures = {0: first.verification["stored"]["converted"]}
    p_merged = len(rungs) - 2 if rungs[-2] != rungs[-1] else None

    def admits(k):
        if k == len(rungs) - 1:
            return True  # the original model itself
        if k not in figures:
            log(f"[PLAN] trying rung {k} of {len(rungs) - 1}: Q/K/V kept in the {k} worst-conditioned layers")
            figures[k] = passes.evaluate(rungs[k])
        return (budget if k < doubtful else verify.CLEARLY_WORSE).admits(figures[k], verify.worst(*noise.values()))

    if not admits(0) and p_merged is not None:
        if p_merged not in figures:  # rung 0 is the P-merged one when no layer can lose Q/K/V
            log(f"[PLAN] over the fidelity budget in {stored_as}; measuring a second rounding of the original")
            figures[p_merged] = passes.evaluate(rungs[p_merged])
        noise["p_merged"] = figures[p_merged]
    chosen = 0
    if not admits(0):
        log(f"[PLAN] removing every removable Q/K/V is over the fidelity budget in {stored_as}; "
            "searching for the largest plan within it")
        # the P-merged rung is a reference rounding itself: within budget by definition
        chosen = planner.search(admits, len(rungs) - 1 if p_merged is None else p_merged)
        first.writer.discard()  # the trials read it
        passes.top = None
        first = passes.write(staging, rungs[chosen])
    if "p_merged" in noise:
        v = first.verification
        v["stored"]["original_p_merged"] = noise["p_merged"]
        v["degraded"] = _degraded(v["float32"], v["stored"]["converted"], verify.worst(*noise.values()))
    planning = {
        "method": "measured: the top rung, then bisection on layers ordered by condition number",
        "budget": asdict(budget), "doubtful_layers": doubtful, "rounding": noise, "chosen_rung": chosen,
        "trials": [{"rung": k, "removed": [f or "-" for f in rungs[k]], "converted": m, "admitted": admits(k)}
                   for k, m in figures.items()],
    }
    return rungs[chosen], first, planning


class _Pass(NamedTuple):
    forms: list
    args: object
    inverted: list
    verification: Optional[dict]
    writer: Optional[ShardWriter]


class _Passes:
    """Streaming passes over a checkpoint: fuse every block to a plan, store it
    in the target dtype, and push the probe tokens through the models that are
    compared, one block at a time, so memory holds two blocks plus the
    embeddings. Each block is read once a pass; the original's logits come from
    the first pass only, and so do the condition numbers (`conds`, per layer)."""

    def __init__(self, ckpt, target, quant, stored_as, tokens, progress, products=np.float64):
        self.ckpt, self.target, self.quant, self.stored_as = ckpt, target, quant, stored_as
        self.tokens, self.progress, self.products = tokens, progress, products
        self.reference, self.conds = {}, None
        self.top = None  # the first pass written: what trials of other plans reuse

    def write(self, staging, plan) -> _Pass:
        """Write the converted model into `staging` and verify it. `plan` is the
        list of forms, or a function from a layer's condition numbers to its form."""
        writer = ShardWriter(staging)
        names = () if self.tokens is None else (
            ("converted", "converted_stored") + (() if self.reference else ORIGINALS))
        forms, new_args, inverted, logits = self._run(plan, names, writer)
        if fusion.reduced_args(self.ckpt.args, forms) != new_args:  # a provisional field was wrong
            writer.discard()
            writer, self.top = ShardWriter(staging), None
            forms, new_args, inverted, logits = self._run(forms, names, writer)
        self.reference.update({n: logits.pop(n) for n in ORIGINALS if n in logits})
        verification = _verification(logits, self.reference, self.stored_as, self.tokens.shape) if names else None
        return _Pass(forms, new_args, inverted, verification, writer)

    def evaluate(self, forms) -> dict:
        """The stored converted model's figures, nothing written."""
        logits = self._reuse(forms)
        if logits is None:
            _, _, _, run = self._run(forms, ("converted_stored",), None)
            logits = run["converted_stored"]
        return verify.compare(logits, self.reference["original"])

    def _reuse(self, forms):
        """The logits of the stored model for `forms` that differ from the first
        written pass only in which layers keep their Q/K/V, built from what that
        pass wrote: a layer that keeps its basis reads its input through the
        original Q, K, V (and, parallel, FFN inputs); the layer before it emits its
        output plainly (the original FFN output, and o_proj if parallel). Those
        matrices are the original's, stored the same way; nothing is fused again, and
        the probe restarts from the activations cached at the block before the
        first change. None where the plans differ otherwise."""
        if self.top is None:
            return None
        top_forms, top_args, writer, entering, shell = self.top
        args, L = self.ckpt.args, self.ckpt.args.num_hidden_layers
        new_args = fusion.reduced_args(args, forms)
        changed = [i for i in range(L) if forms[i] != top_forms[i]]
        if (replace(new_args, removed=top_forms) != top_args or not changed
                or any(forms[i].replace("p", "") and top_forms[i].replace("p", "") for i in changed)
                or any(forms[i].count("p") != top_forms[i].count("p") for i in changed)):
            return None
        start = max(changed[0] - 1, 0)
        streams = verify.Streams(self.tokens)
        streams.h["converted_stored"] = entering[-1 if changed[0] == 0 else start]
        readers = {"q_proj", "k_proj", "v_proj"} | (set(fusion.FFN_IN_LEAVES) if args.parallel_block else set())
        emitters = set(fusion.FFN_OUT_LEAVES) | ({"o_proj"} if args.parallel_block else set())
        for i in _progress(range(start, L), L - start, self.progress, "trying"):
            block = store(Block(new_args, forms[i]), self.target, self.quant)
            original = {}
            take = (readers if i in changed else set()) | (emitters if i + 1 in changed else set())
            if take:
                original = dict(tree_flatten(store(block_module(args, i, self.ckpt.layer(i, np.float32)),
                                                   self.target, self.quant).parameters()))
            tensors = [(k, original[k] if k.rsplit(".", 2)[-2] in take else writer.read(f"model.layers.{i}.{k}"))
                       for k, _ in tree_flatten(block.parameters())]
            block.load_weights(tensors)
            streams.step("converted_stored", block)
            mx.clear_cache()
        return streams.finish("converted_stored", shell)

    def _choose(self, plan, conds):
        """choose(i, block) for fusion.fuse_layers: the form and basis of block i."""
        square = fusion.square_projections(self.ckpt.args)

        def choose(i, layer):
            if callable(plan):  # every square projection weighed, its condition number kept
                bases = {n: fusion.basis_of(layer, n, i, check=False) for n in square}
                conds[i] = {n: b.inverted.cond for n, b in bases.items()}
                form = plan(conds[i])
                return form, bases.get(form.replace("p", ""))
            basis = fusion.basis_of(layer, plan[i], i)
            conds[i] = {basis.inverted.matrix[0]: basis.inverted.cond} if basis else {}
            return plan[i], basis

        return choose

    def _run(self, plan, names, writer):
        ckpt, args = self.ckpt, self.ckpt.args
        L = args.num_hidden_layers
        others, conds, chosen = {}, [None] * L, {}  # per block: tensors fusion passes through (norms)

        def read(i):
            linear, others[i] = layout.layer_from_flat(ckpt.layer(i, np.float32), np.float32)
            return linear

        choose = self._choose(plan, conds)

        def choose_once(i, layer):
            # Block 0 is chosen before the loop (the embeddings need its basis); a choice
            # holds B and B⁻¹, so each is dropped once fusion has taken it.
            return chosen.pop(i) if i in chosen else choose(i, layer)

        if callable(plan):
            # Decided block by block: later forms are provisional until their block is
            # read. Each block's module is built once its form is known, and the config's
            # other fields must not depend on them (checked by write()).
            first_block = read(0)
            chosen[0] = choose(0, first_block)
            typical = plan({n: 1.0 for n in fusion.square_projections(args)})
            forms = [chosen[0][0]] + [typical] * (L - 1)
        else:
            forms = list(plan)
        new_args = fusion.reduced_args(args, forms)
        if not callable(plan):
            first_block = read(0)
            chosen[0] = choose(0, first_block)
        first = chosen[0][1]
        shells = _shells(ckpt, new_args, first, self.target, self.quant, names, self.products)
        del first
        if writer:
            writer.add(dict(tree_flatten(shells["converted_stored"].parameters())))
        streams = verify.Streams(self.tokens)
        for name in names:
            streams.start(name, shells[name])
            embedded = streams.h[name]  # the last: the original as stored, where verified
            if not shells[name].args.tie_word_embeddings:
                shells[name].model.pop("embed_tokens")  # from here on only the head is used
        shells = {n: shells[n] for n in names}  # the written shell need not stay

        pending = {0: first_block}  # read once: the generator takes it from here
        del first_block
        layers = fusion.fuse_layers(lambda i: pending.pop(i) if i in pending else read(i), L, choose_once,
                                    args.parallel_block, self.products)
        inverted = []
        desc = "fusing" if writer else "trying"
        entering = {}  # the stored converted model's activations entering each block
        for i, (original, form, basis, fused) in enumerate(_progress(layers, L, self.progress, desc)):
            new_args.removed[i] = form
            if "converted_stored" in names:
                entering[i] = streams.h["converted_stored"]
            inverted.append(basis and basis.inverted)
            passed = others.pop(i)
            fused_flat = {**layout.layer_to_flat(fused, new_args), **passed}
            del fused
            stored = store(block_module(new_args, i, fused_flat), self.target, self.quant)
            if writer:
                writer.add({f"model.layers.{i}.{k}": v for k, v in tree_flatten(stored.parameters())})
            # One model at a time: each is built, advanced by one block and dropped.
            build = {"converted_stored": lambda: stored,
                     "converted": lambda: verify.on_numpy(Block(new_args, form), fused_flat),
                     "original": lambda: verify.on_numpy(Block(args, args.removed[i]), orig_flat),
                     "original_stored": lambda: store(block_module(args, i, orig_flat), self.target, self.quant)}
            orig_flat = {**layout.layer_to_flat(original, args), **passed} if set(names) & set(ORIGINALS) else None
            for name in names:
                streams.step(name, build[name]())
            del stored, fused_flat, original, orig_flat, build
            # MLX keeps freed buffers for reuse; each block's shapes recur, the cache need not.
            mx.clear_cache()
        if self.conds is None:
            self.conds = conds
        if writer and self.top is None and "original_stored" in names:
            entering[-1] = embedded  # where a plan that changes layer 0 starts
            self.top = (list(new_args.removed), new_args, writer, entering, shells["converted_stored"])
        return list(new_args.removed), new_args, inverted, {n: streams.finish(n, shells[n]) for n in names}


def _shells(ckpt, new_args, first, target, quant, names, products=np.float64):
    """Embeddings, final norm and head as MLX models without blocks: the converted
    one as stored, and those of `names` (original, converted, as stored or in
    float32). The float64 tensors are freed on return; they are the largest thing held."""
    args, tensors = ckpt.args, ckpt.globals()
    embed, positions, head = fusion.fuse_embeddings(
        tensors["model.embed_tokens.weight"], tensors.get("model.embed_positions.weight"),
        None if args.tie_word_embeddings else tensors["lm_head.weight"].T, first, dtype=products)
    fused = {k: v for k, v in tensors.items() if "norm" in k}
    fused["model.embed_tokens.weight"] = embed
    if positions is not None:
        fused["model.embed_positions.weight"] = positions
    if not new_args.tie_word_embeddings:
        fused["lm_head.weight"] = head.T
    build = {"converted_stored": lambda: store(shell_module(new_args, fused), target, quant),
             "converted": lambda: verify.on_numpy(_shell(new_args), fused),
             "original": lambda: verify.on_numpy(_shell(args), tensors),
             "original_stored": lambda: store(shell_module(args, tensors), target, quant)}
    return {n: build[n]() for n in {"converted_stored", *names}}


def _shell(args):
    return Model(replace(args, num_hidden_layers=0, removed=[]))  # lazy: allocates nothing


def _progress(iterable, total, enabled, desc):
    if not enabled:
        return iterable
    from tqdm import tqdm

    # leave=False: a bar cut short by an error is wiped, so the error is the line that stays
    return tqdm(iterable, total=total, desc=desc, unit="layer", leave=False)


def _verification(logits, reference, stored_as, probe_shape):
    ref = reference["original"]
    converted = verify.compare(logits["converted"], ref)
    stored = verify.compare(logits["converted_stored"], ref)
    rounding = verify.compare(reference["original_stored"], ref)
    return {
        "reference": "the original model in float32",
        "probe": f"{probe_shape[0]} x {probe_shape[1]} random token ids, seed 0",
        "float32": converted,
        "stored_as": stored_as,
        "stored": {"converted": stored, "original": rounding},
        "degraded": _degraded(converted, stored, rounding),
    }


def _degraded(float32, stored, rounding):
    return verify.is_degraded(stored, rounding) or verify.is_degraded(float32, verify.EXACT)


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


def _write_metadata(staging, ckpt, new_args, dtype, quant, report, tokenizer: Path, model="PATH"):
    tokens = {k: ckpt.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in ckpt.config}
    quantization = {"quantization": quant, "quantization_config": quant} if quant else {}
    modeldir.write_config(staging, new_args, "convert", dtype, conversion=report, **tokens, **quantization)
    copy_tokenizer(tokenizer, staging)
    (staging / "README.md").write_text(model_card(report, model))


def verification_rows(v):
    """(label, metrics): float32, then, if stored otherwise, converted and original as stored."""
    rows = [("converted, float32", v["float32"])]
    if v["stored_as"] != "float32":
        rows += [(f"converted, {v['stored_as']}", v["stored"]["converted"]),
                 (f"original, {v['stored_as']}", v["stored"]["original"])]
        if "original_p_merged" in v["stored"]:
            rows.append((f"original, P merged, {v['stored_as']}", v["stored"]["original_p_merged"]))
    return rows


def model_card(report, model="PATH") -> str:
    """The README.md of a converted model; its commands name `model` (where it was written or uploaded)."""
    lines = ["---", "library_name: mlx", "pipeline_tag: text-generation", "tags: [mlx, skipless]", "---", ""]
    lines += card_body(report)
    lines += [
        "## Use", "", "mlx-skipless is not on PyPI: install it from a checkout of its repository "
        "(`pip install ./mlx-skipless`), or run the model with stock mlx-lm.", "", "```bash",
        f"mlx-skipless generate --model {model} --prompt 'def fib(n):'",
        "# or with stock mlx-lm:", f"mlx_lm generate --model {model} --trust-remote-code --prompt 'def fib(n):'",
        "```", "",
        "The full report, the plans tried included: `conversion` in config.json.", "",
    ]
    return "\n".join(lines)


def card_body(report) -> list:
    """Markdown lines: weights removed, verification, and the conversion plan."""
    w, s = report["weights"], report["predicted_speedup"]
    lines = [
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
    return lines + plan_section(report)


def plan_section(report) -> list:
    """Markdown lines: what each layer lost, and how the plan was chosen."""
    lines = ["## Conversion plan", ""]
    plan = report.get("plan")
    if plan and "budget" in plan:
        b = plan["budget"]
        lines += [f"Planned by measurement (`--remove auto`): KL at most {b['kl_ratio']:g}x and top-1 agreement "
                  f"at most {b['top1_points']:g} point(s) (or {b['sigmas']:g} standard errors) worse than "
                  f"rounding the original in the same dtype; {len(plan['trials'])} plan(s) tried, "
                  f"rung {plan['chosen_rung']} chosen (rung k keeps Q/K/V in the k worst-conditioned layers).", ""]
    elif plan:
        lines += [f"Planned without measuring (`--no-verify`): {plan['method']}.", ""]
    lines += ["| layer | removed | inverted | condition number | note |", "|---|---|---|---|---|"]
    lines += [f"| {e['layer']} | {e['removed'].upper() or '-'} | {e.get('inverted', '-')} | "
              f"{e['cond']:.3g} | {e.get('note', '')} |" if "cond" in e else
              f"| {e['layer']} | {e['removed'].upper() or '-'} | - | - | {e.get('note', '')} |"
              for e in report["layers"]]
    return lines + [""]


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
    try:
        api.create_repo(repo_id=repo, exist_ok=True)
        api.upload_folder(folder_path=str(path), repo_id=repo, repo_type="model")
    except Exception as e:  # network, credentials, hub: any of them leaves the model written
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise OSError(f"uploading to {repo} failed ({first.strip()}); the converted model is kept in "
                      f"{path}: upload it later with `hf upload {repo} {path}`") from e
    print(f"[INFO] uploaded to https://huggingface.co/{repo}")


# mlx-lm's defaults per quantization mode: (bits, group size)
Q_MODES = {"affine": (4, 64), "mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}


def build_parser():
    p = argparse.ArgumentParser(prog="mlx-skipless convert", description=__doc__.split("\n\n")[0])
    cli.add_model_args(p, "local directory or Hugging Face repo id (default: the packaged demo model)",
                       flags=("--hf-path", "--model"))
    p.add_argument("--mlx-path", default="mlx_model", help="output directory (default: mlx_model)")
    p.add_argument("--remove", choices=["auto", "q", "k", "v"], default="auto",
                   help="matrix to fuse away per block (default auto: per layer the best-"
                   "conditioned square one, or none where the converted model would be over the "
                   "fidelity budget in the target dtype)")
    p.add_argument("--dtype", choices=sorted(verify.DTYPES), help="default: the checkpoint's")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights as mlx-lm does")
    p.add_argument("--q-bits", type=int, help="with -q: bits per weight (default: the mode's, 4 for affine)")
    p.add_argument("--q-group-size", type=int, help="with -q: group size (default: the mode's, 64 for affine)")
    p.add_argument("--q-mode", choices=list(Q_MODES), help="with -q: quantization mode (default affine)")
    p.add_argument("--verify", dest="verify_output", action=argparse.BooleanOptionalAction, default=True,
                   help="compare converted and original logits (default on)")
    p.add_argument("--budget-kl-ratio", type=float, default=verify.Budget.kl_ratio,
                   help="auto's fidelity budget: converted KL at most this times the original's "
                   "own rounding KL in the target dtype (default %(default)s)")
    p.add_argument("--budget-top1", type=float, default=verify.Budget.top1_points,
                   help="auto's fidelity budget: top-1 agreement at most this many points below "
                   "the original's own rounding (default %(default)s)")
    p.add_argument("--probe-batch", type=int, default=verify.PROBE_BATCH,
                   help=f"verify on this many sequences of {verify.PROBE_LENGTH} random tokens "
                   "(default %(default)s); more makes the plan's measurements less noisy")
    p.add_argument("--allow-degraded", action="store_true",
                   help="write the model even if verification finds it clearly worse")
    p.add_argument("--force", action="store_true",
                   help="replace --mlx-path if it is empty or a model mlx-skipless wrote")
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
        given = [f for f, v in (("--q-bits", opts["q_bits"]), ("--q-group-size", opts["q_group_size"]),
                                ("--q-mode", mode)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} without -q/--quantize: add -q to quantize")
    bits, group_size = Q_MODES[mode or "affine"]
    opts.update(q_mode=mode or "affine", q_bits=opts["q_bits"] or bits,
                q_group_size=opts["q_group_size"] or group_size)
    opts["budget"] = verify.Budget(opts.pop("budget_kl_ratio"), opts.pop("budget_top1"))
    convert(**opts)


if __name__ == "__main__":
    sys.exit(main())
