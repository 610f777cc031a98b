"""The fidelity report (issue 7, measuring part): plans and errors per storage dtype."""

import json

import mlx.core as mx

from mlx_skipless import fidelity
from test_convert import ill_conditioned


def test_report_per_dtype_next_to_plain_rounding(tmp_path, capsys):
    src = ill_conditioned(tmp_path, 1e4, mx.float32)
    assert fidelity.main([str(src), "--dtypes", "float32", "bfloat16", "8bit", "--q-group-size", "32",
                          "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["condition_numbers"][1]["q"] > 9e3
    assert r["dtypes"]["float32"]["removed"] == ["qp", "qp", "qp"]
    # where rounding would be amplified 10^4 times, auto keeps that layer's Q
    assert r["dtypes"]["bfloat16"]["removed"] == ["qp", "p", "qp"]
    assert r["dtypes"]["8bit"]["removed"] == ["qp", "p", "qp"]
    assert not any(d["degraded"] for d in r["dtypes"].values())
