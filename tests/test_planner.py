"""--remove auto (issue 7): a plan measured against a fidelity budget in the target dtype."""

import json
import math

import mlx.core as mx
from hypothesis import given, settings
from hypothesis import strategies as st
from test_convert import ill_conditioned, quiet

from mlx_skipless import planner, zoo
from mlx_skipless.convert import convert


def test_ladder_keeps_the_worst_conditioned_first_and_ends_at_the_original():
    conds = [{"q": 3.0}, {"q": 1e4}, {}, {"q": 50.0}, {"q": float("inf")}]
    rungs = planner.ladder(conds, "p")
    assert rungs[0] == ["qp", "qp", "p", "qp", "p"]  # no square Q, singular Q: never removed
    assert rungs[1] == ["qp", "p", "p", "qp", "p"]
    assert rungs[2] == ["qp", "p", "p", "p", "p"]
    assert rungs[3] == ["p"] * 5 and rungs[4] == [""] * 5
    assert planner.doubtful(conds, 2.0**-8) == [1, 3]  # bf16: the bound keeps cond > 10
    forms, notes = planner.bound_plan(conds, 2.0**-8, "p")
    assert forms == ["qp", "p", "p", "p", "p"]
    assert set(notes) == {1, 2, 3, 4} and "singular" in notes[4] and "no square" in notes[2]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.data())
def test_search_finds_the_lowest_admitted_rung_in_logarithmic_trials(top, data):
    threshold = data.draw(st.integers(1, top))
    calls = []

    def admits(k):
        calls.append(k)
        return k >= threshold

    assert planner.search(admits, top) == threshold
    assert len(calls) <= math.ceil(math.log2(top)) if top > 1 else not calls


def test_measurement_removes_what_the_bound_would_keep(tmp_path):
    # cond 50 in float16: past the bound's limit (20), yet measured within the budget
    src = ill_conditioned(tmp_path, 50, mx.float32)
    measured = convert(str(src), str(tmp_path / "m"), dtype="float16", **quiet())
    bound = convert(str(src), str(tmp_path / "b"), dtype="float16", verify_output=False, **quiet())
    assert [e["removed"] for e in measured["layers"]] == ["qp", "qp", "qp"]
    assert [e["removed"] for e in bound["layers"]] == ["qp", "p", "qp"]
    assert measured["plan"]["doubtful_layers"] == 1 and measured["plan"]["trials"][0]["admitted"]
    assert "nothing measured" in bound["layers"][1]["note"]


def test_an_ill_conditioned_layer_is_kept_and_the_choice_recorded(tmp_path, capsys):
    src = ill_conditioned(tmp_path, 1e3, mx.float32)
    out = tmp_path / "out"
    report = convert(str(src), str(out), dtype="bfloat16", progress=False)
    assert [e["removed"] for e in report["layers"]] == ["qp", "p", "qp"]
    plan = report["plan"]
    assert not plan["trials"][0]["admitted"] and plan["chosen_rung"] == 1
    assert set(plan["rounding"]) == {"original", "p_merged"}
    assert "[PLAN]" in capsys.readouterr().out
    v = report["verification"]["stored"]
    assert v["converted"]["top1_agreement"] >= v["original"]["top1_agreement"] - 0.01
    assert report["weights"]["removed"] == 2 * 32 * 32 + 3 * 32 * 32  # Q in two layers, P in three

    config = json.loads((out / "config.json").read_text())
    assert config["conversion"]["plan"] == json.loads(json.dumps(plan))
    card = (out / "README.md").read_text()
    assert "## Conversion plan" in card and "| 1 | P | - | - | kept Q/K/V" in card
    assert zoo.main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "rung 1 chosen" in shown and "% removed" in shown


def test_own_trained_model_in_bf16_keeps_top1_within_a_point(tmp_path):
    # the packaged demo, trained and made norm-free by this project (scripts/build_demo.py)
    report = convert(None, str(tmp_path / "out"), dtype="bfloat16", **quiet())
    assert all(e["removed"] in ("qp", "kp", "vp") for e in report["layers"])  # one of Q/K/V, and P
    v = report["verification"]["stored"]
    assert v["converted"]["top1_agreement"] >= v["original"]["top1_agreement"] - 0.01
    assert not report["verification"]["degraded"]
