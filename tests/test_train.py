"""Acceptance (issue 5): training, resuming, and norm removal on tiny models."""

import mlx.core as mx
import numpy as np
import pytest
from harness import logits, rel_err, tokens
from mlx.utils import tree_flatten

from mlx_skipless import data, diagnostics, modeldir, normfree, optimizers, train
from mlx_skipless.convert import convert
from mlx_skipless.loading import load_model
from mlx_skipless.models.skipless import Model, ModelArgs
from mlx_skipless.output_dir import staged_directory

CORPUS = [str(data.stdlib_path() / "json")]  # five files of real Python, on every machine
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=64,
    num_attention_heads=4,
    block_norm="rmsnorm",
    final_norm="rmsnorm",
)
RUN = dict(batch_size=8, context=32, lr=3e-3, eval_every=10, eval_batches=2, save_every=10, orthogonality=0.0)
QUIET = dict(progress=False, log=lambda *_: None)


def scored(model, corpus):
    """The validation loss on the windows a run of RUN's options reports on."""
    return train.validation_loss(model, corpus, RUN["context"], batches=RUN["eval_batches"])


def options(**kw):
    """RUN's training options, `kw` where given."""
    return train.TrainOptions(**{**RUN, **kw})


@pytest.fixture(scope="module")
def setup():
    tok = data.train_tokenizer(data.read_texts(data.find_files(CORPUS)), 300)
    return tok, data.TokenStreams.build(CORPUS, tok)


def fresh(tok, **kw):
    args = ModelArgs(**{**TINY, **kw}, vocab_size=tok.get_vocab_size(), max_position_embeddings=32)
    model = Model(args)
    train.initialize(model, seed=0)
    return model, args


def test_loss_goes_down_and_checkpoint_loads(setup, tmp_path):
    tok, corpus = setup
    model, args = fresh(tok)
    before = scored(model, corpus)
    state = train.train(model, args, tok, corpus, tmp_path / "run", options(steps=30), **QUIET)
    assert state["history"][-1]["val_loss"] < before - 0.5
    loaded, _ = load_model(str(tmp_path / "run"))  # the checkpoint is a skipless model directory
    t = tokens(16, vocab=args.vocab_size)
    assert rel_err(logits(loaded, t), logits(model, t)) < 1e-6


@pytest.mark.parametrize("layers", [2, 5])  # 5: block matrices at 4/5 of the rate (two optimizers)
def test_resume_continues_from_the_same_step(setup, tmp_path, layers):
    tok, corpus = setup
    straight, args = fresh(tok, num_hidden_layers=layers)
    train.train(straight, args, tok, corpus, tmp_path / "straight", options(steps=20), **QUIET)

    first, _ = fresh(tok, num_hidden_layers=layers)
    # stop after 10 of 20 steps: train to 10 with the 20-step schedule, as an interrupted run would
    state = train.train(
        first, args, tok, corpus, tmp_path / "split", options(steps=20, save_every=10), **QUIET, stop_at=10
    )
    assert state["step"] == 10
    model, args2, tok2, state = modeldir.read(tmp_path / "split")
    opt_state = modeldir.read_optimizer_state(tmp_path / "split")
    state = train.train(
        model,
        args2,
        tok2,
        corpus,
        tmp_path / "split",
        options(steps=20),
        state=state,
        optimizer_state=opt_state,
        **QUIET,
    )
    assert state["step"] == 20 and [h["step"] for h in state["history"]] == [10, 20]
    a = dict(tree_flatten(straight.parameters()))
    b = dict(tree_flatten(model.parameters()))
    assert all(np.allclose(np.array(a[k]), np.array(b[k]), atol=1e-5) for k in a)


def test_orthogonality_keeps_q_well_conditioned(setup, tmp_path):
    tok, corpus = setup
    conds = {}
    for weight in (0.0, 1.0):
        model, args = fresh(tok)
        # AdamW: Muon's orthogonalized steps keep Q near-orthogonal without the penalty
        adamw = options(steps=30, orthogonality=weight, optimizer="adamw", schedule="cosine")
        train.train(model, args, tok, corpus, tmp_path / f"o{weight}", adamw, **QUIET)
        conds[weight] = max(np.linalg.cond(np.array(w)) for w in train.inverted_candidates(model))
    assert conds[1.0] < conds[0.0] / 2 and conds[1.0] < 2


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_normfree_removes_every_block_norm_exactly(setup, tmp_path, kind):
    tok, corpus = setup
    model, args = fresh(tok, block_norm=kind)
    train.train(model, args, tok, corpus, tmp_path / "run", options(steps=20), **QUIET)
    folded, new_args, report = normfree.remove_norms(
        model,
        args,
        corpus,
        steps_per_norm=2,
        final_steps=4,
        context=32,
        batch_size=8,
        calibration_batches=1,
        eval_batches=2,
        log=lambda *_: None,
    )
    names = [k for k, _ in tree_flatten(folded.parameters())]
    assert not [k for k in names if "layers" in k and "norm" in k]
    assert new_args.block_norm is None and "model.norm.weight" in names
    assert len(report["stages"]) == 2 * args.num_hidden_layers
    assert np.isfinite(report["val_loss_norm_free"])
    # folding is exact: the norm-free model computes the fixed-norm model's function
    t = tokens(16, vocab=args.vocab_size)
    assert rel_err(logits(folded, t), logits(model, t)) < 1e-5
    assert abs(report["val_loss_norm_free"] - report["val_loss_fixed_norms"]) < 1e-4

    # ... and it is a converter input: save, convert, same logits
    with staged_directory(tmp_path / "nf") as staging:
        modeldir.save(staging, folded, new_args, "normfree", tok, record=report)
    convert(str(tmp_path / "nf"), str(tmp_path / "out"), progress=False, log=lambda *_: None)
    converted, _ = load_model(str(tmp_path / "out"))
    assert rel_err(logits(converted, t), logits(folded, t)) < 1e-5


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert train.main(["--mlx-path", str(tmp_path / "x"), "--data", str(tmp_path / "nothing")]) == 1
    assert normfree.main(["--model", str(tmp_path / "missing"), "--mlx-path", str(tmp_path / "y")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


@pytest.mark.parametrize(
    "form",
    [
        dict(removed=["qp", "qp"], block_norm=None),  # a reduced form, trained directly
        dict(removed=["qp", "qp"], residual=True, block_norm="layernorm"),  # Karbevski's W_Q = I block
        dict(shaped_attention=True, parallel_block=True, removed=["q", "q"], block_norm=None),
    ],
)
def test_reduced_and_norm_skip_forms_train_directly(setup, tmp_path, form):
    tok, corpus = setup
    model, args = fresh(tok, **form)
    before = scored(model, corpus)
    state = train.train(model, args, tok, corpus, tmp_path / "run", options(steps=20), **QUIET)
    assert state["history"][-1]["val_loss"] < before - 0.3


def test_block_learning_rate_shrinks_with_width_and_depth():
    base = dict(intermediate_size=64, num_attention_heads=4, vocab_size=300)
    scale = lambda d, n: optimizers.hidden_lr_scale(ModelArgs(hidden_size=d, num_hidden_layers=n, **base))
    assert scale(64, 4) == scale(256, 4) == 1.0  # the demo and the test models train as before
    assert scale(512, 4) == scale(256, 8) == 0.5 and scale(512, 8) == 0.25


@pytest.mark.parametrize("scale, collapsed", [(None, False), (1.0, True)], ids=["scaled", "flat"])
def test_deep_skipless_stack_keeps_tokens_apart(setup, tmp_path, scale, collapsed):
    """The failure the block learning rate fixes (issue 19): with every matrix at the full
    rate, a deep stack without skips maps every position to nearly the same vector within
    a few steps (rank collapse: mean cosine between positions -> 1 at the last layer) and
    then predicts only token frequencies. The default rate (4/16 of it here) keeps them apart."""
    tok, corpus = setup
    x = mx.array(next(corpus.validation(1, 8, 32))[0])
    last_cos = lambda m: diagnostics.signal_propagation(m, x)[-1]["cos"]
    model, args = fresh(tok, hidden_size=32, num_hidden_layers=16, intermediate_size=96, shaped_attention=True)
    train.initialize(model, seed=0, q_scale=0.1)
    assert last_cos(model) < 0.1  # orthogonal init: no collapse to begin with
    train.train(
        model,
        args,
        tok,
        corpus,
        tmp_path / "run",
        # AdamW, as measured; Muon's orthogonalized steps collapse less (flat: 0.57)
        options(steps=10, block_lr_scale=scale, lr=1e-3, eval_every=10**6, save_every=10**6, optimizer="adamw"),
        **QUIET,
    )
    # measured: scaled 0.14, flat 0.82 (d 64: 0.10 and 0.87)
    assert (last_cos(model) > 0.7) if collapsed else (last_cos(model) < 0.4)


# -- optimizers, schedules, extension, divergence ---------------------------------------------


def test_wsd_schedule_holds_then_cools_to_zero_on_the_optimizers_step_type():
    rate = optimizers.schedule(1.0, 100, 5, "wsd", 0.2)
    at = lambda step: rate(mx.array(step, mx.uint64)).item()  # noqa: E731 -- the optimizer's step dtype
    assert at(0) == pytest.approx(0.2) and at(5) == at(50) == at(80) == 1.0
    assert at(81) == pytest.approx(1 - 0.05**0.5) and at(100) == 0.0
    assert all(at(s) >= at(s + 1) for s in range(5, 100))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_every_optimizer_and_schedule_learns(setup, tmp_path, optimizer):
    tok, corpus = setup
    model, args = fresh(tok)
    before = scored(model, corpus)
    state = train.train(
        model,
        args,
        tok,
        corpus,
        tmp_path / "run",
        options(steps=30, optimizer=optimizer, muon_lr=0.02, schedule="wsd"),
        **QUIET,
    )
    assert state["history"][-1]["val_loss"] < before - 0.5
    assert state["options"]["optimizer"] == optimizer and state["options"]["schedule"] == "wsd"


def test_a_wsd_run_extends_from_its_last_constant_rate_step(setup, tmp_path):
    """The stable save resumed to more steps is the run trained to that many steps at once."""
    tok, corpus = setup
    straight, args = fresh(tok)
    train.train(
        straight, args, tok, corpus, tmp_path / "long", options(steps=30, schedule="wsd", cooldown=0.2), **QUIET
    )
    short, _ = fresh(tok)
    state = train.train(
        short,
        args,
        tok,
        corpus,
        tmp_path / "short",
        options(steps=20, schedule="wsd", cooldown=0.3, stable_path=tmp_path / "stable"),
        **QUIET,
    )
    model, args2, tok2, state = modeldir.read(tmp_path / "stable")
    assert state["step"] == 14  # 20 - 0.3 * 20: the first cooldown step is the next one
    # 14 constant-rate steps at the 20-step run's rate are those of the 30-step run (cooldown 6 steps)
    state = train.train(
        model,
        args2,
        tok2,
        corpus,
        tmp_path / "stable",
        options(steps=30, schedule="wsd", cooldown=0.2),
        state=state,
        optimizer_state=modeldir.read_optimizer_state(tmp_path / "stable"),
        **QUIET,
    )
    t = tokens(16, vocab=args.vocab_size)
    assert rel_err(logits(model, t), logits(straight, t)) < 1e-4


def test_divergence_stops_before_a_save_replaces_the_good_one(setup, tmp_path):
    tok, corpus = setup
    model, args = fresh(tok)
    train.train(model, args, tok, corpus, tmp_path / "run", options(steps=10), **QUIET)
    good = (tmp_path / "run" / "model.safetensors").read_bytes()
    model, args, tok2, state = modeldir.read(tmp_path / "run")
    with pytest.raises(train.TrainingDiverged, match="step 1[1-9].*last good save \\(step 10\\)"):
        train.train(
            model, args, tok2, corpus, tmp_path / "run", options(steps=20, lr=1e6, clip=1e9), state=state, **QUIET
        )
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == good


@pytest.mark.slow
def test_data_parallel_equals_one_process(setup, tmp_path):
    """Two processes (mlx.launch, ring backend, localhost), each on half of the global batch with
    averaged gradients, take the steps one process takes on the whole batch."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    tok, corpus = setup
    tok.save(str(tmp_path / "tokenizer.json"))
    model, args = fresh(tok)
    train.train(
        model,
        args,
        tok,
        corpus,
        tmp_path / "one",
        options(steps=6, eval_every=6, save_every=6, optimizer="muon", schedule="wsd"),
        **QUIET,
    )
    worker = Path(__file__).parent / "workers" / "data_parallel.py"
    launch = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
    run = subprocess.run(
        [
            launch,
            "--backend",
            "ring",
            "-n",
            "2",
            "--python",
            sys.executable,
            str(worker),
            str(tmp_path / "two"),
            CORPUS[0],
            str(tmp_path / "tokenizer.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "two.world").read_text() == "2"
    two, _ = load_model(str(tmp_path / "two"))
    t = tokens(16, vocab=args.vocab_size)
    assert rel_err(logits(two, t), logits(model, t)) < 1e-4
    assert modeldir.training_state(tmp_path / "two")["step"] == 6


@pytest.mark.parametrize("tied", [False, True])
def test_initial_logits_start_near_uniform(tied):
    # A tied head scores the state against the embedding itself: with unit-variance rows the
    # first loss was ~10 nats above ln(vocab) and a short run ended worse than guessing.
    from harness import tiny_args

    args = tiny_args(
        hidden_size=64,
        vocab_size=300,
        tie_word_embeddings=tied,
        position_embedding_type="learned",
        final_norm="layernorm",
        block_norm="layernorm",
        shaped_attention=True,
    )
    model = Model(args)
    train.initialize(model, seed=0, q_scale=0.1)
    x = mx.array(np.random.default_rng(0).integers(0, 300, (4, 32)))
    logp = model(x) - mx.logsumexp(model(x), axis=-1, keepdims=True)
    loss = -mx.mean(mx.take_along_axis(logp[:, :-1], x[:, 1:, None], axis=-1)).item()
    assert loss < np.log(300) + 1.5  # unit-variance tied rows started ~10 nats above


def test_muon_and_wsd_are_the_defaults_but_older_runs_resume_as_they_trained():
    quiet = lambda *_: None
    fresh = train.build_parser().parse_args(["--mlx-path", "run"])
    train.settle_options(fresh, None, log=quiet)
    assert (fresh.optimizer, fresh.schedule) == ("muon", "wsd")
    older = train.build_parser().parse_args(["--mlx-path", "run", "--resume"])
    train.settle_options(older, {"steps": 10, "lr": 1e-3}, log=quiet)  # recorded before either option existed
    assert (older.optimizer, older.schedule, older.steps) == ("adamw", "cosine", 10)
