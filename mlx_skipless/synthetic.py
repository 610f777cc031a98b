"""Random, well-conditioned skipless weights, for tests and benchmarks.

Square projections are I + noise (condition number near 2), everything else is
scaled by 1/sqrt(fan_in) with a gain that keeps activations O(1) through a deep
stack without residuals, so logits can be compared to a relative 1e-5.
"""

from typing import Dict

import numpy as np

from . import names
from .counting import shapes
from .models.skipless import ModelArgs


def random_flat(args: ModelArgs, seed: int = 0, noise: float = 0.3) -> Dict[str, np.ndarray]:
    """{name: float64 array}, in the (out, in) layout of MLX and Hugging Face."""
    rng = np.random.default_rng(seed)
    return {name: random_tensor(name, shape, rng, noise) for name, shape in shapes(args).items()}


def random_block(args: ModelArgs, rng: np.random.Generator, noise: float = 0.3, dtype=np.float64):
    """One block's weights, named relative to the block: for benchmarks that
    write or build a large model a block at a time."""
    first = names.block_key(0)
    block = {k.removeprefix(first): s for k, s in shapes(args).items() if k.startswith(first)}
    return {name: random_tensor(name, shape, rng, noise, dtype) for name, shape in block.items()}


def random_tensor(name: str, shape, rng: np.random.Generator, noise: float = 0.3, dtype=np.float64) -> np.ndarray:
    leaf = name.rsplit(".", 2)[-2]
    normal = lambda: rng.standard_normal(shape, dtype=dtype)  # noqa: E731
    if name.endswith(".bias"):
        return 0.1 * normal()
    if names.is_norm(name):
        return 1 + 0.1 * normal()
    if leaf in (names.EMBED_TOKENS, names.EMBED_POSITIONS):
        return normal() * (1.0 if leaf == names.EMBED_TOKENS else 0.5)
    fan_in = shape[-1]
    gain = {names.DOWN: 2**0.5, names.FC2: 2**0.5, names.ROUTER: 2.0}.get(leaf, 1.0)
    w = gain * normal() / np.sqrt(fan_in)
    if len(shape) == 2 and shape[0] == shape[1] and leaf.endswith("_proj"):
        w = np.eye(shape[0], dtype=dtype) + noise * w
    return w.astype(dtype, copy=False)
