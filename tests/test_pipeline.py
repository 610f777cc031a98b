"""Issue 16: the pipeline as a user walks it (train -> normfree -> convert -> generate),
exact at every seam, through the command lines; and one home for model directories."""

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import hf_checkpoints as hf
import mlx.core as mx
import numpy as np
import pytest
from harness import command, greedy_completions_alone_and_together, write_corpus
from mlx.utils import tree_flatten

from mlx_skipless import convert as convert_cli
from mlx_skipless import data, modeldir, normfree, train, whatif
from mlx_skipless.loading import load_model
from mlx_skipless.loss import validation_loss
from mlx_skipless.models.skipless import Model, ModelArgs
from mlx_skipless.output_dir import staged_directory

# A GPT-2 shape, as the zoo's gpt2 recipe trains it: learned positions, LayerNorm,
# tied head, shaped attention, no residuals.
GPT2 = dict(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=64,
    num_attention_heads=4,
    mlp_type="mlp",
    hidden_act="gelu_new",
    position_embedding_type="learned",
    attention_bias=True,
    mlp_bias=True,
    tie_word_embeddings=True,
    block_norm="layernorm",
    final_norm="layernorm",
    residual=False,
    shaped_attention=True,
)


def cli(name: str, *argv, check: bool = True) -> subprocess.CompletedProcess:
    proc = command(f"mlx_skipless.{name}", *argv)
    if check:
        assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, corpus):
    """train -> normfree -> convert --dtype bfloat16, each through its command line;
    yields the directories, the converted one last."""
    work = tmp_path_factory.mktemp("pipeline")
    (work / "gpt2.json").write_text(json.dumps(GPT2))
    dirs = {"train": work / "run", "normfree": work / "normfree", "convert": work / "converted"}
    cli(
        "train",
        "--config",
        work / "gpt2.json",
        "--data",
        corpus,
        "--mlx-path",
        dirs["train"],
        "--steps",
        6,
        "--context",
        32,
        "--batch-size",
        4,
        "--vocab-size",
        300,
        "--eval-every",
        3,
        "--eval-batches",
        1,
        "--save-every",
        3,
        "--q-init-scale",
        0.1,
    )
    cli(
        "normfree",
        "--model",
        dirs["train"],
        "--data",
        corpus,
        "--mlx-path",
        dirs["normfree"],
        "--steps-per-norm",
        1,
        "--final-steps",
        2,
        "--batch-size",
        4,
        "--calibration-batches",
        1,
        "--eval-batches",
        2,
    )
    cli("convert", "--hf-path", dirs["normfree"], "--mlx-path", dirs["convert"], "--dtype", "bfloat16")
    return dirs


@pytest.fixture(scope="module")
def converted(pipeline) -> Path:
    """The converted model directory, for every later step (generate, serve)."""
    return pipeline["convert"]


def test_trained_gpt2_shape_walks_to_generation(pipeline, converted):
    report = json.loads((pipeline["normfree"] / "config.json").read_text())["normfree"]
    assert abs(report["val_loss_norm_free"] - report["val_loss_fixed_norms"]) <= 1e-5 * report["val_loss_fixed_norms"]
    config = json.loads((converted / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and not config["conversion"]["verification"]["degraded"]
    out = cli("generate", "--model", converted, "--prompt", "def value", "--max-tokens", 8)
    assert "Generation:" in out.stdout


def test_served_pipeline_model_answers_concurrent_requests_as_alone(converted):
    prompts = ["def value", "import os\nclass Stack:\n    def push(self, x):", "x = ["]
    alone, together = greedy_completions_alone_and_together(converted, prompts, max_tokens=12)
    assert all(alone) and together == alone


def test_every_command_writes_the_same_model_directory(pipeline, tmp_path):
    """One writer: the same config.json format, the mark of this tool, the model file
    for stock mlx-lm, and the trainer's state only where no loader looks."""
    from test_whatif import write_gguf  # the tiny llama GGUF that test writes

    write_gguf(tmp_path / "tiny.gguf", np.random.default_rng(0))
    assert (
        whatif.main(["--model", str(tmp_path / "tiny.gguf"), "--mlx-path", str(tmp_path / "whatif"), "--layers", "1"])
        == 0
    )
    dirs = {**pipeline, "whatif": tmp_path / "whatif"}
    for step, path in dirs.items():
        config = json.loads((path / "config.json").read_text())
        assert config["mlx_skipless"]["command"] == step, step
        assert config["model_type"] == "skipless" and config["model_file"] == "skipless.py"
        assert config["architectures"] == ["SkiplessForCausalLM"] and "torch_dtype" in config
        assert set(ModelArgs.__dataclass_fields__) - set(config) <= {
            k for k, f in ModelArgs.__dataclass_fields__.items() if f.default is None
        }
        assert list(config) == sorted(config)
        assert (path / "skipless.py").exists() and (path / "model.safetensors.index.json").exists()
        assert sorted(p.name for p in path.glob("*.safetensors")) == ["model.safetensors"]
        load_model(str(path))
    assert sorted(p.name for p in (pipeline["train"] / "training").iterdir()) == [
        "optimizer.safetensors",
        "trainer.json",
    ]


def test_whatif_refuses_to_overwrite_without_force(tmp_path, capsys):
    from test_whatif import write_gguf

    write_gguf(tmp_path / "tiny.gguf", np.random.default_rng(0))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert (
        whatif.main(["--model", str(tmp_path / "tiny.gguf"), "--mlx-path", str(tmp_path / "out"), "--layers", "1"]) == 1
    )
    assert "exists; pass --force" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]


def test_normfree_does_not_import_the_trainer():
    code = "import sys, mlx_skipless.normfree; assert 'mlx_skipless.train' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_vanilla_checkpoint_loads_without_a_float64_copy(tmp_path):
    """Loading reads a block at a time: never every weight as float64 (8 bytes each)."""
    args, flat = hf.case("llama", num_hidden_layers=8, hidden_size=64, intermediate_size=128, num_key_value_heads=4)
    src = hf.write(tmp_path / "src", "llama", args, flat)
    float32_bytes = 4 * sum(v.size for v in flat.values())
    load_model(str(src))  # once, so that imports and caches are not counted
    tracemalloc.start()
    try:
        load_model(str(src))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.75 * float32_bytes, (peak, float32_bytes)


@pytest.fixture(scope="module")
def tokenized(corpus):
    tok = data.train_tokenizer(data.read_texts(data.find_files([str(corpus)])), 300)
    return tok, data.TokenStreams.build([str(corpus)], tok)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_folding_the_frozen_norms_keeps_the_loss(tokenized, tied, norm, positions, parallel):
    tok, corpus = tokenized
    args = ModelArgs(
        **{
            **GPT2,
            "tie_word_embeddings": tied,
            "block_norm": norm,
            "final_norm": norm,
            "position_embedding_type": positions,
            "parallel_block": parallel,
        },
        vocab_size=tok.get_vocab_size(),
        max_position_embeddings=32,
    )
    model = Model(args)
    train.initialize(model, seed=0)
    rng = np.random.default_rng(1)  # norms that are not the identity
    model.load_weights(
        [
            (k, v + 0.3 * mx.array(rng.standard_normal(v.shape), mx.float32))
            for k, v in tree_flatten(model.parameters())
            if "norm" in k
        ],
        strict=False,
    )
    for i, name in normfree.schedule(args):  # the recipe's freezing, without the fine-tuning
        normfree.freeze_norm(model, corpus, i, name, batches=1, batch_size=4, context=32)
    folded, new_args = normfree.fold_norms(model, args)
    assert new_args.block_norm is None
    fixed, free = (validation_loss(m, corpus, 32, batches=2, batch_size=8) for m in (model, folded))
    assert abs(free - fixed) < 1e-5 * fixed, (fixed, free)


def test_a_trained_run_converts_and_loads(tokenized, tmp_path):
    """Training state lives where no loader looks: convert reads only the weights."""
    tok, corpus = tokenized
    args = ModelArgs(**{**GPT2, "block_norm": None}, vocab_size=tok.get_vocab_size(), max_position_embeddings=32)
    model = Model(args)
    train.initialize(model, seed=0)
    train.train(
        model,
        args,
        tok,
        corpus,
        tmp_path / "run",
        train.TrainOptions(steps=2, batch_size=4, context=32, orthogonality=0.0),
        progress=False,
        log=lambda *_: None,
    )
    assert convert_cli.main(["--hf-path", str(tmp_path / "run"), "--mlx-path", str(tmp_path / "out")]) == 0
    # a run written before training/ existed: its optimizer state beside the weights
    old = tmp_path / "old"
    with staged_directory(old) as staging:
        modeldir.save(staging, model, args, "train", tok)
    (tmp_path / "run" / "training" / "optimizer.safetensors").rename(old / "optimizer.safetensors")
    assert convert_cli.main(["--hf-path", str(old), "--mlx-path", str(tmp_path / "out2")]) == 0


def test_resume_keeps_the_recorded_settings(corpus, tmp_path, capsys):
    (tmp_path / "gpt2.json").write_text(json.dumps({**GPT2, "block_norm": None}))
    run = tmp_path / "run"
    common = [
        "--data",
        str(corpus),
        "--mlx-path",
        str(run),
        "--batch-size",
        "4",
        "--eval-every",
        "2",
        "--save-every",
        "2",
    ]
    assert (
        train.main(
            [
                "--config",
                str(tmp_path / "gpt2.json"),
                *common,
                "--steps",
                "2",
                "--context",
                "16",
                "--vocab-size",
                "300",
                "--lr",
                "0.002",
                "--orthogonality",
                "0.01",
                "--weight-decay",
                "0.05",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert train.main(["--resume", *common, "--steps", "4"]) == 0
    logged = capsys.readouterr()
    state_file = next(f for f in (run / "training" / "trainer.json", run / "trainer.json") if f.exists())
    state = json.loads(state_file.read_text())
    assert state["step"] == 4
    options = state["options"]
    assert (options["lr"], options["orthogonality"], options["weight_decay"], options["context"]) == (
        0.002,
        0.01,
        0.05,
        16,
    )
    overrides = [line for line in (logged.out + logged.err).splitlines() if "overriding" in line]
    assert overrides == ["[INFO] overriding the run's recorded settings: steps 2 -> 4"]
