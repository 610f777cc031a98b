"""Issue 17: scripts/build_demo.py --size NAME reads its settings from the zoo recipe,
binds the data name `corpus` to the corpus directory, and continues where a run stopped."""

import json
import os

import pytest

from harness import load_script
from mlx_skipless import modeldir



@pytest.fixture(scope="module")
def build_demo():
    return load_script("build_demo")


def test_sizes_come_from_the_recipe_with_the_corpus_bound(build_demo, tmp_path):
    model, steps = build_demo.sized_steps("corpus-tiny", tmp_path)
    assert model["hidden_size"] == 32 and model["shaped_attention"] is True  # size over zoo model
    assert steps["train"]["data"] == [str(tmp_path)] == steps["normfree"]["data"]
    assert steps["train"]["q_init_scale"] == 0.1 and steps["train"]["steps"] == 20  # recipe, then size
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
