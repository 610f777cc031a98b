"""The fusion maths: vanilla skipless weights -> reduced weights.

Everything here is in the paper's orientation (row vectors, y = x·W + b, W is
in x out) and is pure numpy: no MLX, no files; a config is read only for its
fields. `layout.py` moves weights between this form and MLX/Hugging Face tensors.

Precision goes where conditioning amplifies error: every factorization of a
matrix to invert, and every solve with one, is taken in float64. The products
that invert nothing (P into the FFN inputs, the next block's basis into the FFN
output, the embedding) are taken as `Products` say: in float64 for a float32
output, in float32 (accumulating inputs that are themselves bf16/f16 values)
when the output is stored coarser than that, by numpy or by a matrix multiply
the caller hands in (an accelerator's).

One mechanism covers every form. Block i may choose a *basis* T_i, the affine
map x -> x·B + c of one of its square projections (Q, K or V). The previous
block (or the embedding) then emits x·B + c directly, and every map that read x
inside block i reads it through T_i⁻¹ instead. In a serial block the attention
output projection P also folds forward into the FFN input matrices (M* = P·M).
"""

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .linalg import LU, largest_singular_value, lu_factor
from .names import ATTN_IN, ATTN_OUT, FFN_IN_LEAVES, FFN_OUT_LEAVES, attention, is_ffn, leaf, projection

if TYPE_CHECKING:  # only its fields are read: fusion runs without MLX
    from .models.skipless import ModelArgs

# Past this, float64 itself cannot invert the matrix meaningfully.
SINGULAR_COND = 1 / np.finfo(np.float64).eps
# Up to this size a condition number is the SVD's; above, an estimate from the factors.
EXACT_COND_SIZE = 1024
# Below this the estimate of ‖B⁻¹‖ runs on float32 copies of the factors (their rounding
# moves it by cond·2⁻²⁴ at most); above it, on the float64 factors themselves.
FLOAT32_COND = 1e4


class FusionError(ValueError):
    """A fusion that cannot be done exactly; the message names layer and matrix."""


class Products(NamedTuple):
    """How the products that invert nothing are taken: in `dtype`, by `matmul`."""

    dtype: type = np.float64
    matmul: Callable[[np.ndarray, np.ndarray], np.ndarray] = np.matmul


class Affine(NamedTuple):
    """x -> x·W + b. W is (..., in, out): a leading axis stacks MoE experts."""

    W: np.ndarray
    b: np.ndarray

    @classmethod
    def linear(cls, W, b=None, dtype=np.float64):
        """W in `dtype`; the bias, small, always in float64."""
        W = np.asarray(W, dtype=dtype)
        b = np.zeros(W.shape[:-2] + W.shape[-1:]) if b is None else np.asarray(b, np.float64)
        return cls(W, b)

    def then(self, other: "Affine", products: Products = Products()) -> "Affine":
        """x -> other(self(x)), the products (the bias's too) taken as `products` say."""
        M = np.asarray(other.W, products.dtype)
        return Affine(
            _product(np.asarray(self.W, products.dtype), M, products.matmul), _rowvec_times(self.b, M) + other.b
        )

    def after_inverse_of(self, basis: "Basis") -> "Affine":
        """x̃ -> self(basis⁻¹(x̃)): self, for an input that arrives as x·B + c.

        B⁻¹·W is solved in float64 from the factorization that also gave the
        condition number: one per basis, no inverse formed."""
        c = basis.map.b
        W = basis.lu.solve(self.W)
        return Affine(W, self.b - _rowvec_times(c, W))


class Basis(NamedTuple):
    """The change of basis a block takes: its map x -> x·B + c, B's LU factors in
    float64, and the report entry (layer, matrix, condition number)."""

    map: Affine
    lu: LU
    inverted: "InvertedMatrix"


def _product(A: np.ndarray, B: np.ndarray, matmul=np.matmul) -> np.ndarray:
    """A·B, computed as (Bᵀ·Aᵀ)ᵀ: the same products, but laid out so that the weight
    (the transpose, as checkpoints hold it) is row-major, and storing it copies nothing."""
    return np.swapaxes(matmul(np.swapaxes(B, -1, -2), np.swapaxes(A, -1, -2)), -1, -2)


def _rowvec_times(b: np.ndarray, W: np.ndarray) -> np.ndarray:
    """b·W in float64, taken in W's dtype: a float64 copy of an FFN matrix for a bias
    (usually zero) would cost more than the product it serves."""
    if not np.any(b):
        return np.zeros(np.broadcast_shapes(b.shape[:-1], W.shape[:-2]) + W.shape[-1:])
    return (b.astype(W.dtype)[..., None, :] @ W)[..., 0, :].astype(np.float64)


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


def default_plan(args: "ModelArgs", remove: str = "q") -> List[str]:
    """The target `removed` list when every layer drops `remove` ("q", "k",
    "v", or "" for none): serial blocks also lose P where that saves weights."""
    return [remove + ("p" if merges_p(args) else "")] * args.num_hidden_layers


def merges_p(args: "ModelArgs") -> bool:
    # P·M has e×f entries; it replaces P (e×d) and M (d×f) with fewer only when e <= d.
    e = args.num_attention_heads * args.head_dim
    return not args.parallel_block and e <= args.hidden_size


def reduced_args(args: "ModelArgs", plan: Sequence[str]) -> "ModelArgs":
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


def check_fusable(args: "ModelArgs"):
    if args.residual or args.block_norm:
        raise FusionError(
            "fusion needs a skipless model: this config has "
            + ("residual adds" if args.residual else f"{args.block_norm} inside its blocks")
            + ", and a matrix cannot move across either without changing the function. "
            "Remove them first: python -m mlx_skipless.normfree (the norm-removal recipe)"
        )
    if any(args.removed):
        raise FusionError("fusion starts from a vanilla model; this one is already reduced")


def fuse(weights: Weights, args: "ModelArgs", plan: Sequence[str], products: Products = Products()):
    """Return (reduced Weights, reduced ModelArgs, [InvertedMatrix]) for `plan`,
    the target `removed` form of every layer; products that invert nothing as
    `products` say."""
    new_args = reduced_args(args, plan)
    chosen = {}

    def choose(i, layer):
        if i not in chosen:
            chosen[i] = (plan[i], basis_of(layer, plan[i], i))
        return chosen[i]

    fused = list(fuse_layers(weights.layers.__getitem__, len(plan), choose, args.parallel_block, products))
    out = replace(weights, layers=[layer for _, _, _, layer in fused])
    out.embed, out.positions, out.head = fuse_embeddings(
        weights.embed, weights.positions, weights.head, choose(0, weights.layers[0])[1], products=products
    )
    return out, new_args, [basis.inverted for _, _, basis, _ in fused if basis is not None]


Choice = Tuple[str, Optional[Basis]]


def fuse_layers(
    read_layer: Callable[[int], Dict[str, Affine]],
    n_layers: int,
    choose: Callable[[int, Dict[str, Affine]], Choice],
    parallel: bool,
    products: Products = Products(),
):
    """Yield (original block i, its form, its Basis or None, fused block i) in order.

    `choose(i, block)` gives block i's form and basis once block i is read, so a
    plan may depend on what the blocks hold (condition numbers) and each block is
    read once. Block i needs only block i+1's basis: two blocks are held at once."""
    current = read_layer(0)
    form, basis = choose(0, current)
    for i in range(n_layers):
        upcoming = read_layer(i + 1) if i + 1 < n_layers else None
        nxt_form, nxt_basis = choose(i + 1, upcoming) if upcoming is not None else ("", None)
        fused = fuse_block(current, form, basis, parallel, nxt_basis, products)
        yield current, form, basis, fused
        current, form, basis = upcoming, nxt_form, nxt_basis


def fuse_embeddings(embed, positions, head, basis: Optional[Basis], rows: int = 4096, products: Products = Products()):
    """(embed, positions, head) once the first block's basis is absorbed.

    Products are taken as `products` say, a few thousand rows at a time, and kept
    in the embedding's own dtype: a vocabulary-sized float64 copy is the largest
    thing a conversion would otherwise hold."""
    if basis is None:
        return embed, positions, head
    if head is None:
        head = embed.T  # a tied head keeps the original embedding
    dtype, matmul = products
    B, c = np.asarray(basis.map.W, dtype), basis.map.b.astype(dtype)
    fused = np.empty((embed.shape[0], B.shape[1]), embed.dtype)
    for i in range(0, embed.shape[0], rows):
        # every token gets one row: the bias is added once
        fused[i : i + rows] = matmul(np.asarray(embed[i : i + rows], dtype), B) + c
    if positions is not None:
        positions = matmul(np.asarray(positions, dtype), B)
    return fused, positions, head


def condition_number(W: np.ndarray, lu: Optional[LU] = None) -> float:
    """Largest over smallest singular value: how much an inverse can amplify error.

    The SVD's figure up to EXACT_COND_SIZE; above, given W's LU factors,
    ‖W‖₂·‖W⁻¹‖₂, each by a few block Krylov steps (largest_singular_value): W⁻¹
    is applied by triangular solves with the factors, a fraction of the work of an
    SVD or an inverse. It approaches the SVD's figure from below; within 2% on the
    matrices tested (random ones at d 2048 and 4096, SmolLM2-135M's thirty trained Q,
    cond 2e3 to 1e5, to 0.01%)."""
    if lu is None or W.shape[-1] <= EXACT_COND_SIZE:
        s = np.linalg.svd(np.asarray(W, np.float64), compute_uv=False)
        return float(s[0] / s[-1]) if s[-1] > 0 else float("inf")
    if lu.singular:
        return float("inf")
    W32 = np.asarray(W, np.float32)
    norm = largest_singular_value(lambda X: W32 @ X, lambda Y: W32.T @ Y, W.shape[-1])

    def inverse_norm(f: LU) -> float:
        return largest_singular_value(f.solve, f.solve_transposed, W.shape[-1], f.factors.dtype)

    with np.errstate(all="ignore"):  # an overflow is an infinite condition number
        cond = norm * inverse_norm(lu.astype(np.float32))
        if not cond <= FLOAT32_COND:  # float32 factors would blur it: the float64 ones decide
            cond = norm * inverse_norm(lu)
    return cond if np.isfinite(cond) else float("inf")


def factor_and_condition(W: np.ndarray) -> Tuple[LU, float]:
    """(W's LU in float64, cond(W)): one factorization, which also gives the
    condition number the converter reports (infinite where W is exactly singular)."""
    lu = lu_factor(W)
    return lu, condition_number(W, lu)


def square_projections(args: "ModelArgs") -> List[str]:
    """Which of "q", "k", "v" are square, so can move into the previous block."""
    d, hd = args.hidden_size, args.head_dim
    widths = {
        "q": args.num_attention_heads * hd,
        "k": args.num_key_value_heads * hd,
        "v": args.num_key_value_heads * hd,
    }
    return [n for n, w in widths.items() if w == d]


def basis_of(layer: Dict[str, Affine], form: str, index: int, check: bool = True) -> Optional[Basis]:
    """The Basis of the projection `form` removes, or None: one float64
    factorization, from which the condition number comes too. FusionError if it
    is singular, unless `check` is off (a planner weighing candidates)."""
    name = form.replace("p", "")
    if not name:
        return None
    key = attention(name)
    B = layer[key]
    lu, cond = factor_and_condition(B.W)
    if check and cond > SINGULAR_COND:
        raise FusionError(
            f"layer {index}: {key} is singular (condition number {cond:.3g}); "
            "it cannot be removed. Keep it in this layer (plan entry without "
            f"{name!r}) or use --remove auto"
        )
    return Basis(B, lu, InvertedMatrix(index, projection(name), cond))


def fuse_block(
    layer: Dict[str, Affine],
    form: str,
    basis: Optional[Basis],
    parallel: bool,
    nxt: Optional[Basis],
    products: Products = Products(),
):
    """One block: read the input through this block's `basis` (that of the matrix
    `form` removes), drop P if the form says so, and emit the next block's basis
    `nxt` (None: emit x itself)."""
    new = dict(layer)
    ffn_in = [k for k in layer if is_ffn(k) and leaf(k) in FFN_IN_LEAVES]
    ffn_out = [k for k in layer if is_ffn(k) and leaf(k) in FFN_OUT_LEAVES]

    name = form.replace("p", "")
    if name:
        del new[attention(name)]
        readers = [k for k in ATTN_IN if k in new] + (ffn_in if parallel else [])
        for k in readers:
            new[k] = layer[k].after_inverse_of(basis)

    if "p" in form:
        P = new.pop(ATTN_OUT)
        for k in ffn_in:
            new[k] = P.then(new[k], products)

    if nxt is not None:
        linear_part = Affine(nxt.map.W, np.zeros_like(nxt.map.b))
        for k in ffn_out:
            # MoE: the experts' weights sum to one, so each may carry the bias c.
            new[k] = new[k].then(nxt.map if not parallel else linear_part, products)
        if parallel:  # attention and FFN outputs are summed: add c once
            new[ATTN_OUT] = new[ATTN_OUT].then(nxt.map, products)
    return new
