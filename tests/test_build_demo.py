"""Issue 17: scripts/build_demo.py --size NAME reads its settings from the zoo recipe,
binds the data name `corpus` to the corpus directory, and continues where a run stopped."""

import json
import os
from dataclasses import replace

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from harness import load_script, tiny_args
from mlx_skipless import counting, modeldir, zoo
from mlx_skipless.models.skipless import Model
from mlx_skipless.zoo import tomllib  # tomli on Python 3.10


@pytest.fixture(scope="module")
def build_demo():
    return load_script("build_demo")


def test_sizes_come_from_the_recipe_with_the_corpus_bound(build_demo, tmp_path):
    model, steps = build_demo.sized_steps("corpus-tiny", tmp_path)
    assert model["hidden_size"] == 32 and model["shaped_attention"] is True  # size over zoo model
    assert steps["train"]["data"] == [str(tmp_path)] == steps["normfree"]["data"]
    assert steps["train"]["lr"] == 2e-3 and steps["train"]["steps"] == 20  # recipe, then size
    assert steps["convert"] == {"dtype": "bfloat16"} and steps["quantize"]["q_bits"] == 4
    _, flagship = build_demo.sized_steps("flagship", tmp_path)
    assert flagship["train"]["data"] == [str(tmp_path)]
    _, demo = build_demo.sized_steps("tiny", tmp_path)
    assert demo["train"]["data"] == ["stdlib/json"]  # other names pass through
    with pytest.raises(KeyError, match="has sizes"):
        build_demo.sized_steps("huge", tmp_path)


def test_resumes_training_and_redoes_only_stale_steps(build_demo, tmp_path):
    run = tmp_path / "with-norms"
    assert build_demo.trained_to(run) == 0
    args = build_demo.train_command(tmp_path / "m.json", run, {"steps": 20, "data": ["x"], "q_init_scale": 0.1})
    assert args[:2] == ["-m", "mlx_skipless.train"] and "--resume" not in args
    assert args[args.index("--steps") + 1] == "20" and args[args.index("--q-init-scale") + 1] == "0.1"
    (run / modeldir.TRAINING_DIR).mkdir(parents=True)  # where train keeps its state
    (run / modeldir.TRAINING_DIR / modeldir.STATE).write_text(json.dumps({"step": 10}))
    (run / "model.safetensors").write_text("")
    assert build_demo.trained_to(run) == 10
    later = tmp_path / "norm-free"
    assert build_demo.stale(later, run)
    later.mkdir()
    (later / "config.json").write_text("{}")
    os.utime(run / "model.safetensors", (1, 1))
    assert not build_demo.stale(later, run)
    os.utime(run / "model.safetensors")  # training went on
    assert build_demo.stale(later, run)


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
    trained = tiny_args(block_norm="rmsnorm", final_norm="rmsnorm", shaped_attention=True, vocab_size=300,
                        max_position_embeddings=32)
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
        [p.name for p in (work / "norm-free").iterdir()] + ["README.md"])  # the old layout's file is gone
    assert (demo / "README.md").read_text() == "# card\n" and str(work) not in (demo / "config.json").read_text()
    assert not demo.with_name("skipless-python.partial").exists()
    after = tomllib.loads(entry.read_text())
    assert {k: v for k, v in after.items() if k not in ("model", "parameters")} == {
        k: v for k, v in before.items() if k not in ("model", "parameters")}
    model = after["model"]
    assert model["hidden_size"] == 32 and model["vocab_size"] == 300 and model["block_norm"] == "rmsnorm"
    assert "head_dim" not in model and "removed" not in model  # what ModelArgs derives stays derived
    assert after["parameters"] == counting.count(zoo.args_of(after))["total"] == sum(
        v.size for _, v in tree_flatten(Model(trained).parameters()))
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
