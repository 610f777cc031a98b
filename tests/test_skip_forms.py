"""The reduced forms that keep their skips and norms compute what they claim.

Graef's Figure 4 (no Q, no P, serial or parallel) is a standard pre-norm transformer
whose Q and P are the identity, and Karbevski & Mijoski's W_Q = I block is one whose
Q is the identity: each is checked against the MLX standard model holding those
identities and against the independent float64 forward pass (tests/reference.py)."""

from dataclasses import replace

import numpy as np
import pytest
import reference
from harness import build, command, logits, rel_err, tiny_args, tokens

from mlx_skipless import layout, names, optimizers, synthetic

TOL = 1e-5
FORMS = {"wq-identity": "q", "figure-4": "qp"}


def removed_paths(args, form: str):
    """The block paths of the matrices `form` removes ("p" is the output projection, o_proj)."""
    return [
        names.block_key(i, names.attention("o" if letter == "p" else letter))
        for i in range(args.num_hidden_layers)
        for letter in form
    ]


def standard_args(parallel: bool, **kw):
    return tiny_args(
        residual=True, block_norm="rmsnorm", final_norm="rmsnorm", parallel_block=parallel, num_key_value_heads=2, **kw
    )


def with_identities(flat: dict, args, form: str) -> dict:
    """The standard model's weights with the matrices `form` removes set to the identity."""
    flat = dict(flat)
    for key in removed_paths(args, form):
        flat[f"{key}.weight"] = np.eye(args.hidden_size)
        if f"{key}.bias" in flat:
            flat[f"{key}.bias"] = np.zeros(args.hidden_size)
    return flat


def without(flat: dict, args, form: str) -> dict:
    drop = set(removed_paths(args, form))
    return {k: v for k, v in flat.items() if k.rsplit(".", 1)[0] not in drop}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("name", FORMS)
def test_form_equals_standard_with_identities(name, parallel, bias):
    form = FORMS[name]
    args = standard_args(parallel, attention_bias=bias, mlp_bias=bias)
    reduced_args = replace(args, removed=[form] * args.num_hidden_layers)
    flat = with_identities(synthetic.random_flat(args, seed=1), args, form)
    toks = tokens(12, args.vocab_size, seed=2)

    ref = reference.forward(layout.weights_from_flat(flat, args), args, toks)
    standard = logits(build(args, flat), toks)
    reduced = logits(build(reduced_args, without(flat, args, form)), toks)
    assert rel_err(standard, ref) <= TOL
    assert rel_err(reduced, ref) <= TOL


def test_identity_matters():
    """The comparison can fail: with a random Q the standard model differs."""
    args = standard_args(False)
    flat = synthetic.random_flat(args, seed=1)
    toks = tokens(12, args.vocab_size, seed=2)
    reduced = logits(build(replace(args, removed=["q"] * 2), without(flat, args, "q")), toks)
    assert rel_err(reduced, logits(build(args, flat), toks)) > 1e-2


# -- trained, converted, served ------------------------------------------------------------------

TRAINED = {
    "wq-identity": dict(removed="q"),
    "figure-4": dict(removed="qp"),
    "figure-4-parallel": dict(removed="qp", parallel_block=True),
}
SHAPE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=64,
    num_attention_heads=4,
    block_norm="rmsnorm",
    final_norm="rmsnorm",
    residual=True,
    max_position_embeddings=32,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each form trained 20 steps on a small corpus: {name: (run directory, losses before, after)}."""
    from harness import write_corpus

    from mlx_skipless import data, train
    from mlx_skipless.models.skipless import Model, ModelArgs

    work = tmp_path_factory.mktemp("forms")
    text = write_corpus(work / "text")
    tok = data.train_tokenizer(data.read_texts(data.find_files([str(text)])), 300)
    corpus = data.TokenStreams.build([str(text)], tok, 0.1)
    runs = {}
    for name, form in TRAINED.items():
        args = ModelArgs(vocab_size=tok.get_vocab_size(), **SHAPE, **form)
        model = Model(args)
        train.initialize(model, seed=0, q_scale=0.1)
        before = train.validation_loss(model, corpus, 32, batches=2)
        options = train.TrainOptions(
            steps=20, batch_size=8, context=32, lr=3e-3, eval_every=20, eval_batches=2, save_every=20, orthogonality=0.0
        )
        state = train.train(model, args, tok, corpus, work / name, options, progress=False, log=lambda *_: None)
        runs[name] = (work / name, before, state["history"][-1]["val_loss"], state["options"])
    return runs


@pytest.mark.parametrize("name", TRAINED)
def test_every_form_trains_with_the_residual_defaults(trained, name):
    _, before, after, options = trained[name]
    assert after < before - 0.5
    assert options["block_lr_scale"] == 1.0  # no skipless depth scaling for a residual stack


def test_the_depth_scaling_is_for_stacks_without_skips():
    from mlx_skipless.models.skipless import ModelArgs

    deep = dict(hidden_size=256, num_hidden_layers=8, intermediate_size=64, num_attention_heads=4, vocab_size=64)
    assert optimizers.hidden_lr_scale(ModelArgs(**deep)) == 0.5
    assert optimizers.hidden_lr_scale(ModelArgs(residual=True, block_norm="rmsnorm", **deep)) == 1.0


def run_cli(*argv, module="mlx_skipless.convert"):
    proc = command(module, *argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.parametrize("quantize", [False, True], ids=["bfloat16", "4-bit"])
def test_a_trained_form_converts_verified_and_runs_under_stock_mlx_lm(trained, tmp_path, quantize):
    import json

    run, *_ = trained["figure-4"]
    out = tmp_path / "out"
    flags = ["-q", "--q-group-size", "32"] if quantize else ["--dtype", "bfloat16"]
    log = run_cli("--hf-path", run, "--mlx-path", out, *flags).stdout
    assert "nothing to fuse" in log and "[VERIFY]" in log
    config = json.loads((out / "config.json").read_text())
    assert config["removed"] == ["qp", "qp"] and config["residual"] is True
    v = config["conversion"]["verification"]
    assert v["float32"]["max_rel_error"] == 0.0 and not v["degraded"]
    assert ("quantization" in config) == quantize
    text = run_cli(
        "--model", out, "--trust-remote-code", "--prompt", "def", "--max-tokens", "5", module="mlx_lm.generate"
    ).stdout
    assert "Generation: 5 tokens" in text or "Generation:" in text


def test_stock_mlx_lm_quantizes_a_trained_form_and_trains_lora_adapters_on_it(trained, tmp_path):
    """`mlx_lm convert -q`, then `mlx_lm lora` on the 4-bit copy, then generation with the adapters."""
    import json
    import types

    import mlx.core as mx
    from mlx_lm import generate, load
    from mlx_lm.convert import convert as lm_convert
    from mlx_lm.lora import CONFIG_DEFAULTS, build_parser
    from mlx_lm.lora import run as lora

    run, *_ = trained["wq-identity"]
    q4 = tmp_path / "q4"
    lm_convert(str(run), str(q4), quantize=True, q_group_size=32, trust_remote_code=True)
    assert json.loads((q4 / "config.json").read_text())["quantization"]["bits"] == 4

    data = tmp_path / "data"
    data.mkdir()
    rows = "\n".join(json.dumps({"text": t}) for t in ["def add(a, b):\n    return a + b\n", "import os\n"] * 4)
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text(rows + "\n")
    argv = ["--model", str(q4), "--trust-remote-code", "--train", "--data", str(data), "--iters", "3"]
    argv += ["--batch-size", "2", "--num-layers", "2", "--adapter-path", str(tmp_path / "ad"), "--val-batches", "1"]
    args = vars(build_parser().parse_args(argv))
    lora(types.SimpleNamespace(**{**CONFIG_DEFAULTS, **{k: v for k, v in args.items() if v is not None}}))

    model, tokenizer = load(str(q4), adapter_path=str(tmp_path / "ad"), trust_remote_code=True)
    plain, _ = load(str(q4), trust_remote_code=True)
    prompt = mx.array([tokenizer.encode("def f")])
    assert not mx.array_equal(model(prompt), plain(prompt))  # the adapters trained and are applied
    assert generate(model, tokenizer, "def f", max_tokens=4)


def test_a_converted_form_serves_concurrent_requests_as_alone(trained, tmp_path):
    from harness import greedy_completions_alone_and_together

    run, *_ = trained["figure-4-parallel"]
    run_cli("--hf-path", run, "--mlx-path", tmp_path / "out", "--dtype", "float32")
    alone, together = greedy_completions_alone_and_together(tmp_path / "out", ["def f", "import os", "x ="])
    assert alone == together and all(alone)


@pytest.mark.parametrize("name", TRAINED)
def test_batch_generate_gives_each_prompt_its_tokens_alone(trained, name):
    from mlx_lm import batch_generate
    from test_shaped_caches import assert_batch_equals_alone

    from mlx_skipless import load

    model, tokenizer = load(str(trained[name][0]))
    prompts = [tokenizer.encode(p) for p in ("def value(self", "import", "for name in items:")]
    max_tokens = [6, 3, 6]
    result = batch_generate(
        model,
        tokenizer,
        prompts,
        max_tokens=max_tokens,
        return_token_ids=True,
        return_logprobs=True,
        prefill_step_size=4,
        prefill_batch_size=2,
        completion_batch_size=2,
    )
    assert_batch_equals_alone(result, model, prompts, max_tokens)


def test_normfree_says_why_a_model_with_skips_has_no_norms_to_remove(trained, tmp_path):
    import subprocess
    import sys

    run, *_ = trained["wq-identity"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_skipless.normfree",
            "--model",
            str(run),
            "--mlx-path",
            str(tmp_path / "nf"),
            "--data",
            "stdlib/json",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "residual adds" in proc.stderr and "convert" in proc.stderr
    assert not (tmp_path / "nf").exists()
