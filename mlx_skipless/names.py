"""The skipless model's weight names, spelled once.

They are the parameter names of `models/skipless.py`, whose attributes carry
them mlx-lm style; that file stands alone (it is copied next to converted
weights), so it spells them itself, and every other module takes them from
here. A weight inside block i is `block_key(i, path)`, its path relative to
the block (`Q` + ".weight" is "self_attn.q_proj.weight"). Pure Python: fusion
imports it without MLX.
"""

import re

# Modules, as the model's attributes name them.
EMBED_TOKENS, EMBED_POSITIONS, FINAL_NORM, LM_HEAD = "embed_tokens", "embed_positions", "norm", "lm_head"
ATTENTION, MLP = "self_attn", "mlp"
EXPERTS, ROUTER = "switch_mlp", "gate"  # a MoE FFN's stacked experts and its router
INPUT_NORM, FFN_NORM = "input_layernorm", "post_attention_layernorm"  # the norms a block may hold
BLOCK_NORMS = (INPUT_NORM, FFN_NORM)
GATE, UP, DOWN = "gate_proj", "up_proj", "down_proj"  # a GLU FFN
FC1, FC2 = "fc1", "fc2"  # a plain FFN
SHAPED = ("alpha", "beta", "gamma")  # shaped attention's per-head scalars

# Whole-model tensors.
EMBED = f"model.{EMBED_TOKENS}.weight"
POSITIONS = f"model.{EMBED_POSITIONS}.weight"
HEAD = f"{LM_HEAD}.weight"
FINAL_NORM_PREFIX = f"model.{FINAL_NORM}."
BLOCKS = "model.layers."
GLOBALS = (EMBED, POSITIONS, HEAD)


def block_key(i: int, path: str = "") -> str:
    """The full name of `path` inside block i: block_key(3, Q + ".weight")."""
    return f"{BLOCKS}{i}.{path}"


def projection(m: str) -> str:
    """The attention leaf of "q", "k", "v" or "o": "q_proj"."""
    return f"{m}_proj"


def attention(m: str) -> str:
    """The path in a block of attention projection "q", "k", "v" or "o": "self_attn.q_proj"."""
    return f"{ATTENTION}.{projection(m)}"


def ffn(leaf: str, experts: bool = False) -> str:
    """The path in a block of an FFN matrix: ffn(DOWN) is "mlp.down_proj", in a MoE's experts
    "mlp.switch_mlp.down_proj"."""
    return f"{MLP}.{EXPERTS}.{leaf}" if experts else f"{MLP}.{leaf}"


Q, K, V, O = (attention(m) for m in "qkvo")
ATTN_IN = (Q, K, V)  # the maps that read a block's input
ATTN_OUT = O  # P, the attention output projection
ATTN_LEAVES = tuple(projection(m) for m in "qkvo")

# FFN matrices by leaf: dense and expert FFNs share them; the router reads the FFN's input too.
FFN_IN_LEAVES = (GATE, UP, FC1, ROUTER)
FFN_OUT_LEAVES = (DOWN, FC2)
LINEAR_LEAVES = frozenset(ATTN_LEAVES + FFN_IN_LEAVES + FFN_OUT_LEAVES)
# ... and by path in a block, every form an FFN takes.
FFN_INPUTS = tuple(map(ffn, FFN_IN_LEAVES)) + tuple(ffn(leaf, experts=True) for leaf in (GATE, UP, FC1))
FFN_OUTPUTS = tuple(map(ffn, FFN_OUT_LEAVES)) + tuple(ffn(leaf, experts=True) for leaf in FFN_OUT_LEAVES)

_BLOCK_KEY = re.compile(re.escape(BLOCKS) + r"(\d+)\.(.+)\.(weight|bias)$")


def split_block_key(key: str):
    """'model.layers.3.mlp.fc1.bias' -> (3, 'mlp.fc1', 'bias'), else None."""
    m = _BLOCK_KEY.match(key)
    return (int(m[1]), m[2], m[3]) if m else None


def leaf(path: str) -> str:
    """The module a path ends in: 'mlp.switch_mlp.down_proj' -> 'down_proj'."""
    return path.rsplit(".", 1)[-1]


def is_attention(path: str) -> bool:
    """Whether a path in a block is in its attention."""
    return path.startswith(ATTENTION + ".")


def is_ffn(path: str) -> bool:
    """Whether a path in a block is in its FFN."""
    return path.startswith(MLP + ".")


def is_norm(key: str) -> bool:
    """Whether a weight (full name or path in a block) belongs to a norm."""
    return any(part in BLOCK_NORMS for part in key.split(".")) or key.startswith(FINAL_NORM_PREFIX)
