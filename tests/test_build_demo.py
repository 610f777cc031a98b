"""Issue 17: scripts/build_demo.py --size NAME runs the zoo recipe at that size (zoo.run),
with the data name `corpus` bound to the corpus directory, and continues where a run stopped."""

import json
import os
from dataclasses import replace

import mlx.core as mx
import pytest
from harness import load_script, tiny_args
from mlx.utils import tree_flatten

from mlx_skipless import counting, modeldir, recipe, zoo
from mlx_skipless.models.skipless import Model
from mlx_skipless.zoo import tomllib  # tomli on Python 3.10


@pytest.fixture(scope="module")
def build_demo():
    return load_script("build_demo")


def test_sizes_come_from_the_recipe_with_the_corpus_bound(tmp_path):
    bound = {"corpus": tmp_path}
    model, steps = zoo.sized("skipless-python", "corpus-tiny", data=bound)
    steps = dict(steps)
    assert model["hidden_size"] == 32 and model["shaped_attention"] is True  # size over zoo model
    assert steps["train"]["data"] == [str(tmp_path)] == steps["normfree"]["data"]
    assert steps["train"]["lr"] == 2e-3 and steps["train"]["steps"] == 20  # recipe, then size
    assert steps["convert"] == {"dtype": "bfloat16"} and steps["quantize"]["q_bits"] == 4
    _, flagship = zoo.sized("skipless-python", "flagship", data=bound)
    assert dict(flagship)["train"]["data"] == [str(tmp_path)]
    _, demo = zoo.sized("skipless-python", "tiny", data=bound)
    assert dict(demo)["train"]["data"] == ["stdlib/json"]  # other names pass through
    with pytest.raises(KeyError, match="has sizes"):
        zoo.sized("skipless-python", "huge", data=bound)


def test_resumes_training_and_redoes_only_stale_steps(tmp_path):
    steps = [("train", {"steps": 20, "data": ["x"], "q_init_scale": 0.1}), ("normfree", {})]
    train, normfree = recipe.plan("r", steps, tmp_path, {"train": "with-norms", "normfree": "norm-free"})
    run, options = train.target, steps[0][1]
    assert run == tmp_path / "with-norms" and recipe.trained_to(run) == 0
    assert train.module == "train" and "--resume" not in train.argv
    flag = lambda name: train.argv[train.argv.index(name) + 1]  # noqa: E731
    assert flag("--steps") == "20" and flag("--q-init-scale") == "0.1"
    assert train.command().startswith("python -m mlx_skipless.train --config ")
    assert normfree.source == run and normfree.target == tmp_path / "norm-free"
    (run / modeldir.TRAINING_DIR).mkdir(parents=True)  # where train keeps its state
    (run / modeldir.TRAINING_DIR / modeldir.STATE).write_text(json.dumps({"step": 10}))
    (run / "model.safetensors").write_text("")
    assert recipe.trained_to(run) == 10 and recipe.kept(train, options) is None  # resumed: 10 of 20
    (run / modeldir.TRAINING_DIR / modeldir.STATE).write_text(json.dumps({"step": 20}))
    assert recipe.kept(train, options) == "trained (20 steps)"
    later = normfree.target
    assert recipe.stale(later, run) and recipe.kept(normfree, {}) is None
    later.mkdir()
    (later / "config.json").write_text("{}")
    os.utime(run / "model.safetensors", (1, 1))
    assert not recipe.stale(later, run) and recipe.kept(normfree, {})
    os.utime(run / "model.safetensors")  # training went on
    assert recipe.stale(later, run)


@pytest.mark.slow
def test_a_rerun_keeps_the_finished_steps(tmp_path, capsys):
    """build_demo runs the recipe with keep: its own files beside the run, its directory names,
    and a rerun that redoes nothing finished."""
    (tmp_path / "price.json").write_text("{}")
    dirs = {"train": "with-norms", "normfree": "norm-free", "convert": "bf16", "quantize": "q8"}
    log = []
    paths = zoo.run("skipless-python", "tiny", tmp_path, log=log.append, dirs=dirs, keep=True)
    assert paths == {kind: tmp_path / d for kind, d in dirs.items()}
    made = {kind: (path / "config.json").stat().st_mtime_ns for kind, path in paths.items()}
    log.clear()
    zoo.run("skipless-python", "tiny", tmp_path, log=log.append, dirs=dirs, keep=True)
    assert [line.split(": ", 1)[1].split(" kept")[0] for line in log if " kept: " in line] == list(dirs)
    assert made == {kind: (path / "config.json").stat().st_mtime_ns for kind, path in paths.items()}
    assert capsys.readouterr().out.strip().splitlines()[-1]  # the recipe's generate step still ran


def test_the_card_tells_the_builders_history(build_demo, tmp_path):
    assert build_demo.history(tmp_path) == []
    (tmp_path / "history.md").write_text("Extended from step 800.\n\n")
    assert build_demo.history(tmp_path) == ["Extended from step 800.", ""]


def _save(path, args, record=None):
    model = Model(args)
    mx.eval(model.parameters())
    path.mkdir(parents=True)
    modeldir.save(path, model, args, "normfree" if record else "train", record=record)


@pytest.fixture
def build(tmp_path):
    """A build's two checkpoints (as trained, and norm-free), a copy of the zoo entry, and a
    packaged demo that holds a file of an older layout."""
    work = tmp_path / "work"
    trained = tiny_args(
        block_norm="rmsnorm", final_norm="rmsnorm", shaped_attention=True, vocab_size=300, max_position_embeddings=32
    )
    _save(work / "with-norms", trained)
    _save(work / "norm-free", replace(trained, block_norm=None), {"source": str(work / "with-norms")})
    entry = tmp_path / "skipless-python.toml"
    entry.write_text((zoo.ZOO / "skipless-python.toml").read_text())
    demo = tmp_path / "demo" / "skipless-python"
    demo.mkdir(parents=True)
    (demo / "trainer.json").write_text("{}")
    return work, entry, demo, trained


def test_ship_installs_the_build_and_the_zoo_entry_follows_it(build_demo, build):
    work, entry, demo, trained = build
    before = tomllib.loads(entry.read_text())
    build_demo.ship_build(work, "# card\n", demo=demo, zoo_entry=entry)
    assert sorted(p.name for p in demo.iterdir()) == sorted(
        [p.name for p in (work / "norm-free").iterdir()] + ["README.md"]
    )  # the old layout's file is gone
    assert (demo / "README.md").read_text() == "# card\n" and str(work) not in (demo / "config.json").read_text()
    assert not demo.with_name("skipless-python.partial").exists()
    after = tomllib.loads(entry.read_text())
    assert {k: v for k, v in after.items() if k not in ("model", "parameters")} == {
        k: v for k, v in before.items() if k not in ("model", "parameters")
    }
    model = after["model"]
    assert model["hidden_size"] == 32 and model["vocab_size"] == 300 and model["block_norm"] == "rmsnorm"
    assert "head_dim" not in model and "removed" not in model  # what ModelArgs derives stays derived
    assert (
        after["parameters"]
        == counting.count(zoo.args_of(after))["total"]
        == sum(v.size for _, v in tree_flatten(Model(trained).parameters()))
    )
    assert "shaped_attention = true  # " in entry.read_text()  # comments kept


def test_ship_refuses_a_model_over_the_limit(build_demo, build, monkeypatch):
    work, entry, demo, _ = build
    text = entry.read_text()
    monkeypatch.setattr(build_demo, "SHIP_LIMIT", 100_000)
    with pytest.raises(ValueError, match="at most 0 MB"):
        build_demo.ship_build(work, "# card\n", demo=demo, zoo_entry=entry)
    assert [p.name for p in demo.iterdir()] == ["trainer.json"] and entry.read_text() == text


def test_the_packaged_demo_carries_the_model_file_of_this_checkout():
    """Stock mlx-lm runs the demo with the skipless.py beside its weights: a stale copy would
    run yesterday's model on them. `build_demo.py --ship` refreshes it; so does copying it."""
    shipped = zoo.PACKAGE / "demo" / "skipless-python" / "skipless.py"
    source = zoo.PACKAGE / "models" / "skipless.py"
    assert shipped.read_bytes() == source.read_bytes(), f"cp {source} {shipped}"
