"""What removing Q costs in linear algebra, per layer: one LU factorization of Q, K and V
solved with it, and the condition number from the same factors (mlx_skipless.linalg),
beside what the converter did before, an explicit float64 inverse and K, V multiplied by it.

    python scripts/bench_linalg.py                      # Mistral-7B's shapes: Q 4096, K and V 1024 rows
    OPENBLAS_NUM_THREADS=1 python scripts/bench_linalg.py --d 2048 --kv 256
"""

import argparse
import time

import numpy as np

from mlx_skipless import fusion, linalg


def timed(f):
    t = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=4096, help="Q is d x d")
    p.add_argument("--kv", type=int, default=1024, help="rows of K and of V")
    p.add_argument("--repeats", type=int, default=2)
    o = p.parse_args()
    rng = np.random.default_rng(0)
    Q = np.eye(o.d) + rng.standard_normal((o.d, o.d)) / np.sqrt(o.d)  # paper orientation, as fusion holds it
    K, V = (np.asfortranarray(rng.standard_normal((o.d, o.kv)).astype(np.float32)) for _ in range(2))
    for _ in range(o.repeats):
        lu, factor = timed(lambda: linalg.lu_factor(Q))
        _, solve = timed(lambda: (lu.solve(K), lu.solve(V)))
        _, cond = timed(lambda: fusion.condition_number(Q, lu))
        inverse, invert = timed(lambda: np.linalg.inv(Q))
        _, product = timed(lambda: (inverse @ K.astype(np.float64), inverse @ V.astype(np.float64)))
        print(
            f"LU: factor {factor:.2f} s, solve K and V {solve:.2f} s, condition number {cond:.2f} s, "
            f"together {factor + solve + cond:.2f} s | before: inverse {invert:.2f} s, "
            f"K and V times it {product:.2f} s, together {invert + product:.2f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
