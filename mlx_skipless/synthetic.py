"""Random, well-conditioned skipless weights, for tests and benchmarks.

Square projections are I + noise (condition number near 2), everything else is
scaled by 1/sqrt(fan_in) with a gain that keeps activations O(1) through a deep
stack without residuals, so logits can be compared to a relative 1e-5.
"""

from typing import Dict

import numpy as np

from .counting import shapes
from .models.skipless import ModelArgs


def random_flat(args: ModelArgs, seed: int = 0, noise: float = 0.3) -> Dict[str, np.ndarray]:
    """{name: float64 array}, in the (out, in) layout of MLX and Hugging Face."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes(args).items():
        leaf = name.rsplit(".", 2)[-2]
        if name.endswith(".bias"):
            w = 0.1 * rng.standard_normal(shape)
        elif "norm" in leaf:
            w = 1 + 0.1 * rng.standard_normal(shape)
        elif leaf in ("embed_tokens", "embed_positions"):
            w = rng.standard_normal(shape) * (1.0 if leaf == "embed_tokens" else 0.5)
        else:
            fan_in = shape[-1]
            gain = {"down_proj": 2**0.5, "fc2": 2**0.5, "gate": 2.0}.get(leaf, 1.0)
            w = gain * rng.standard_normal(shape) / np.sqrt(fan_in)
            if len(shape) == 2 and shape[0] == shape[1] and leaf.endswith("_proj"):
                w = np.eye(shape[0]) + noise * w
        out[name] = w
    return out
