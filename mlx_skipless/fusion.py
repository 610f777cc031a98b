"""The fusion maths: vanilla skipless weights -> reduced weights, in float64.

Everything here is in the paper's orientation (row vectors, y = x·W + b, W is
in x out) and is pure numpy: no MLX, no files. `layout.py` moves weights between
this form and MLX/Hugging Face tensors.

One mechanism covers every form. Block i may choose a *basis* T_i, the affine
map x -> x·B + c of one of its square projections (Q, K or V). The previous
block (or the embedding) then emits x·B + c directly, and every map that read x
inside block i reads it through T_i⁻¹ instead. In a serial block the attention
output projection P also folds forward into the FFN input matrices (M* = P·M).
"""

from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from .models.skipless import ModelArgs

ATTN_IN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
ATTN_OUT = "self_attn.o_proj"
FFN_IN_LEAVES = ("gate_proj", "up_proj", "fc1", "gate")  # "gate" is the MoE router
FFN_OUT_LEAVES = ("down_proj", "fc2")

# Past this, float64 itself cannot invert the matrix meaningfully.
SINGULAR_COND = 1 / np.finfo(np.float64).eps


class FusionError(ValueError):
    """A fusion that cannot be done exactly; the message names layer and matrix."""


class Affine(NamedTuple):
    """x -> x·W + b. W is (..., in, out): a leading axis stacks MoE experts."""

    W: np.ndarray
    b: np.ndarray

    @classmethod
    def linear(cls, W, b=None):
        W = np.asarray(W, dtype=np.float64)
        b = np.zeros(W.shape[:-2] + W.shape[-1:]) if b is None else np.asarray(b, np.float64)
        return cls(W, b)

    def then(self, other: "Affine") -> "Affine":
        """x -> other(self(x))."""
        return Affine(self.W @ other.W, _rowvec_times(self.b, other.W) + other.b)

    def after_inverse_of(self, basis: "Affine") -> "Affine":
        """x̃ -> self(basis⁻¹(x̃)): self, for an input that arrives as x·B + c.

        A solve, not an explicit inverse: it is the more accurate of the two."""
        B, c = basis.W, basis.b
        stacked = np.moveaxis(self.W, -2, 0)  # (in, ..., out): one right-hand side
        W = np.linalg.solve(B, stacked.reshape(B.shape[0], -1))
        W = np.moveaxis(W.reshape(stacked.shape), 0, -2)
        return Affine(W, self.b - _rowvec_times(c, W))


def _rowvec_times(b: np.ndarray, W: np.ndarray) -> np.ndarray:
    return (b[..., None, :] @ W)[..., 0, :]


@dataclass
class Weights:
    """A whole model in the paper's orientation.

    layers[i] maps a module path inside block i (e.g. "self_attn.q_proj",
    "mlp.switch_mlp.down_proj") to its Affine; other[i] holds what fusion
    passes through untouched (norm gains, say)."""

    embed: np.ndarray  # (vocab, d): one row per token
    layers: List[Dict[str, Affine]]
    head: Optional[np.ndarray] = None  # (d, vocab); None: tied to the embedding
    positions: Optional[np.ndarray] = None  # (max_positions, d)
    other: Dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class InvertedMatrix:
    layer: int
    matrix: str  # "q_proj", "k_proj" or "v_proj"
    cond: float


def default_plan(args: ModelArgs, remove: str = "q") -> List[str]:
    """The target `removed` list when every layer drops `remove` ("q", "k",
    "v", or "" for none): serial blocks also lose P where that saves weights."""
    return [remove + ("p" if merges_p(args) else "")] * args.num_hidden_layers


def merges_p(args: ModelArgs) -> bool:
    # P·M has e×f entries; it replaces P (e×d) and M (d×f) with fewer only when e <= d.
    e = args.num_attention_heads * args.head_dim
    return not args.parallel_block and e <= args.hidden_size


def reduced_args(args: ModelArgs, plan: Sequence[str]) -> ModelArgs:
    """The config of the model that `fuse(…, plan)` produces; ValueError if illegal."""
    check_fusable(args)
    for i, form in enumerate(plan):
        if "p" in form and args.parallel_block:
            raise FusionError(
                f"layer {i}: a parallel block cannot lose P exactly (one change of "
                "basis per block boundary); the no-Q-and-no-P parallel block is a "
                "different model, to be trained, not converted to"
            )
    return replace(
        args,
        removed=list(plan),
        # The embedding absorbs the first basis, so a tied head must untie.
        tie_word_embeddings=args.tie_word_embeddings and not plan[0].replace("p", ""),
        # Attention biases flow into FFN biases (b_P·M, and the next block's b_q).
        mlp_bias=args.mlp_bias or (args.attention_bias and any(plan)),
    )


def check_fusable(args: ModelArgs):
    if args.residual or args.block_norm:
        raise FusionError(
            "fusion needs a skipless model: this config has "
            + ("residual adds" if args.residual else f"{args.block_norm} inside its blocks")
            + ", and a matrix cannot move across either without changing the function. "
            "Remove them first: python -m mlx_skipless.normfree (the norm-removal recipe)"
        )
    if any(args.removed):
        raise FusionError("fusion starts from a vanilla model; this one is already reduced")


def fuse(weights: Weights, args: ModelArgs, plan: Sequence[str]):
    """Return (reduced Weights, reduced ModelArgs, [InvertedMatrix]) for `plan`,
    the target `removed` form of every layer."""
    new_args = reduced_args(args, plan)
    fused = list(fuse_layers(weights.layers.__getitem__, plan, args.parallel_block))
    first = basis_of(weights.layers[0], plan[0], 0)
    out = replace(weights, layers=[layer for _, layer, _ in fused])
    out.embed, out.positions, out.head = fuse_embeddings(
        weights.embed, weights.positions, weights.head, first and first[0]
    )
    return out, new_args, [m for _, _, m in fused if m is not None]


def fuse_layers(read_layer: Callable[[int], Dict[str, Affine]], plan: Sequence[str], parallel: bool):
    """Yield (original block i, fused block i, its InvertedMatrix or None) in
    order. Block i needs only block i+1's basis: two blocks are held at once."""
    current = read_layer(0)
    basis = basis_of(current, plan[0], 0)
    for i in range(len(plan)):
        upcoming = read_layer(i + 1) if i + 1 < len(plan) else None
        upcoming_basis = basis_of(upcoming, plan[i + 1], i + 1) if upcoming else None
        fused = fuse_block(current, plan[i], parallel, upcoming_basis and upcoming_basis[0])
        yield current, fused, basis and basis[1]
        current, basis = upcoming, upcoming_basis


def fuse_embeddings(embed, positions, head, basis: Optional[Affine], rows: int = 4096):
    """(embed, positions, head) once the first block's basis is absorbed.

    Products are taken in float64 a few thousand rows at a time and kept in the
    embedding's own dtype: a vocabulary-sized float64 copy is the largest thing
    a conversion would otherwise hold."""
    if basis is None:
        return embed, positions, head
    if head is None:
        head = embed.T  # a tied head keeps the original embedding
    fused = np.empty((embed.shape[0], basis.W.shape[1]), embed.dtype)
    for i in range(0, embed.shape[0], rows):
        # every token gets one row: the bias is added once
        fused[i : i + rows] = np.asarray(embed[i : i + rows], np.float64) @ basis.W + basis.b
    if positions is not None:
        positions = np.asarray(positions, np.float64) @ basis.W
    return fused, positions, head


def condition_number(W: np.ndarray) -> float:
    """Largest over smallest singular value: how much an inverse can amplify error."""
    s = np.linalg.svd(W, compute_uv=False)
    return float(s[0] / s[-1]) if s[-1] > 0 else float("inf")


def square_projections(args: ModelArgs) -> List[str]:
    """Which of "q", "k", "v" are square, so can move into the previous block."""
    d, hd = args.hidden_size, args.head_dim
    widths = {"q": args.num_attention_heads * hd, "k": args.num_key_value_heads * hd,
              "v": args.num_key_value_heads * hd}
    return [n for n, w in widths.items() if w == d]


def basis_of(layer: Dict[str, Affine], form: str, index: int):
    """(Affine basis, InvertedMatrix) of the projection `form` removes, or None."""
    name = form.replace("p", "")
    if not name:
        return None
    key = f"self_attn.{name}_proj"
    basis = layer[key]
    cond = condition_number(basis.W)
    if cond > SINGULAR_COND:
        raise FusionError(
            f"layer {index}: {key} is singular (condition number {cond:.3g}); "
            "it cannot be removed. Keep it in this layer (plan entry without "
            f"{name!r}) or use --remove auto"
        )
    return basis, InvertedMatrix(index, f"{name}_proj", cond)


def fuse_block(layer: Dict[str, Affine], form: str, parallel: bool, nxt: Optional[Affine]):
    """One block: read the input through this block's basis, drop P if the form
    says so, and emit the next block's basis `nxt` (None: emit x itself)."""
    new = dict(layer)
    ffn_in = [k for k in layer if k.startswith("mlp.") and k.rsplit(".", 1)[1] in FFN_IN_LEAVES]
    ffn_out = [k for k in layer if k.startswith("mlp.") and k.rsplit(".", 1)[1] in FFN_OUT_LEAVES]

    name = form.replace("p", "")
    if name:
        basis = new.pop(f"self_attn.{name}_proj")
        readers = [k for k in ATTN_IN if k in new] + (ffn_in if parallel else [])
        for k in readers:
            new[k] = layer[k].after_inverse_of(basis)

    if "p" in form:
        P = new.pop(ATTN_OUT)
        for k in ffn_in:
            new[k] = P.then(new[k])

    if nxt is not None:
        linear_part = Affine(nxt.W, np.zeros_like(nxt.b))
        for k in ffn_out:
            # MoE: the experts' weights sum to one, so each may carry the bias c.
            new[k] = new[k].then(nxt if not parallel else linear_part)
        if parallel:  # attention and FFN outputs are summed: add c once
            new[ATTN_OUT] = new[ATTN_OUT].then(nxt)
    return new
