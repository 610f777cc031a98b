"""Weight orientation: move weights between the skipless model's flat tensors and fusion's `Weights`.

Flat tensors use the model's parameter names (names.py) and the (out, in)
orientation shared by MLX and Hugging Face; `Weights` uses the paper's (in, out).
Both sides are numpy here; the caller picks the dtype. Files on disk are modeldir.py's.
"""

from typing import Dict

import numpy as np

from . import names
from .fusion import Affine, Weights
from .models.skipless import ModelArgs


def is_linear(path: str) -> bool:
    return names.leaf(path) in names.LINEAR_LEAVES


def layer_from_flat(tensors: Dict[str, np.ndarray], dtype=np.float64):
    """{path.weight|bias: array} of one block -> ({path: Affine}, {key: array} passed through),
    the matrices in `dtype`."""
    linear, other = {}, {}
    for key, value in tensors.items():
        path, kind = key.rsplit(".", 1)
        if is_linear(path):
            if kind == "weight":
                linear[path] = Affine.linear(np.swapaxes(value, -1, -2), tensors.get(f"{path}.bias"), dtype)
        else:
            other[key] = value
    return linear, other


def layer_to_flat(layer: Dict[str, Affine], args: ModelArgs) -> Dict[str, np.ndarray]:
    """The inverse of layer_from_flat, with biases where `args` says the model has them."""
    out = {}
    for path, f in layer.items():
        out[f"{path}.weight"] = np.swapaxes(f.W, -1, -2)
        has_bias = args.attention_bias if names.is_attention(path) else args.mlp_bias
        if has_bias:
            out[f"{path}.bias"] = f.b
        elif np.any(f.b):
            raise ValueError(f"{path} has a nonzero bias but the config has none for it")
    return out


def weights_from_flat(flat: Dict[str, np.ndarray], args: ModelArgs) -> Weights:
    per_layer = [{} for _ in range(args.num_hidden_layers)]
    other = {}
    for key, value in flat.items():
        parts = names.split_block_key(key)
        if parts:
            per_layer[parts[0]][f"{parts[1]}.{parts[2]}"] = value
        elif key not in names.GLOBALS:
            other[key] = value
    layers = []
    for i, tensors in enumerate(per_layer):
        linear, passed = layer_from_flat(tensors)
        layers.append(linear)
        other.update({names.block_key(i, k): v for k, v in passed.items()})
    head = flat.get(names.HEAD)
    return Weights(
        embed=np.asarray(flat[names.EMBED], np.float64),
        layers=layers,
        head=None if args.tie_word_embeddings or head is None else np.asarray(head, np.float64).T,
        positions=flat.get(names.POSITIONS),
        other=other,
    )


def weights_to_flat(w: Weights, args: ModelArgs) -> Dict[str, np.ndarray]:
    flat = {names.EMBED: w.embed}
    if w.positions is not None:
        flat[names.POSITIONS] = w.positions
    for i, layer in enumerate(w.layers):
        flat.update({names.block_key(i, k): v for k, v in layer_to_flat(layer, args).items()})
    if not args.tie_word_embeddings:
        flat[names.HEAD] = w.head.T
    flat.update(w.other)
    return flat
