"""Weight counts, savings and the predicted batch-1 decode speedup of any config.

Counts come from the real module tree (built lazily, so a 47B config costs
nothing), which keeps them true to the model code by construction.
"""

from collections import Counter
from typing import Dict, Optional, Sequence

import numpy as np

from . import names
from .models.skipless import Model, ModelArgs


def shapes(args: ModelArgs) -> Dict[str, tuple]:
    """Parameter names and shapes of the model `args` describes, allocating nothing."""
    from mlx.utils import tree_flatten

    # MLX is lazy: the random initial weights are never evaluated here.
    return {k: tuple(v.shape) for k, v in tree_flatten(Model(args).parameters())}


def component(name: str) -> str:
    """A weight's component: its attention projection ('q_proj', ...), 'ffn', 'experts', 'router',
    'norms', or the module of a whole-model tensor ('embed_tokens', 'embed_positions', 'lm_head')."""
    if names.is_norm(name):
        return "norms"
    parts = name.split(".")
    if parts[0] == names.LM_HEAD:
        return names.LM_HEAD
    if parts[1] in (names.EMBED_TOKENS, names.EMBED_POSITIONS):
        return parts[1]
    if parts[3] == names.ATTENTION:
        return parts[4]
    if parts[4] == names.ROUTER:
        return "router"
    return "experts" if parts[4] == names.EXPERTS else "ffn"


def count(args: ModelArgs) -> dict:
    """Weights per component, in total, without embeddings, and read per decoded token."""
    parts = Counter()
    for name, shape in shapes(args).items():
        parts[component(name)] += int(np.prod(shape))
    total = sum(parts.values())
    d = args.hidden_size
    embeddings = parts[names.EMBED_TOKENS] + parts[names.EMBED_POSITIONS]
    # Batch-1 decode reads one row of each embedding table, the head (the whole
    # embedding when tied), every matrix, and only k of the n experts.
    experts_read = parts["experts"] * args.num_experts_per_tok / max(args.num_local_experts, 1)
    read = total - embeddings - parts["experts"] + experts_read + d * (1 + (names.EMBED_POSITIONS in parts))
    if args.tie_word_embeddings:
        read += parts[names.EMBED_TOKENS]
    return {
        "total": total,
        "non_embedding": total - embeddings - parts[names.LM_HEAD],
        "read_per_token": int(read),
        "components": dict(sorted(parts.items())),
    }


def block_weights(args: ModelArgs, i: int = 0) -> int:
    """The weights of block i."""
    first = names.block_key(i)
    return sum(int(np.prod(s)) for k, s in shapes(args).items() if k.startswith(first))


def compare(args: ModelArgs, reduced: ModelArgs, claim: Optional[ModelArgs] = None) -> dict:
    """Savings of `reduced` over `args`. `claim` is another reduced config whose
    count is reported beside (the paper's inexact parallel figure, say)."""
    before, after = count(args), count(reduced)
    out = {
        "vanilla": before,
        "reduced": after,
        "removed": before["total"] - after["total"],
        "removed_fraction": 1 - after["total"] / before["total"],
        # The paper's figure: the ratio of total weights.
        "speedup_paper": before["total"] / after["total"],
        # What batch-1 decode actually reads per token: every matrix, one embedding row and the
        # head; decode is bound by these bytes, so their ratio predicts the speedup.
        "speedup_predicted": before["read_per_token"] / after["read_per_token"],
    }
    if claim is not None:
        c = count(claim)
        out["claim"] = {
            "removed_fraction": 1 - c["total"] / before["total"],
            "speedup_paper": before["total"] / c["total"],
            "exact": False,
        }
    return out


def compare_plan(args: ModelArgs, plan: Sequence[str]) -> dict:
    """Savings of fusing `args` with `plan`; for parallel blocks, also the paper's
    claim (no Q and no P per block), which no exact conversion reaches."""
    from dataclasses import replace

    from .fusion import reduced_args

    claim = None
    if args.parallel_block:
        claim = replace(args, removed=[f.replace("p", "") + "p" for f in plan])
    return compare(args, reduced_args(args, plan), claim)
