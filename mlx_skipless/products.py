"""How fusion takes the matrix products that invert nothing: in which precision, on which device."""

import mlx.core as mx
import numpy as np

from . import fusion


def mlx_matmul(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """A·B by MLX on its default device: on Apple silicon the GPU takes fusion's float32
    products, several times numpy's CPU rate (fusion.Products)."""
    return np.asarray(mx.matmul(mx.array(A), mx.array(B)))


def products_for(dtype: str, quantized: bool) -> fusion.Products:
    """How the products that invert nothing are taken for an output stored in `dtype`:
    float64 only for a float32 output; else float32, on the GPU where MLX has Metal
    (its float32 matmul is float32 throughout; elsewhere numpy's BLAS is the fast one)."""
    if dtype == "float32" and not quantized:
        return fusion.Products(np.float64)
    return fusion.Products(np.float32, mlx_matmul if mx.metal.is_available() else np.matmul)
