"""The model configs the comparison experiments train: one d x layers shape in each block form.

The shape is the demo's: GLU 3d, heads of 64, RoPE, RMSNorm, untied head. Two experiments
train it: skipless against standard at equal settings (`kind_config`), and every block form
at equal settings (`form_config`), so that their figures describe the same models.
"""

import math

from . import counting
from .models.skipless import ModelArgs

KINDS = {
    "skipless": dict(residual=False, shaped_attention=True),
    "standard": dict(residual=True, shaped_attention=False),
}

WITH_SKIPS = dict(residual=True, block_norm="rmsnorm")
# each form's model fields, and the train flags it was published with
FORMS = {
    "standard": (WITH_SKIPS, {}),
    "wq-identity": ({**WITH_SKIPS, "removed": "q"}, {"weight_decay": 2**-5}),
    "figure-4": ({**WITH_SKIPS, "removed": "qp"}, {}),
    "figure-4-parallel": ({**WITH_SKIPS, "removed": "qp", "parallel_block": True}, {}),
    "figure-4-wide": ({**WITH_SKIPS, "removed": "qp"}, {}),
    "skipless": (dict(shaped_attention=True, block_norm="rmsnorm"), {}),
}
Q_GROUP = 32  # the 4-bit copies' group size: every width here is a multiple of it


def dims(size: str) -> dict:
    """The shape's sizes at d x layers (a "256x4" string): GLU 3d, heads of 64."""
    d, layers = (int(v) for v in size.split("x"))
    return dict(hidden_size=d, num_hidden_layers=layers, intermediate_size=3 * d, num_attention_heads=max(1, d // 64))


def kind_config(size: str, kind: str) -> dict:
    """d x L of `kind` (KINDS), with RMSNorm pre-norms and a final norm."""
    return dict(
        **dims(size),
        mlp_type="glu",
        hidden_act="silu",
        position_embedding_type="rope",
        block_norm="rmsnorm",
        final_norm="rmsnorm",
        tie_word_embeddings=False,
        **KINDS[kind],
    )


def form_config(size: str, form: str, vocab: int) -> dict:
    """d x L in `form` (FORMS), with a `vocab`-token head."""
    model, _ = FORMS[form]
    base = dict(
        **dims(size),
        vocab_size=vocab,
        mlp_type="glu",
        hidden_act="silu",
        position_embedding_type="rope",
        final_norm="rmsnorm",
        tie_word_embeddings=False,
        **model,
    )
    if form == "wq-identity":  # as Karbevski & Mijoski trained it
        base["attention_scale"] = 1 / (2 * math.sqrt(base["hidden_size"] // base["num_attention_heads"]))
    if form == "figure-4-wide":
        base["intermediate_size"] = equal_cost_width(base)
    return base


def equal_cost_width(cfg: dict) -> int:
    """The widest FFN (a multiple of Q_GROUP) whose form reads at most the standard's bytes per token."""
    standard = counting.count(ModelArgs(**{**cfg, "removed": None}))["read_per_token"]
    width = cfg["intermediate_size"]
    while counting.count(ModelArgs(**{**cfg, "intermediate_size": width + Q_GROUP}))["read_per_token"] <= standard:
        width += Q_GROUP
    return width
