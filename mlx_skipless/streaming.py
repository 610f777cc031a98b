"""Fuse a checkpoint block by block, store it, and verify it as it goes.

A trial of another plan (`--remove auto`) reuses what the first written pass
stored wherever the two plans agree, and so does writing the plan chosen.
"""

from dataclasses import replace
from typing import NamedTuple, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import fusion, layout, verify
from .dtypes import as_stored, stored_values
from .loading import block_module, shell_module, store
from .models.skipless import Block, Model
from .names import (
    EMBED,
    EMBED_TOKENS,
    FFN_IN_LEAVES,
    FFN_OUT_LEAVES,
    HEAD,
    POSITIONS,
    block_key,
    is_norm,
    projection,
    split_block_key,
)
from .report import degraded, verification_record
from .shards import ShardWriter

ORIGINALS = ("original", "original_stored")


class Pass(NamedTuple):
    """A plan written: its forms and config, the matrix each layer inverted, its
    figures (None unverified) and the writer holding its tensors until `close`."""

    forms: list
    args: object
    inverted: list
    checked: Optional[verify.Verification]
    writer: Optional[ShardWriter]

    @property
    def verification(self) -> Optional[dict]:
        """The figures as the report records them."""
        return self.checked.as_dict() if self.checked else None


class Reusable(NamedTuple):
    """What the first written pass leaves for trials of other plans (`Passes._reuse`)."""

    forms: list
    args: object
    writer: ShardWriter  # its tensors as stored
    entering: dict  # block -> the stored converted model's activations entering it; -1: the embeddings'
    shell: object  # its embeddings, final norm and head, computing on numpy


class Passes:
    """Streaming passes over a checkpoint: fuse every block to a plan, store it
    in the target dtype, and push the probe tokens through the models that are
    compared, one block at a time, so memory holds two blocks plus the
    embeddings. Each block is read once a pass; the original's logits come from
    the first pass only, and so do the condition numbers (`conds`, per layer)."""

    def __init__(self, ckpt, target, quant, stored_as, tokens, progress, products=fusion.Products()):
        self.ckpt, self.target, self.quant, self.stored_as = ckpt, target, quant, stored_as
        self.tokens, self.progress, self.products = tokens, progress, products
        self.reference, self.conds = {}, None
        self.top: Optional[Reusable] = None  # from the first pass written

    def write(self, staging, plan) -> Pass:
        """Write the converted model into `staging` and verify it. `plan` is the
        list of forms, or a function from a layer's condition numbers to its form."""
        writer = ShardWriter(staging)
        names = (
            () if self.tokens is None else (("converted", "converted_stored") + (() if self.reference else ORIGINALS))
        )
        forms, new_args, inverted, logits = self._run(plan, names, writer)
        if fusion.reduced_args(self.ckpt.args, forms) != new_args:  # a provisional field was wrong
            writer.discard()
            writer, self.top = ShardWriter(staging), None
            forms, new_args, inverted, logits = self._run(forms, names, writer)
        self.reference.update({n: logits.pop(n) for n in ORIGINALS if n in logits})
        checked = (
            verify.Verification.of(verification_record(logits, self.reference, self.stored_as, self.tokens.shape))
            if names
            else None
        )
        return Pass(forms, new_args, inverted, checked, writer)

    def write_instead(self, staging, first: Pass, forms, measured: Optional[verify.Metrics]) -> Pass:
        """`forms` written in place of `first`, the first written pass: from what it stored
        where `rewrite` can (given `measured`, its stored figures), else fused anew."""
        rewritten = None if measured is None else self.rewrite(staging, first, forms, measured)
        if rewritten is None:  # not measured, or it differs from the first in more than kept bases
            first.writer.discard()
            self.top = None
            rewritten = self.write(staging, forms)
        return rewritten

    def measure(self, forms) -> verify.Metrics:
        """The stored converted model's figures, nothing written."""
        logits = self._reuse(forms)
        if logits is None:
            _, _, _, run = self._run(forms, ("converted_stored",), None)
            logits = run["converted_stored"]
        return verify.measure(logits, self.reference["original"])

    def rewrite(self, staging, first: Pass, forms, measured: verify.Metrics) -> Optional[Pass]:
        """`forms` written from what the first written pass stored, where the two differ
        only in which layers keep their Q/K/V (as for `_reuse`), nothing fused again;
        `measured`: its stored figures from `evaluate`. The float32 figures stay those of
        the first plan (rounding-free fusion of the blocks both share; the rest is the
        original's), and say so. None where the plans differ otherwise."""
        plan = self._from_top(forms)
        if plan is None:
            return None
        new_args, changed = plan
        old = self.top.writer
        writer = ShardWriter(staging, prefix="rewrite")  # beside the first pass's files, read meanwhile
        shell = {k: old.read(k) for k in old.keys() if split_block_key(k) is None}
        if 0 in changed:  # block 0 keeps its basis: the embeddings are the original's, as stored
            original = dict(
                tree_flatten(
                    store(shell_module(self.ckpt.args, self.ckpt.globals()), self.target, self.quant).parameters()
                )
            )
            embedding = {k.rsplit(".", 1)[0] for k in (EMBED, POSITIONS)}
            shell.update({k: v for k, v in original.items() if k.rsplit(".", 1)[0] in embedding})
        writer.add(shell)
        for i, _, tensors, dtype in self._blocks_from_top(forms, new_args, changed, 0, "writing"):
            writer.add({block_key(i, k): v for k, v in tensors.items()}, dtype)
        old.discard()
        self.top = None
        v = first.checked
        v = replace(v, float32=measured) if v.stored_as == "float32" else replace(v, float32_plan="first")
        v = replace(v, converted=measured, degraded=degraded(v.float32, measured, v.original))
        inverted = [None if i in changed else inv for i, inv in enumerate(first.inverted)]
        return Pass(list(forms), new_args, inverted, v, writer)

    def _reuse(self, forms):
        """The logits of the stored model for `forms` that differ from the first
        written pass only in which layers keep their Q/K/V, built from what that
        pass wrote: a layer that keeps its basis reads its input through the
        original Q, K, V (and, parallel, FFN inputs); the layer before it emits its
        output plainly (the original FFN output, and o_proj if parallel). Those
        matrices are the original's, stored the same way; nothing is fused again, and
        the probe restarts from the activations cached at the block before the
        first change. None where the plans differ otherwise."""
        plan = self._from_top(forms)
        if plan is None:
            return None
        new_args, changed = plan
        start = max(changed[0] - 1, 0)
        streams = verify.Streams(self.tokens)
        streams.h["converted_stored"] = self.top.entering[-1 if changed[0] == 0 else start]
        for _, block, _, _ in self._blocks_from_top(forms, new_args, changed, start, "trying"):
            streams.step("converted_stored", block)
            mx.clear_cache()
        return streams.finish("converted_stored", self.top.shell)

    def _from_top(self, forms):
        """(its args, the layers that differ) for `forms` that differ from the first
        written pass only in which layers keep their Q/K/V; else None."""
        if self.top is None:
            return None
        top_forms, top_args = self.top.forms, self.top.args
        args, L = self.ckpt.args, self.ckpt.args.num_hidden_layers
        new_args = fusion.reduced_args(args, forms)
        changed = [i for i in range(L) if forms[i] != top_forms[i]]
        if (
            replace(new_args, removed=top_forms) != top_args
            or not changed
            or any(forms[i].replace("p", "") and top_forms[i].replace("p", "") for i in changed)
            or any(forms[i].count("p") != top_forms[i].count("p") for i in changed)
        ):
            return None
        return new_args, changed

    def _blocks_from_top(self, forms, new_args, changed, start, desc):
        """(i, block as stored, its tensors and their dtype as `_store` gives them) for
        blocks `start`.. of `forms`, from the first written pass and, where `forms` keeps
        a basis, the original's matrices stored the same way (see `_reuse`)."""
        args, L, writer = self.ckpt.args, self.ckpt.args.num_hidden_layers, self.top.writer
        readers = set(map(projection, "qkv")) | (set(FFN_IN_LEAVES) if args.parallel_block else set())
        emitters = set(FFN_OUT_LEAVES) | ({projection("o")} if args.parallel_block else set())
        for i in _progress(range(start, L), L - start, self.progress, desc):
            take = (readers if i in changed else set()) | (emitters if i + 1 in changed else set())
            flat = self.ckpt.layer(i, np.float32) if take else {}
            original = (
                self._store(args, i, flat)[1]
                if self.quant and take
                # quantized as a whole block
                else {k: as_stored(v, self.target)[0] for k, v in flat.items() if k.rsplit(".", 2)[-2] in take}
            )
            block = Block(new_args, forms[i])  # lazy: allocates nothing
            if self.quant:
                block = store(block, self.target, self.quant)  # its tensors: with scales and biases
            tensors = {
                k: original[k] if k.rsplit(".", 2)[-2] in take else self._reread(writer, block_key(i, k))
                for k, _ in tree_flatten(block.parameters())
            }
            if self.quant:
                block.load_weights(list(tensors.items()))
                yield i, block, tensors, None
            else:
                values = {k: stored_values(v, self.target) for k, v in tensors.items()}
                yield i, verify.on_numpy(block, values, self.target), tensors, self.target

    def _reread(self, writer, key):
        """A tensor the first pass wrote, as `_store` gave it."""
        return writer.read(key) if self.quant else writer.read_raw(key)[0]

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
                shells[name].model.pop(EMBED_TOKENS)  # from here on only the head is used
        shells = {n: shells[n] for n in names}  # the written shell need not stay

        pending = {0: first_block}  # read once: the generator takes it from here
        del first_block
        layers = fusion.fuse_layers(
            lambda i: pending.pop(i) if i in pending else read(i), L, choose_once, args.parallel_block, self.products
        )
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
            stored, tensors, dtype = self._store(new_args, i, fused_flat)
            if writer:
                writer.add({block_key(i, k): v for k, v in tensors.items()}, dtype)
            del tensors
            if "converted_stored" in names:
                streams.step("converted_stored", stored)
            del stored
            # One model at a time: each is built, advanced by one block and dropped.
            orig_flat = {**layout.layer_to_flat(original, args), **passed} if set(names) & set(ORIGINALS) else None
            build = {
                "converted": lambda f=fused_flat: verify.on_numpy(Block(new_args, form), f),
                "original": lambda f=orig_flat: verify.on_numpy(Block(args, args.removed[i]), f),
                "original_stored": lambda f=orig_flat: self._store(args, i, f)[0],
            }
            for name in (n for n in names if n in build):
                streams.step(name, build[name]())
            del fused_flat, original, orig_flat, build
            # MLX keeps freed buffers for reuse; each block's shapes recur, the cache need not.
            mx.clear_cache()
        if self.conds is None:
            self.conds = conds
        if writer and self.top is None and "original_stored" in names:
            entering[-1] = embedded  # where a plan that changes layer 0 starts
            self.top = Reusable(list(new_args.removed), new_args, writer, entering, shells["converted_stored"])
        return list(new_args.removed), new_args, inverted, {n: streams.finish(n, shells[n]) for n in names}

    def _store(self, args, i, flat):
        """Block i of `args` holding float32 `flat`, as the output stores it: (a module
        that computes as the stored block does, its tensors to write, and their dtype
        for ShardWriter.add). Unquantized, the rounding is numpy's, and the module's
        products too: MLX would copy every matrix in and out again."""
        block = Block(args, args.removed[i])  # lazy: allocates nothing
        if self.quant:
            stored = store(block_module(args, i, flat), self.target, self.quant)
            return stored, dict(tree_flatten(stored.parameters())), None
        raw, values = {}, {}
        for k, _ in tree_flatten(block.parameters()):  # the order MLX would write them in
            raw[k], values[k] = as_stored(flat[k], self.target)
        return verify.on_numpy(block, values, self.target), raw, self.target


def _shells(ckpt, new_args, first, target, quant, names, products=fusion.Products()):
    """Embeddings, final norm and head as MLX models without blocks: the converted
    one as stored, and those of `names` (original, converted, as stored or in
    float32). The float64 tensors are freed on return; they are the largest thing held."""
    args, tensors = ckpt.args, ckpt.globals()
    embed, positions, head = fusion.fuse_embeddings(
        tensors[EMBED],
        tensors.get(POSITIONS),
        None if args.tie_word_embeddings else tensors[HEAD].T,
        first,
        products=products,
    )
    fused = {k: v for k, v in tensors.items() if is_norm(k)}
    fused[EMBED] = embed
    if positions is not None:
        fused[POSITIONS] = positions
    if not new_args.tie_word_embeddings:
        fused[HEAD] = head.T
    build = {
        "converted_stored": lambda: store(shell_module(new_args, fused), target, quant),
        "converted": lambda: verify.on_numpy(_shell(new_args), fused),
        "original": lambda: verify.on_numpy(_shell(args), tensors),
        "original_stored": lambda: store(shell_module(args, tensors), target, quant),
    }
    return {n: build[n]() for n in {"converted_stored", *names}}


def _shell(args):
    return Model(replace(args, num_hidden_layers=0, removed=[]))  # lazy: allocates nothing


def _progress(iterable, total, enabled, desc):
    if not enabled:
        return iterable
    from tqdm import tqdm

    # leave=False: a bar cut short by an error is wiped, so the error is the line that stays
    return tqdm(iterable, total=total, desc=desc, unit="layer", leave=False)
