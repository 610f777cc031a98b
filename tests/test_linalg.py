"""The LU factorization that fusion solves with: against LAPACK in float64."""

import numpy as np
import pytest

from mlx_skipless import linalg


@pytest.mark.parametrize("n", [1, 7, 16, 97, 200])
def test_factors_reproduce_the_matrix_with_partial_pivoting(n):
    A = np.random.default_rng(n).standard_normal((n, n))
    lu = linalg.lu_factor(A)
    L = np.tril(lu.factors, -1) + np.eye(n)
    U = np.triu(lu.factors)
    assert sorted(lu.perm) == list(range(n)) and np.abs(L).max() <= 1.0  # pivoting bounds L
    np.testing.assert_allclose(L @ U, A[lu.perm], rtol=0, atol=1e-12 * n)
    assert not lu.singular


@pytest.mark.parametrize("n", [5, 150])
@pytest.mark.parametrize("layout", ["C", "F", "stack"])
def test_solves_match_lapack_and_keep_the_layout(n, layout):
    rng = np.random.default_rng(0)
    A = np.eye(n) + rng.standard_normal((n, n)) / np.sqrt(n)
    B = rng.standard_normal((3, n, 70) if layout == "stack" else (n, 70)).astype(np.float32)
    if layout == "F":
        B = np.asfortranarray(B)
    lu = linalg.lu_factor(A)
    X = lu.solve(B)
    assert X.dtype == np.float64 and X.shape == B.shape
    np.testing.assert_allclose(X, np.linalg.solve(A, B.astype(np.float64)), rtol=0, atol=1e-11)
    if layout != "stack":
        assert X.flags.f_contiguous == (layout == "F") and X.flags.c_contiguous == (layout == "C")
        Y = lu.solve_transposed(B)
        np.testing.assert_allclose(Y, np.linalg.solve(A.T, B.astype(np.float64)), rtol=0, atol=1e-11)
        # again, from the small triangles the first solves inverted and kept
        assert lu.inverses and np.array_equal(lu.solve(B), X) and np.array_equal(lu.solve_transposed(B), Y)
    assert A.flags.c_contiguous and np.array_equal(A, A)  # the matrix itself is kept


def test_a_zero_pivot_marks_the_factors_singular():
    A = np.random.default_rng(0).standard_normal((40, 40))
    A[:, 3] = 2 * A[:, 1]
    A[:, 1] = 0
    with np.errstate(all="raise"):  # nothing divides by zero on the way
        assert linalg.lu_factor(A).singular


def test_largest_singular_value_of_an_operator():
    rng = np.random.default_rng(0)
    M = rng.standard_normal((300, 300)) @ np.diag(np.linspace(1, 3, 300))
    estimate = linalg.largest_singular_value(lambda X: M @ X, lambda Y: M.T @ Y, 300, np.float64)
    exact = np.linalg.svd(M, compute_uv=False)[0]
    assert estimate <= exact * (1 + 1e-12) and estimate == pytest.approx(exact, rel=0.03)
