"""Every command that writes a directory claims it the same way: nothing it did not write is
ever removed, whatever the flags (--force, --resume), and every number a flag takes is checked
where it enters, so bad input is one line, never a traceback, a signal death or a NaN."""

import json
import math
import shutil
from pathlib import Path

import hf_checkpoints as hf
import pytest
from harness import write_corpus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_skipless import cli, convert, corpus, normfree, train, zoo

# What a user keeps around and inside an output: a model-looking file, a note in training/,
# folders that resemble our leftovers, another tool's model directory.
INSIDE = {
    "model-fp32-backup.safetensors": b"\0" * 64,
    "training/notes.txt": b"my notes",
    "model.json/weights.bin": b"tfjs",
}
AROUND = (".out.old-v1", ".out.partial-draft", ".out.partial-123", "model.json")


def plant(out: Path, inside: dict):
    for name in AROUND:
        (out.parent / name).mkdir(parents=True, exist_ok=True)
        (out.parent / name / "keep").write_bytes(b"keep")
    for name, body in inside.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(body)


def survived(out: Path, inside: dict) -> bool:
    return all((out.parent / n / "keep").read_bytes() == b"keep" for n in AROUND) and all(
        (out / n).read_bytes() == body for n, body in inside.items()
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny checkpoint, a tiny trained run with block norms, and a corpus of text."""
    root = tmp_path_factory.mktemp("claims")
    args, flat = hf.case("llama")
    ckpt = hf.write(root / "ckpt", "llama", args, flat)
    text = write_corpus(root / "text")
    config = root / "tiny.json"
    config.write_text(
        json.dumps(
            dict(
                hidden_size=32,
                num_hidden_layers=2,
                intermediate_size=64,
                num_attention_heads=4,
                block_norm="rmsnorm",
                final_norm="rmsnorm",
                shaped_attention=True,
            )
        )
    )
    run = root / "run"
    assert (
        train.main(
            [
                "--config",
                str(config),
                "--data",
                str(text),
                "--mlx-path",
                str(run),
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--context",
                "16",
                "--vocab-size",
                "300",
                "--eval-every",
                "2",
            ]
        )
        == 0
    )
    return {"ckpt": ckpt, "text": text, "config": config, "run": run}


def commands(work, out):
    """(name, main, argv) of every command that writes `out`, with the flags that replace or continue."""
    return [
        ("convert --force", convert.main, ["--hf-path", str(work["ckpt"]), "--mlx-path", str(out), "--force"]),
        (
            "normfree --force",
            normfree.main,
            [
                "--model",
                str(work["run"]),
                "--mlx-path",
                str(out),
                "--force",
                "--data",
                str(work["text"]),
                "--steps-per-norm",
                "0",
                "--final-steps",
                "0",
                "--batch-size",
                "2",
            ],
        ),
        ("train --resume", train.main, ["--mlx-path", str(out), "--resume", "--steps", "3"]),
        (
            "train (new)",
            train.main,
            ["--config", str(work["config"]), "--data", str(work["text"]), "--mlx-path", str(out), "--steps", "2"],
        ),
        ("zoo run --force", zoo.main, ["run", "skipless-python", "--out", str(out), "--force"]),
        ("zoo run --resume", zoo.main, ["run", "skipless-python", "--out", str(out), "--resume"]),
        ("corpus --force", corpus.main, ["--out", str(out), "--force", "--offline", "--wheels", str(out.parent)]),
    ]


@pytest.mark.parametrize("added", ["nothing added", "files added"])
@pytest.mark.parametrize("index", range(7))
def test_foreign_files_survive_every_command_and_flag(work, tmp_path, capsys, index, added):
    """An output this tool wrote (a converted model), look-alikes of our leftovers beside it and,
    in one case, files the user added inside it: whatever each command does, they all survive;
    with files inside, every command refuses in one line."""
    out = tmp_path / "out"
    assert convert.main(["--hf-path", str(work["ckpt"]), "--mlx-path", str(out)]) == 0
    inside = INSIDE if added == "files added" else {}
    plant(out, inside)
    name, main, argv = commands(work, out)[index]
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    if inside:
        assert code != 0, name
        assert err.count("\n") == 1 and err.startswith("error: "), (name, err)
    assert survived(out, inside), name


def test_a_model_json_folder_is_no_zoo_run(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "model.json").mkdir(parents=True)
    for flag in ("--force", "--resume"):
        assert zoo.main(["run", "skipless-python", "--out", str(out), flag]) == 1
        assert "holds no zoo run" in capsys.readouterr().err
    assert (out / "model.json").is_dir()


def test_corpus_refuses_the_current_directory_and_a_foreign_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text("x = 1")
    for out in (".", str(tmp_path)):
        assert corpus.main(["--out", out, "--force", "--offline", "--wheels", str(tmp_path)]) == 1
        assert "current directory" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert corpus.main(["--out", "other", "--force", "--offline", "--wheels", str(tmp_path)]) == 1
    assert "not a model mlx-skipless wrote" in capsys.readouterr().err
    assert (tmp_path / "mine.py").exists() and (tmp_path / "other" / "notes.txt").exists()


# -- numbers -------------------------------------------------------------------------------------

PARSERS = {name: cli.check_numbers(parser) for name, parser in cli.parsers()}
NUMERIC = [
    (name, action)
    for name, parser in PARSERS.items()
    for action in parser._actions
    if getattr(action.type, "__name__", "") in ("int", "float")
]
BAD = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e400", "abc", "", "0x10", "1e-400"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**30), 10**30).map(str),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(NUMERIC), text=BAD)
def test_every_numeric_flag_takes_only_finite_numbers_in_range(case, text):
    """The parser of every command either refuses the value in one line or hands the command a
    finite number (a run with it is then the command's own sane business)."""
    command, action = case
    try:
        value = action.type(text)
    except Exception as e:  # noqa: BLE001 -- argparse reports these as one line
        assert type(e).__name__ in ("ArgumentTypeError", "ValueError", "TypeError"), e
        return
    assert math.isfinite(value) and value >= 0


def test_a_bad_number_is_one_line_from_the_command_line(capsys):
    assert train.main(["--mlx-path", "x", "--lr", "nan"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lr: 'nan' is not a finite number" in err


def test_whatif_force_keeps_what_it_did_not_write(tmp_path, capsys):
    import numpy as np
    from test_whatif import write_gguf

    from mlx_skipless import whatif

    write_gguf(tmp_path / "tiny.gguf", np.random.default_rng(0))
    out = tmp_path / "out"
    argv = ["--model", str(tmp_path / "tiny.gguf"), "--mlx-path", str(out), "--layers", "2"]
    assert whatif.main(argv) == 0
    plant(out, INSIDE)
    assert whatif.main(argv + ["--force"]) == 1
    assert "did not write" in capsys.readouterr().err and survived(out, INSIDE)


# -- inputs that used to pass silently -----------------------------------------------------------


def test_a_tokenizer_larger_than_the_embedding_is_refused(work, tmp_path, capsys):
    from mlx_skipless import load

    big = tmp_path / "big"
    big.mkdir()
    hf.write_tokenizer(big, 10_000)
    assert (
        convert.main(["--hf-path", str(work["ckpt"]), "--mlx-path", str(tmp_path / "o"), "--tokenizer", str(big)]) == 1
    )
    assert "token ids but the model's embedding only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert convert.main(["--hf-path", str(work["ckpt"]), "--mlx-path", str(tmp_path / "ok")]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "ok" / name).write_bytes((big / name).read_bytes())
    with pytest.raises(ValueError, match="token ids but the model's embedding only"):
        load(str(tmp_path / "ok"))


def test_a_train_config_is_read_with_typed_checks_and_its_vocabulary(work, tmp_path, capsys):
    config = json.loads(work["config"].read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**config, "residual": "false"}))
    argv = ["--data", str(work["text"]), "--steps", "1", "--batch-size", "2", "--context", "16"]
    assert train.main(["--config", str(bad), "--mlx-path", str(tmp_path / "r"), *argv]) == 1
    assert "'residual' must be true or false" in capsys.readouterr().err
    sized = tmp_path / "sized.json"
    sized.write_text(json.dumps({**config, "vocab_size": 280}))  # no --vocab-size: the config's
    assert train.main(["--config", str(sized), "--mlx-path", str(tmp_path / "v"), *argv]) == 0
    assert json.loads((tmp_path / "v" / "config.json").read_text())["vocab_size"] == 280


def test_evaluating_nothing_is_an_error_not_zero_bits(work, tmp_path, capsys):
    from mlx_skipless import evaluate

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.py").write_text("")
    assert evaluate.main(["--model", str(work["run"]), "--data", str(tmp_path / "empty")]) == 1
    assert "nothing to score" in capsys.readouterr().err


def test_convert_runs_as_a_module_and_as_the_documented_call_and_records_no_local_path(work, tmp_path):
    import subprocess
    import sys

    import mlx_skipless
    import mlx_skipless.convert  # the package's convert_checkpoint stays the function after this import

    run = subprocess.run(
        [sys.executable, "-m", "mlx_skipless.convert", "--help"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and "--hf-path" in run.stdout, run.stderr
    assert mlx_skipless.convert_checkpoint is mlx_skipless.convert.convert
    report = mlx_skipless.convert_checkpoint(
        str(work["ckpt"]), str(tmp_path / "o"), progress=False, log=lambda *_: None
    )
    assert report["source"] == work["ckpt"].name
    assert str(tmp_path) not in (tmp_path / "o" / "config.json").read_text()
    assert str(work["ckpt"].parent) not in (tmp_path / "o" / "README.md").read_text()


def test_fifos_are_refused_not_read(work, tmp_path, capsys):
    import os

    from mlx_skipless import generate

    model = tmp_path / "m"
    assert convert.main(["--hf-path", str(work["ckpt"]), "--mlx-path", str(model)]) == 0
    (model / "tokenizer.json").unlink()
    os.mkfifo(model / "tokenizer.json")
    assert generate.main(["--model", str(model), "--max-tokens", "2"]) == 1
    assert "not a regular file" in capsys.readouterr().err
    (model / "config.json").unlink()
    os.mkfifo(model / "config.json")
    assert zoo.main(["show", str(model)]) == 1
    assert "not a regular file" in capsys.readouterr().err
    run = tmp_path / "run"
    shutil.copytree(work["run"], run)
    (run / "training" / "trainer.json").unlink()
    os.mkfifo(run / "training" / "trainer.json")
    assert train.main(["--mlx-path", str(run), "--resume", "--steps", "3"]) == 1
    assert "not a regular file" in capsys.readouterr().err
