"""The fidelity report (issue 7): plans and errors per storage dtype."""

import json

import hf_checkpoints as hf
import mlx.core as mx
import pytest
from test_convert import ill_conditioned

from mlx_skipless import fidelity
from mlx_skipless.convert import convert
from mlx_skipless.errors import CheckpointError


def test_report_per_dtype_next_to_plain_rounding(tmp_path, capsys):
    src = ill_conditioned(tmp_path, 1e4, mx.float32)
    assert (
        fidelity.main(
            ["--model", str(src), "--dtypes", "float32", "bfloat16", "8bit", "--q-group-size", "32", "--json"]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["condition_numbers"][1]["q"] > 9e3
    assert r["dtypes"]["float32"]["removed"] == ["qp", "qp", "qp"]
    # where rounding would be amplified 10^4 times, auto keeps that layer's Q
    assert r["dtypes"]["bfloat16"]["removed"] == ["qp", "p", "qp"]
    assert r["dtypes"]["8bit"]["removed"] == ["qp", "p", "qp"]
    assert not any(d["degraded"] for d in r["dtypes"].values())


def test_a_dtype_the_original_overflows_is_reported_not_planned(tmp_path, capsys):
    args, flat = hf.case("llama", seed=4, num_hidden_layers=4)  # activations past float16's range
    src = hf.write(tmp_path / "src", "llama", args, flat)
    with pytest.raises(CheckpointError, match="original model itself is not finite"):
        convert(str(src), str(tmp_path / "out"), dtype="float16", progress=False, log=lambda *_: None)
    assert not (tmp_path / "out").exists()
    assert fidelity.main(["--model", str(src), "--dtypes", "float16", "bfloat16"]) == 0
    table = capsys.readouterr().out
    assert "| float16 | the original model itself is not finite" in table and "| bfloat16 | qp qp qp qp |" in table
