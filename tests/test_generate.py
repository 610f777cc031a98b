"""Acceptance (issue 4): generation from converted models, ours and stock mlx-lm's."""

import shutil
import subprocess
import sys
from pathlib import Path

import hf_checkpoints as hf
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from harness import greedy_completions_alone_and_together, mlx_lm_server, post

import mlx_skipless
from mlx_skipless import chat
from mlx_skipless import generate as generate_cli
from mlx_skipless.convert import convert

PROMPT = "def x ( n ) :"
WORKERS = Path(__file__).parent / "workers"
MLX_LAUNCH = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Vanilla skipless checkpoints and their converted forms (float32)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, family in (
        ("serial_gqa", "llama"),
        ("parallel_mha", "gpt_neox"),
        ("moe", "mixtral"),
        ("shaped", "skipless_shaped"),
    ):
        args, flat = hf.case(family, seed=1)
        src = hf.write(root / f"{name}-src", family, args, flat)
        convert(str(src), str(root / name), progress=False, log=lambda *_: None)
        out[name] = (src, root / name)
    return out


def cli_text(capsys, *argv):
    assert generate_cli.main(list(argv)) == 0
    return capsys.readouterr().out


def mlx_lm_generate(model_dir, *extra):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "generate",
            "--model",
            str(model_dir),
            "--trust-remote-code",
            "--prompt",
            PROMPT,
            "--max-tokens",
            "12",
            "--ignore-chat-template",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.split("==========")[1].strip()


@pytest.mark.parametrize("name", ["serial_gqa", "parallel_mha", "moe"])
def test_greedy_tokens_match_the_original(models, capsys, name):
    src, out = models[name]
    flags = ["--prompt", PROMPT, "--max-tokens", "12", "--verbose", "false"]
    original = cli_text(capsys, "--model", str(src), *flags).strip()
    assert cli_text(capsys, "--model", str(out), *flags).strip() == original
    assert original
    assert mlx_lm_generate(out) == original


def test_python_api_mirrors_mlx_lm(models):
    model, tokenizer = mlx_skipless.load(str(models["serial_gqa"][1]))
    ours = mlx_skipless.generate(model, tokenizer, PROMPT, max_tokens=8)
    assert ours == mlx_lm.generate(model, tokenizer, PROMPT, max_tokens=8)
    streamed = "".join(r.text for r in mlx_skipless.stream_generate(model, tokenizer, PROMPT, max_tokens=8))
    assert streamed == ours


def test_verbose_output_has_mlx_lm_timing_lines(models, capsys):
    text = cli_text(capsys, "--model", str(models["moe"][1]), "--prompt", PROMPT, "--max-tokens", "4")
    assert "Prompt: 6 tokens" in text and "Generation: 4 tokens" in text and "Peak memory" in text


def test_quantized_model_and_quantized_kv_cache(tmp_path, capsys):
    # KV quantization groups are 32 wide at least: heads of 32 features
    args, flat = hf.case("llama", hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
    src = hf.write(tmp_path / "src", "llama", args, flat)
    q = tmp_path / "q8"
    convert(str(src), str(q), quantize=True, q_bits=8, q_group_size=32, progress=False, log=lambda *_: None)
    flags = ["--prompt", PROMPT, "--max-tokens", "6", "--verbose", "false"]
    kv = ["--kv-bits", "8", "--kv-group-size", "32", "--quantized-kv-start", "0"]
    text = cli_text(capsys, "--model", str(q), *flags, *kv).strip()
    assert text and text == mlx_lm_generate(q, *kv, "--max-tokens", "6")


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing", "no such directory"),
        ("no_weights", "no model*.safetensors weight files"),
        ("long_prompt", "the prompt is 70 tokens; the model's context is 64"),
        ("kv_group", "--kv-group-size 64 does not divide the head size 8"),
        ("kv_rotating", "--kv-bits and --max-kv-size do not combine"),
    ],
)
def test_bad_model_or_prompt_is_a_one_line_error(models, tmp_path, capsys, how, message):
    model, prompt, flags = str(models["serial_gqa"][1]), PROMPT, []
    if how == "missing":
        model = str(tmp_path / "nope")
    elif how == "no_weights":
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "config.json").write_text((models["serial_gqa"][1] / "config.json").read_text())
        model = str(empty)
    elif how == "long_prompt":
        prompt = " ".join(["x"] * 70)
    else:
        flags = ["--kv-bits", "8"] + (["--max-kv-size", "32", "--kv-group-size", "32"] if how == "kv_rotating" else [])
    assert generate_cli.main(["--model", model, "--prompt", prompt, *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_max_kv_size_bounds_a_shaped_models_cache(models):
    """mlx-lm's make_prompt_cache drops --max-kv-size for a model with make_cache."""
    model, tokenizer = mlx_skipless.load(str(models["shaped"][1]))
    cache = generate_cli.prompt_cache(model, 8)
    text = mlx_lm.generate(model, tokenizer, PROMPT, max_tokens=12, prompt_cache=cache)
    assert text and all(c.size() == 8 for c in cache[: len(model.layers)])


def test_chat_resets_and_streams_like_generate(models):
    model_dir = str(models["serial_gqa"][1])
    lines = iter(["def x", "r", "return y", "q"])
    said = []
    assert (
        chat.main(
            ["--model", model_dir, "--max-tokens", "3"],
            read=lambda _: next(lines),
            write=lambda *a, end="\n", **k: said.append("".join(a) + end),
        )
        == 0
    )
    turns = "".join(said).splitlines()[1:]  # after the [INFO] line
    model, tokenizer = mlx_skipless.load(model_dir)
    # each turn after a reset is a fresh generation from its prompt
    assert turns == [mlx_lm.generate(model, tokenizer, p, max_tokens=3) for p in ("def x", "return y")]


def test_chat_stops_at_a_learned_context(tmp_path):
    """Learned positions end at the context: a chat cuts the turn that reaches it and refuses
    the next one with a line, instead of reusing the last position and talking nonsense."""
    args, flat = hf.case("gpt2", seed=2)
    src = hf.write(tmp_path / "gpt2", "gpt2", args, flat)
    lines = iter(["def x", "return y", "x = 1", "r", "def x", "q"])
    said = []
    assert (
        chat.main(
            ["--model", str(src), "--max-tokens", "40"],
            read=lambda _: next(lines),
            write=lambda *a, end="\n", **k: said.append("".join(a) + end),
        )
        == 0
    )
    out = "".join(said).splitlines()
    limit = args.max_position_embeddings
    cut = [line for line in out if line.startswith("[INFO] generating ")]
    assert len(cut) == 1 and cut[0].endswith(f"tokens: the context ends at {limit}")
    refused = [line for line in out if "this turn is not sent" in line]
    assert refused == [
        f"[INFO] the conversation holds {limit} tokens and this turn adds 3; the model's "
        f"context is {limit}: this turn is not sent; 'r' resets the conversation"
    ]
    model, tokenizer = mlx_skipless.load(str(src))
    first = mlx_lm.generate(model, tokenizer, "def x", max_tokens=40)
    text = "".join(said).split("\n", 1)[1]  # after the [INFO] chatting line
    assert text.startswith(first) and text.endswith(first + "\n")  # after the reset, the context is whole again


def test_mlx_lm_server_answers_for_a_converted_model(models):
    with mlx_lm_server(models["moe"][1]) as port:
        completion = post(port, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
        assert completion["usage"]["completion_tokens"] == 4
        assert completion["choices"][0]["text"]
        chat_reply = post(
            port, "/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
        )
        assert chat_reply["choices"][0]["message"]["content"]


def test_mlx_lm_server_batches_shaped_attention_exactly(models):
    """Concurrent requests share one left-padded batch; each gets its answer alone."""
    prompts = ["x", "def x ( n ) : return n * 2 + 1 if n else None", "import self . y"]
    alone, together = greedy_completions_alone_and_together(models["shaped"][1], prompts)
    assert all(alone) and together == alone


@pytest.mark.slow
def test_tensor_parallel_over_two_processes(models, tmp_path):
    """mlx-lm's sharded_load + mlx.launch (ring backend, localhost) through the model file's
    shard(), a full forward and a cached decode (shaped attention: the sums of sharded heads)."""
    names = ("serial_gqa", "parallel_mha", "shaped")
    run = subprocess.run(
        [
            MLX_LAUNCH,
            "--backend",
            "ring",
            "-n",
            "2",
            "--python",
            sys.executable,
            str(WORKERS / "sharded_logits.py"),
            str(tmp_path),
            *(str(models[name][1]) for name in names),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    for i, name in enumerate(names):
        model, _ = mlx_skipless.load_model(str(models[name][1]))
        tokens = mx.array(np.random.default_rng(0).integers(0, model.args.vocab_size, (2, 12)))
        ref = np.array(model(tokens))
        for got in np.load(tmp_path / f"{i}.npy"):  # full forward, then cached decode
            assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
