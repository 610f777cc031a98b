"""The weight names live in names.py and match the model; fusion runs without MLX."""

import subprocess
import sys
from pathlib import Path

import pytest
from harness import tiny_args
from hf_checkpoints import SHAPES

from mlx_skipless import counting, names

ROOT = Path(__file__).resolve().parents[1]
# Beyond the families: expert FFNs of both kinds, and the block norms a model trains with.
EXTRA = [
    dict(mlp_type="mlp", hidden_act="gelu", num_local_experts=4, mlp_bias=True),
    dict(block_norm="layernorm", final_norm="layernorm", residual=True),
    dict(block_norm="rmsnorm", parallel_block=True),
]
CONFIGS = [tiny_args(**kw) for kw in [*SHAPES.values(), *EXTRA]]


def _paths_in_blocks(args):
    """{path in a block} over the model's parameters, and the whole-model names."""
    paths, others = set(), set()
    for key in counting.shapes(args):
        parts = names.split_block_key(key)
        if parts:
            paths.add(parts[1])
        elif key.startswith(names.BLOCKS):
            paths.add(key.removeprefix(names.BLOCKS).split(".", 1)[1])  # shaped attention's scalars
        else:
            others.add(key)
    return paths, others


KNOWN = (
    set(names.ATTN_IN)
    | {names.ATTN_OUT}
    | set(names.FFN_INPUTS)
    | set(names.FFN_OUTPUTS)
    | set(names.BLOCK_NORMS)
    | {f"{names.ATTENTION}.{s}" for s in names.SHAPED}
)


@pytest.mark.parametrize("args", CONFIGS, ids=[*SHAPES, "moe_mlp", "layernorm", "rmsnorm_parallel"])
def test_every_parameter_of_the_model_is_named_in_names(args):
    paths, others = _paths_in_blocks(args)
    assert paths <= KNOWN, paths - KNOWN
    assert others <= {*names.GLOBALS, names.FINAL_NORM_PREFIX + "weight", names.FINAL_NORM_PREFIX + "bias"}
    assert names.EMBED in others


def test_every_name_in_names_is_a_parameter_of_some_model():
    seen = set()
    for args in CONFIGS:
        paths, others = _paths_in_blocks(args)
        seen |= paths | others
    assert KNOWN | set(names.GLOBALS) <= seen


def test_names_compose_as_the_model_spells_them():
    assert names.block_key(3, names.Q + ".weight") == "model.layers.3.self_attn.q_proj.weight"
    assert names.split_block_key("model.layers.3.mlp.switch_mlp.fc1.bias") == (3, "mlp.switch_mlp.fc1", "bias")
    assert names.split_block_key(names.EMBED) is None
    assert names.is_norm("model.layers.0.input_layernorm.weight") and names.is_norm("model.norm.bias")
    assert not names.is_norm(names.ffn(names.DOWN) + ".weight")


def test_fusion_imports_no_mlx():
    # A fresh interpreter: this one has imported MLX already.
    code = (
        "import sys, mlx_skipless.fusion, mlx_skipless.names; "
        "assert not any(m.startswith('mlx.') or m == 'mlx' for m in sys.modules), "
        "sorted(m for m in sys.modules if m.split('.')[0] == 'mlx')"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
