"""Command lines (issues 15 and 16): one vocabulary, one way of failing, commands that run as written."""

import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import hf_checkpoints as hf
import mlx.core as mx
import mlx_lm
import pytest
from test_zoo import check_tiny_run

import mlx_skipless
from mlx_skipless import chat, cli, zoo
from mlx_skipless import convert as convert_cli
from mlx_skipless import generate as generate_cli
from mlx_skipless.convert import convert

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The packaged demo, converted (float32)."""
    out = tmp_path_factory.mktemp("demo") / "mlx_model"
    convert(None, str(out), **QUIET)
    return out


def one_error_line(capsys, message=""):
    """The error: one line, the last on stderr (progress bars may come before it), no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0] and "Traceback" not in err, err
    assert message in lines[0], err
    return lines[0]


# -- one way of failing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-tokens", "0"], "--max-tokens/-m: 0 is out of range"),
        (["--prompt", ""], "the prompt is empty"),
        (["--max-kv-size", "0"], "--max-kv-size: 0 is out of range"),
        (["--kv-bits", "4", "--kv-group-size", "128"], "--kv-group-size 128 does not divide the head size 64"),
        (["--kv-bits", "3", "--kv-group-size", "48"], "group size 48 is not supported"),
        (["--kv-bits", "7"], "--kv-bits 7"),
        (["--top-p", "0"], "--top-p: 0 is out of range"),
    ],
)
def test_generate_refuses_bad_input_in_one_line(demo, capsys, flags, message):
    assert generate_cli.main(["--model", str(demo), *flags]) in (1, 2)  # 2: refused as it was parsed
    one_error_line(capsys, message)


def test_invalid_utf8_on_stdin_is_one_line(demo, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"def f(\xff\xfe):")))
    assert generate_cli.main(["--model", str(demo), "--prompt", "-"]) == 1
    one_error_line(capsys, "stdin is not UTF-8 text")


def test_generation_is_bounded(tmp_path, capsys):
    args, flat = hf.case("gpt2", seed=2)
    src = hf.write(tmp_path / "gpt2", "gpt2", args, flat)
    limit = args.max_position_embeddings
    # mlx-lm reads -1 as "no limit": past learned positions that never stopped
    run = subprocess.run(
        [sys.executable, "-m", "mlx_skipless.generate", "--model", str(src), "--max-tokens", "-1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and run.stderr.strip().startswith("error: argument --max-tokens/-m: -1 is out of range")
    assert (
        generate_cli.main(["--model", str(src), "--prompt", "x", "--max-tokens", "100000", "--verbose", "false"]) == 0
    )
    assert f"the context ends at {limit}" in capsys.readouterr().err


def test_verbose_shows_the_traceback(demo, capsys):
    assert generate_cli.main(["--model", str(demo), "--prompt", "", "--verbose", "true"]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert zoo.main(["show", "gpt-5", "--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_errors_are_said_by_kind(capsys):
    assert cli.message(KeyError("model.norm.weight")) == "missing 'model.norm.weight'"
    assert cli.message(ValueError("line one\n  line two")) == "line one line two"
    assert cli.message(RecursionError()) == "input nested too deeply"
    assert "unexpected: rerun with --verbose" in cli.message(TypeError("a bug"))

    def degraded():
        raise convert_cli.DegradedError("clearly worse")

    assert cli.guarded(degraded) == 3
    assert capsys.readouterr().err == "error: clearly worse\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "--hf-path", "MISSING", "--mlx-path", "OUT"],
        ["generate", "--model", "MISSING"],
        ["chat", "--model", "MISSING"],
        ["train", "--config", "MISSING.toml", "--mlx-path", "OUT"],
        ["normfree", "--model", "MISSING", "--mlx-path", "OUT"],
        ["zoo", "show", "gpt-5"],
        ["whatif", "--model", "MISSING.gguf", "--mlx-path", "OUT"],
        ["fidelity", "--model", "MISSING"],
    ],
)
def test_every_command_fails_in_one_line_through_the_dispatcher(tmp_path, capsys, argv):
    argv = [a.replace("MISSING", str(tmp_path / "missing")).replace("OUT", str(tmp_path / "out")) for a in argv]
    assert cli.main(argv) == 1
    one_error_line(capsys)
    assert not (tmp_path / "out").exists()
    assert getattr(__import__(f"mlx_skipless.{argv[0]}", fromlist=["main"]).main, "build_parser", None)


def test_normfree_refuses_a_model_without_norms_before_reading_any_data(tmp_path, capsys):
    """The packaged demo is already norm-free: say so at once, not after tokenizing --data."""
    demo = cli.__file__.replace("cli.py", "demo/skipless-python")
    assert (
        cli.main(
            ["normfree", "--model", demo, "--mlx-path", str(tmp_path / "out"), "--data", str(tmp_path / "never-read")]
        )
        == 1
    )
    assert capsys.readouterr().err == "error: this model has no norms inside its blocks\n"


def test_a_closed_pipe_ends_quietly(tmp_path):
    read, write = os.pipe()
    os.close(read)  # `| head` that has already exited: every write fails
    run = subprocess.run(
        [sys.executable, "-m", "mlx_skipless.zoo", "show", "mistral-7b", "--json"],
        cwd=tmp_path,
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    os.close(write)
    assert "BrokenPipeError" not in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert run.returncode == 141


def test_upload_without_network_is_one_line_and_keeps_the_model(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    out = tmp_path / "out"
    assert convert_cli.main(["--mlx-path", str(out), "--no-verify", "--upload-repo", "someone/model"]) == 1
    line = one_error_line(capsys, "uploading to someone/model failed")
    assert f"kept in {out}" in line and (out / "config.json").exists()


# -- one vocabulary --------------------------------------------------------------------------------


def flags(parser):
    return {s for a in parser._actions for s in a.option_strings}


def test_one_vocabulary_for_models_outputs_and_generation():
    parsers = dict(cli.parsers())
    for name in ("generate", "chat", "normfree", "whatif", "fidelity"):
        assert "--model" in flags(parsers[name]), name
    assert {"--hf-path", "--model"} <= flags(parsers["convert"])  # as mlx_lm convert
    for name in ("convert", "train", "normfree", "whatif"):
        assert "--mlx-path" in flags(parsers[name]), name
    for name in ("generate", "chat", "convert", "fidelity"):
        assert {"--revision", "--assume-skipless", "--trust-remote-code"} <= flags(parsers[name]), name
    shared = {
        "--top-k",
        "--min-p",
        "--top-p",
        "--temp",
        "--seed",
        "--kv-bits",
        "--kv-group-size",
        "--quantized-kv-start",
        "--max-kv-size",
        "--adapter-path",
        "--system-prompt",
        "--max-tokens",
    }
    assert shared <= flags(parsers["chat"]) and shared <= flags(parsers["generate"])
    assert "--q-mode" in flags(parsers["convert"])
    assert "whatif" in cli.available()


def test_quantization_flags_without_q_are_an_error(tmp_path, capsys):
    for extra in (["--q-bits", "8"], ["--q-group-size", "32"], ["--q-mode", "mxfp4"]):
        assert convert_cli.main(["--mlx-path", str(tmp_path / "o"), *extra]) == 1
        one_error_line(capsys, "without -q/--quantize")
    assert not (tmp_path / "o").exists()


def test_convert_takes_model_and_q_mode_as_mlx_lm_does(tmp_path):
    out = tmp_path / "o"
    assert (
        convert_cli.main(
            [
                "--model",
                str(convert_cli.DEFAULT_SOURCE),
                "--mlx-path",
                str(out),
                "-q",
                "--q-mode",
                "mxfp4",
                "--no-verify",
            ]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    model, tokenizer = mlx_lm.load(str(out), trust_remote_code=True)
    assert mlx_lm.generate(model, tokenizer, "def f(", max_tokens=3)


def test_chat_and_generate_apply_lora_adapters(demo, tmp_path, capsys):
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    config = {"num_layers": 2, "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0}}
    model, tokenizer = mlx_skipless.load(str(demo))
    model.freeze()  # as mlx_lm lora does: only the adapters train
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"])
    mx.random.seed(3)
    adapters = {
        k: mx.random.normal(v.shape) * (1 if "lora_b" in k else 0.1)
        for k, v in tree_flatten(model.trainable_parameters())
    }
    assert adapters
    model.load_weights(list(adapters.items()), strict=False)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "fine_tune_type": "lora"}))
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), adapters)
    expected = mlx_lm.generate(model, tokenizer, "def f(", max_tokens=6)
    plain = mlx_lm.generate(*mlx_skipless.load(str(demo)), "def f(", max_tokens=6)
    assert expected != plain  # the adapters change something

    common = ["--model", str(demo), "--adapter-path", str(tmp_path), "--max-tokens", "6"]
    assert generate_cli.main([*common, "--prompt", "def f(", "--verbose", "false"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()
    said, lines = [], iter(["def f(", "q"])
    assert (
        chat.main(common, read=lambda _: next(lines), write=lambda *a, end="\n", **k: said.append("".join(a) + end))
        == 0
    )
    assert "".join(said[1:]).strip() == expected.strip()


def test_readme_lists_every_command_and_its_flags():
    assert cli.flag_table() in (ROOT / "README.md").read_text(), "run: python scripts/readme_flags.py"


def test_every_flag_says_what_it_does_and_its_default():
    """--help explains every argument of every command and subcommand, and names the default
    of each one that has a default to name (store_true flags are off unless given)."""
    import argparse
    import importlib

    seen = {name: importlib.import_module(f"mlx_skipless.{name}").build_parser() for name in cli.COMMANDS}
    seen.update(cli.parsers())  # the zoo's subcommands
    missing, undefaulted = [], []
    for name, parser in seen.items():
        for a in parser._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            label = f"{name} {'/'.join(a.option_strings) or a.dest}"
            if not (a.help or "").strip():
                missing.append(label)
            elif (
                a.help != argparse.SUPPRESS
                and a.default not in (None, False, argparse.SUPPRESS)
                and "default" not in a.help
            ):
                undefaulted.append(label)
    assert not missing, f"no help: {missing}"
    assert not undefaulted, f"help names no default: {undefaulted}"


# -- what the project prints runs as written ----------------------------------------------------


def test_converted_demo_has_a_chat_template_that_changes_no_prompt(demo):
    model, tokenizer = mlx_skipless.load(str(demo))
    assert tokenizer.has_chat_template
    prompt = "def fibonacci(n):\n    return"
    assert generate_cli.encode_prompt(tokenizer, prompt) == tokenizer.encode(prompt)
    run = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "chat", "--model", str(demo), "--trust-remote-code", "--max-tokens", "4"],
        cwd=demo,
        input="import os\nq\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]


def test_model_card_installs_from_the_repository_and_names_its_model(demo):
    card = (demo / "README.md").read_text()
    assert "pip install mlx-skipless" not in card and "not on PyPI" in card
    assert f"--model {demo}" in card


@pytest.mark.slow
def test_zoo_run_twice_needs_force_or_resume_and_json_is_clean(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "skipless-python", "--size", "tiny", "--out", str(out)]
    assert zoo.main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    assert set(json.loads(captured.out)) == {"train", "normfree", "convert", "quantize"}
    assert "[zoo]" in captured.err
    check_tiny_run(json.loads(captured.out), captured.err)  # the recipe's own end-to-end check (test_zoo)
    assert zoo.main(argv) == 1
    line = one_error_line(capsys, "--resume")
    assert "--force" in line
    assert zoo.main([*argv, "--resume", "--json"]) == 0
    assert "resuming" in capsys.readouterr().err
    assert zoo.main(argv[:-1] + [str(tmp_path)]) == 1  # not a zoo run: never removed
    one_error_line(capsys, "holds no zoo run")
    assert out.exists()


def test_zoo_table_says_what_the_converter_removes(demo):
    rows = {r["name"]: r for r in zoo.table_rows()}
    layers = json.loads((demo / "config.json").read_text())["conversion"]["layers"]
    recorded = Counter(e["removed"].replace("p", "").upper() for e in layers)  # what the conversion inverted
    said = rows["skipless-python"]["removed"]
    assert said.endswith(" and P") and all(m in said for m in recorded)
    assert len(recorded) == 1 or all(f"{m} ({n} layer" in said for m, n in recorded.items())
    assert rows["mistral-7b"]["removed"] == "Q and P"  # GQA: only Q is square
    assert rows["gemma-7b"]["removed"] == "nothing"


def test_no_citations_of_documents_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    notes = ("DESIGN", "BENCHMARKING", "LITERATURE", "DEVELOPERS")  # the developers' notes outside the repository
    pattern = re.compile(r"\b(" + "|".join(notes) + r")\b|\.\./" + "shared")
    hits = [
        f
        for f in tracked
        if f.endswith((".py", ".md", ".toml"))
        and f != "tests/test_cli.py"
        and pattern.search((ROOT / f).read_text(errors="replace"))
    ]
    assert not hits
