"""Acceptance (issue 6): the zoo's figures, published counts, and runnable recipes."""

import json
import re
from pathlib import Path

import pytest

from mlx_skipless import zoo

ROOT = Path(__file__).resolve().parents[1]


def show_json(name, capsys):
    assert zoo.main(["show", name, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_mistral_7b_reproduces_the_paper(capsys):
    s = show_json("mistral-7b", capsys)
    q = s["reductions"]["q"]
    assert round(s["parameters"] / 1e9, 1) == 7.2 and round(q["after"] / 1e9, 1) == 6.2
    assert round(100 * q["removed_fraction"]) == 15 and round(q["speedup_paper_count"], 2) == 1.17
    assert list(s["reductions"]) == ["q"]  # GQA: K and V are not square


def test_pythia_gives_the_exact_parallel_figure_and_the_claim_apart(capsys):
    s = show_json("pythia-6.9b", capsys)
    q = s["reductions"]["q"]
    assert q["removed_per_block"] == ["Q"]
    assert q["removed_fraction"] == pytest.approx(0.078, abs=5e-4)
    claim = q["paper_claim_not_exact"]
    assert round(100 * claim["removed_fraction"]) == 16 and claim["exact"] is False


@pytest.mark.parametrize("name", list(zoo.models()))
def test_every_config_matches_its_published_or_recorded_parameter_count(name):
    s = zoo.summary(name, zoo.models()[name])
    assert s["parameters_match"], (s["parameters"], s["parameters_published"])


def test_table_writes_markdown_and_a_chart(tmp_path, capsys):
    assert zoo.main(["table", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "zoo-table.md").read_text()
    assert all(f"| {name} |" in table for name in zoo.models())
    assert (tmp_path / "zoo-savings.svg").read_text().startswith("<svg")


def test_unknown_names_are_one_line_errors(capsys):
    assert zoo.main(["show", "gpt-5"]) == 1
    assert "no model 'gpt-5'; the zoo has:" in capsys.readouterr().err


def test_a_failing_step_is_one_error_line(tmp_path, capsys, monkeypatch):
    model, _ = zoo.sized("skipless-python", "tiny")
    # A recipe whose first step converts a checkpoint no earlier step made.
    monkeypatch.setattr(zoo, "sized", lambda name, size: (model, [("convert", {})]))
    assert zoo.main(["run", "skipless-python", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and err.startswith("error: recipe 'skipless-python' stopped at 'convert': ")
    assert "None" in err  # the step's own reason: the missing checkpoint it was given


def check_tiny_run(paths, out, keeps_skips=False):
    """What a recipe's tiny run must leave: every step's model, converted (a skipless one
    without block norms; a form with skips as it was trained), and the generated text
    last in its log."""
    assert {"train", "convert", "quantize"} <= set(paths) and keeps_skips != ("normfree" in paths)
    config = json.loads((Path(paths["convert"]) / "config.json").read_text())
    assert config["model_type"] == "skipless" and "conversion" in config
    assert ("block_norm" in config) == keeps_skips  # a skipless model's norms are gone
    assert "[INFO] wrote" in out and out.strip().splitlines()[-1]  # generated text comes last


# Two tiny runs are walked through the command line and checked alike elsewhere:
# skipless-python's, twice, by test_cli.py::test_zoo_run_twice_needs_force_or_resume_and_json_is_clean,
# and the README's, by test_readme.py::test_every_readme_command_runs_as_written.
README_RECIPE = re.search(r"zoo run (\S+) --size tiny", (ROOT / "README.md").read_text()).group(1)


@pytest.mark.parametrize("recipe", [r for r in zoo.recipes() if r not in ("skipless-python", README_RECIPE)])
def test_every_recipe_runs_tiny_end_to_end(recipe, tmp_path, capsys):
    paths = zoo.run(recipe, "tiny", tmp_path, log=lambda *_: None)
    model, _ = zoo.sized(recipe, "tiny")
    check_tiny_run(paths, capsys.readouterr().out, keeps_skips=model.get("residual", False))


@pytest.mark.parametrize(
    "name,letters,fraction",
    [
        ("wq-identity-python", ["Q"], 0.059),
        ("figure4-python", ["Q", "P"], 0.118),
        ("figure4-parallel-python", ["Q", "P"], 0.118),
    ],
)
def test_forms_are_priced_against_their_standard_twin(name, letters, fraction, capsys):
    s = show_json(name, capsys)
    f = s["form"]
    assert f["removed_per_block"] == letters and f["removed_fraction"] == pytest.approx(fraction, abs=1e-3)
    d = s["config"]["hidden_size"]
    assert f["per_block"]["standard"] - f["per_block"]["form"] == len(letters) * d * d
