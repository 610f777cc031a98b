"""One LU factorization per inverted matrix: it solves, and it gives the condition number.

numpy solves through LAPACK but keeps the factors to itself, so a solve and a
condition estimate would each factor the matrix again, and an explicit inverse
costs four times the factorization. This is LU with partial pivoting, recursive
by halves so that nearly all its work is matrix products on numpy's BLAS; the
factors then serve every solve and the condition estimate.
"""

from typing import Callable, NamedTuple, Optional

import numpy as np

PANEL = 16  # columns factored one at a time; wider panels go by halves
TRIANGLE = 64  # a triangle this small is inverted whole and multiplied


class LU(NamedTuple):
    """P·A = L·U: L (unit lower) and U (upper) share `factors`; `perm` is P as
    row indices, A[perm] = L·U. `inverses` keeps the small diagonal triangles the
    solves invert, so that repeated solves (a condition estimate's) invert each once."""

    factors: np.ndarray
    perm: np.ndarray
    inverses: dict

    @property
    def singular(self) -> bool:
        return not np.all(np.diagonal(self.factors))

    def astype(self, dtype) -> "LU":
        return LU(self.factors.astype(dtype), self.perm, {})

    def solve(self, B: np.ndarray) -> np.ndarray:
        """A⁻¹·B, in the factors' dtype, for B (n, m) or a stack (..., n, m). Laid out
        as B is (row- or column-major), so that a weight's transpose stays row-major."""
        if B.ndim > 2:
            return np.stack([self.solve(b) for b in B])
        # P·B, laid out as B is
        X = np.take(B, self.perm, axis=0) if _row_major(B) else np.take(B.T, self.perm, axis=1).T
        X = np.asarray(X, self.factors.dtype, order="K")
        _tri_solve(self.factors, X, lower=True, unit=True, inverses=self.inverses)
        _tri_solve(self.factors, X, lower=False, unit=False, inverses=self.inverses)
        return X

    def solve_transposed(self, B: np.ndarray) -> np.ndarray:
        """A⁻ᵀ·B for B (n, m): Aᵀ = Uᵀ·Lᵀ·P."""
        X = np.array(B, self.factors.dtype, order="C" if _row_major(B) else "F")
        _tri_solve(self.factors.T, X, lower=True, unit=False, inverses=self.inverses, transposed=True)
        _tri_solve(self.factors.T, X, lower=False, unit=True, inverses=self.inverses, transposed=True)
        out = np.empty_like(X)
        out[self.perm] = X
        return out


def lu_factor(A: np.ndarray) -> LU:
    """A's LU in float64 (a copy; A is kept). An exactly zero pivot leaves the
    factors `singular` instead of failing."""
    F = np.array(A, np.float64, order="C")
    with np.errstate(divide="ignore", invalid="ignore"):
        perm = _lu(F)
    return LU(F, perm, {})


def largest_singular_value(
    apply: Callable, apply_t: Callable, n: int, dtype=np.float32, iters: int = 6, block: int = 16, seed: int = 0
) -> float:
    """‖M‖₂ of an n x n M seen only through X ↦ M·X and X ↦ Mᵀ·X: block Krylov on MᵀM,
    then the largest singular value of M on the whole subspace. A lower bound, closer
    than plain power iteration twice as long: within 1.3% at n = 4096 where the top
    of the spectrum is crowded (I + noise), exact where it stands clear."""
    X = _orthonormal(np.random.default_rng(seed).standard_normal((n, block)).astype(dtype))
    basis = [X]
    for _ in range(iters):
        X = _orthonormal(apply_t(apply(X)))
        basis.append(X)
    Q = np.linalg.qr(np.concatenate(basis, axis=1))[0]
    return float(np.linalg.svd(apply(Q), compute_uv=False)[0])


def _orthonormal(Y: np.ndarray) -> np.ndarray:
    """Orthonormal columns spanning Y's, by Cholesky QR in float64: two small products.
    Householder QR of a tall, thin block is a chain of tiny BLAS calls whose threads,
    on a shared CPU, wait on each other for a hundred times the arithmetic."""
    Y64 = Y.astype(np.float64)
    try:
        L = np.linalg.cholesky(Y64.T @ Y64)
    except np.linalg.LinAlgError:  # columns (numerically) dependent
        return np.linalg.qr(Y)[0]
    return np.linalg.solve(L, Y64.T).T.astype(Y.dtype)


def _lu(A: np.ndarray) -> np.ndarray:
    """A (m x n, m ≥ n) replaced by its LU factors, rows pivoted in place; returns the
    row order. The left half is factored, the right half updated by one product, and
    the rest factored in turn."""
    n = A.shape[1]
    if n <= PANEL:
        return _panel(A)
    k = n // 2
    p1 = _lu(A[:, :k])
    _permute_rows(A[:, k:], p1)
    _tri_solve(A[:k, :k], A[:k, k:], lower=True, unit=True)
    A[k:, k:] -= A[k:, :k] @ A[:k, k:]
    p2 = _lu(A[k:, k:])
    _permute_rows(A[k:, :k], p2)
    return np.concatenate([p1[:k], p1[k:][p2]])


def _panel(A: np.ndarray) -> np.ndarray:
    """Unblocked LU of a narrow panel, worked on its transpose so each column is contiguous."""
    T = np.ascontiguousarray(A.T)
    p = np.arange(A.shape[0])
    for j in range(T.shape[0]):
        i = j + int(np.argmax(np.abs(T[j, j:])))
        if i != j:
            T[:, [j, i]] = T[:, [i, j]]
            p[[j, i]] = p[[i, j]]
        if T[j, j] != 0:  # else the whole column is zero: nothing to eliminate
            T[j, j + 1 :] /= T[j, j]
        T[j + 1 :, j + 1 :] -= np.outer(T[j + 1 :, j], T[j, j + 1 :])
    A[...] = T.T
    return p


def _permute_rows(A: np.ndarray, p: np.ndarray):
    moved = np.flatnonzero(p != np.arange(p.size))  # a panel's pivots move few rows
    A[moved] = A[p[moved]]


def _tri_solve(
    T: np.ndarray,
    X: np.ndarray,
    lower: bool,
    unit: bool,
    inverses: Optional[dict] = None,
    transposed: bool = False,
    offset: int = 0,
):
    """X ← T⁻¹·X for the triangle of T that `lower` names (unit: its diagonal taken
    as ones), by halves: the work is in products. `inverses` caches the small
    triangles inverted, by where they sit (`offset` in the whole triangle)."""
    n = T.shape[0]
    if n <= TRIANGLE:  # inverted whole: LAPACK's solve with many columns is ten times slower
        key = (transposed, lower, unit, offset)
        inverse = None if inverses is None else inverses.get(key)
        if inverse is None:
            t = np.tril(T) if lower else np.triu(T)
            if unit:
                np.fill_diagonal(t, 1.0)
            inverse = np.linalg.inv(t)
            if inverses is not None:
                inverses[key] = inverse
        X[...] = _times(inverse, X)
        return
    k = n // 2
    if lower:
        first, second, first_at, second_at = slice(None, k), slice(k, None), offset, offset + k
    else:
        first, second, first_at, second_at = slice(k, None), slice(None, k), offset + k, offset
    _tri_solve(T[first, first], X[first], lower, unit, inverses, transposed, first_at)
    X[second] -= _times(T[second, first], X[first])
    _tri_solve(T[second, second], X[second], lower, unit, inverses, transposed, second_at)


def _times(A: np.ndarray, X: np.ndarray) -> np.ndarray:
    """A·X laid out as X is (row- or column-major), so storing it into X streams."""
    return A @ X if _row_major(X) else (X.T @ A.T).T


def _row_major(X: np.ndarray) -> bool:
    return X.strides[-1] <= X.strides[-2]
