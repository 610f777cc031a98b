"""Move weights between the skipless model's flat tensors and fusion's `Weights`.

Flat tensors use the model's parameter names ("model.layers.3.self_attn.k_proj.weight")
and the (out, in) orientation shared by MLX and Hugging Face; `Weights` uses the
paper's (in, out). Both sides are numpy here; the caller picks the dtype.
"""

import re
from typing import Dict

import numpy as np

from .fusion import Affine, Weights
from .models.skipless import ModelArgs

LINEAR_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                 "down_proj", "fc1", "fc2", "gate"}
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def split_layer_key(key: str):
    """'model.layers.3.mlp.fc1.bias' -> (3, 'mlp.fc1', 'bias'), else None."""
    m = _LAYER_KEY.match(key)
    return (int(m[1]), m[2], m[3]) if m else None


def is_linear(path: str) -> bool:
    return path.rsplit(".", 1)[-1] in LINEAR_LEAVES


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
        has_bias = args.attention_bias if path.startswith("self_attn.") else args.mlp_bias
        if has_bias:
            out[f"{path}.bias"] = f.b
        elif np.any(f.b):
            raise ValueError(f"{path} has a nonzero bias but the config has none for it")
    return out


def weights_from_flat(flat: Dict[str, np.ndarray], args: ModelArgs) -> Weights:
    per_layer = [{} for _ in range(args.num_hidden_layers)]
    other = {}
    for key, value in flat.items():
        parts = split_layer_key(key)
        if parts:
            per_layer[parts[0]][f"{parts[1]}.{parts[2]}"] = value
        elif key not in ("model.embed_tokens.weight", "model.embed_positions.weight",
                         "lm_head.weight"):
            other[key] = value
    layers = []
    for i, tensors in enumerate(per_layer):
        linear, passed = layer_from_flat(tensors)
        layers.append(linear)
        other.update({f"model.layers.{i}.{k}": v for k, v in passed.items()})
    head = flat.get("lm_head.weight")
    return Weights(
        embed=np.asarray(flat["model.embed_tokens.weight"], np.float64),
        layers=layers,
        head=None if args.tie_word_embeddings or head is None else np.asarray(head, np.float64).T,
        positions=flat.get("model.embed_positions.weight"),
        other=other,
    )


def weights_to_flat(w: Weights, args: ModelArgs) -> Dict[str, np.ndarray]:
    flat = {"model.embed_tokens.weight": w.embed}
    if w.positions is not None:
        flat["model.embed_positions.weight"] = w.positions
    for i, layer in enumerate(w.layers):
        flat.update({f"model.layers.{i}.{k}": v for k, v in layer_to_flat(layer, args).items()})
    if not args.tie_word_embeddings:
        flat["lm_head.weight"] = w.head.T
    flat.update(w.other)
    return flat
