"""MLX's float32 matmul rate on this machine: `python scripts/gemm_rate.py` (prefix LD_PRELOAD=... to compare BLAS)."""

import time

import mlx.core as mx

n, repeats = 1024, 3
a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
mx.eval(a @ b)
start = time.perf_counter()
for _ in range(repeats):
    mx.eval(a @ b)
print(f"{2 * n**3 * repeats / (time.perf_counter() - start) / 1e9:.1f} GFLOP/s ({mx.default_device()})")
