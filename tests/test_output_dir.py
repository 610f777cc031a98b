"""Issue 15 (items 1 and 10): the output directory never costs the user data, and
nothing of a failed or interrupted run stays behind."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import hf_checkpoints as hf
import pytest

from mlx_skipless import convert as convert_cli
from mlx_skipless.convert import convert
from mlx_skipless.errors import CheckpointError
from mlx_skipless.manifest import MANIFEST
from mlx_skipless.output_dir import staged_directory


def quiet(**kw):
    return dict(progress=False, log=lambda *_: None, **kw)


@pytest.fixture
def src(tmp_path):
    """A tiny llama checkpoint in proj/ckpt, beside the user's own proj/train.py."""
    args, flat = hf.case("llama")
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "train.py").write_text("# the user's work")
    return hf.write(tmp_path / "proj" / "ckpt", "llama", args, flat)


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def run_cli(argv, capsys):
    code = convert_cli.main(argv)
    err = capsys.readouterr().err
    return code, err


def test_the_current_directory_is_refused_as_output(src, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    code, err = run_cli(["--hf-path", str(src), "--mlx-path", ".", "--force"], capsys)
    assert code == 1 and "current directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "proj"]
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("where", ["parent", "same", "inside", "symlink", "dot"])
def test_output_never_overlaps_the_input(src, tmp_path, capsys, monkeypatch, where):
    proj = tmp_path / "proj"
    before = snapshot(proj)
    out = {"parent": proj, "same": src, "inside": src / "out", "symlink": tmp_path / "link", "dot": Path(".")}[where]
    if where == "symlink":
        out.symlink_to(src)
    if where == "dot":  # relative paths: the input named from inside it
        monkeypatch.chdir(src)
        src = Path(".")
    code, err = run_cli(["--hf-path", str(src), "--mlx-path", str(out), "--force"], capsys)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1
    assert snapshot(proj) == before
    assert not (proj / "ckpt" / "out").exists()


def test_force_replaces_only_our_models_and_says_so(src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = run_cli(["--hf-path", str(src), "--mlx-path", str(out), "--force"], capsys)
    assert code == 1 and "not a model mlx-skipless wrote" in err
    assert (out / "notes.txt").read_text() == "mine"

    (out / "notes.txt").unlink()
    assert run_cli(["--hf-path", str(src), "--mlx-path", str(out), "--force"], capsys)[0] == 0
    assert json.loads((out / "config.json").read_text())["mlx_skipless"]["command"] == "convert"
    code, err = run_cli(["--hf-path", str(src), "--mlx-path", str(out), "--force"], capsys)
    assert code == 0 and f"replacing {out} (a model written by mlx-skipless convert)" in err

    (out / "adapters.safetensors").write_text("a user's LoRA adapters")  # not ours: kept
    code, err = run_cli(["--hf-path", str(src), "--mlx-path", str(out), "--force"], capsys)
    assert code == 1 and "adapters.safetensors" in err and (out / "adapters.safetensors").exists()


PAUSED_MIDWAY = """
import sys, time
from pathlib import Path
from mlx_skipless.convert import convert
src, out, flags = sys.argv[1], sys.argv[2], Path(sys.argv[3])
def log(message):
    if message.startswith("[INFO] weights"):  # written into its staging directory, not committed
        (flags / "midway").touch()
        for _ in range(600):
            if (flags / "go").exists():
                break
            time.sleep(0.1)
convert(src, out, progress=False, log=log)
"""


def test_a_second_writer_of_the_same_output_fails(src, tmp_path, capsys):
    out, flags = tmp_path / "out", tmp_path / "flags"
    flags.mkdir()
    first = subprocess.Popen(
        [sys.executable, "-c", PAUSED_MIDWAY, str(src), str(out), str(flags)], stderr=subprocess.PIPE, text=True
    )
    try:
        while not (flags / "midway").exists():
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.05)
        code, err = run_cli(["--hf-path", str(src), "--mlx-path", str(out), "--force", "--no-verify"], capsys)
        assert code == 1 and "another process is writing" in err
    finally:
        (flags / "go").touch()
        first.wait(timeout=120)
    assert first.returncode == 0
    assert "verification" in json.loads((out / "config.json").read_text())["conversion"]  # the first's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flags", "out", "proj"]  # lock released


def test_an_output_written_meanwhile_is_not_replaced(src, tmp_path):
    """--force replaces what was there when the run began, not what another run wrote since."""
    out = tmp_path / "out"

    def another_run_finishes(message):
        if message.startswith("[INFO] ") and not out.exists():  # after the first check
            with staged_directory(out) as staging:
                (staging / "config.json").write_text(json.dumps({"model_type": "skipless", "mlx_skipless": {}}))

    with pytest.raises(CheckpointError, match="written by another process"):
        convert(str(src), str(out), force=True, progress=False, log=another_run_finishes)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "config.json"]


SIGTERM_MIDWAY = """
import os, signal, sys
from mlx_skipless.convert import convert
def log(message):
    if message.startswith("[INFO] weights"):  # inside the staging directory, fused and written
        os.kill(os.getpid(), signal.SIGTERM)
convert(sys.argv[1], sys.argv[2], progress=False, log=log)
"""


def test_sigterm_cleans_up_like_ctrl_c(src, tmp_path):
    out = tmp_path / "deep" / "er" / "out"
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_MIDWAY, str(src), str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 128 + 15, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]  # no partial, no parents it made


def test_a_refused_conversion_leaves_no_directories_it_made(src, tmp_path):
    def refuse(message):
        if message.startswith("[INFO] weights"):
            raise CheckpointError("refused midway")

    with pytest.raises(CheckpointError):
        convert(str(src), str(tmp_path / "a" / "b" / "out"), progress=False, log=refuse)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]


def test_stale_partials_of_dead_runs_are_removed(src, tmp_path, capsys):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = [tmp_path / f".out.partial-{dead}-0a1b2c3d", tmp_path / f".out.old-{dead}"]
    # only the exact names a run makes are leftovers: look-alikes are the user's
    kept = [
        ".other.partial-1-00000000",
        ".out.old-v1",
        ".out.partial-draft",
        ".out.partial-k3j2h1g0",
        f".out.partial-{dead}-0a1b2c3d-copy",
    ]
    (tmp_path / "out").mkdir()  # (so the old output is not restored in its place)
    (tmp_path / "out" / "config.json").write_text("{}")
    for p in stale + [tmp_path / k for k in kept]:
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"\0" * 1024)
    (tmp_path / "out").joinpath("config.json").unlink()
    code, err = run_cli(["--hf-path", str(src), "--mlx-path", str(tmp_path / "out"), "--force"], capsys)
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["out", "proj"])
    assert "left by an interrupted run" in err


def test_a_run_killed_between_the_two_renames_loses_nothing(src, tmp_path, capsys):
    """The old output renamed aside, the new one not yet in place, then SIGKILL: a rerun puts the
    old one back before anything else."""
    out = tmp_path / "out"
    assert run_cli(["--hf-path", str(src), "--mlx-path", str(out)], capsys)[0] == 0
    before = (out / "config.json").read_bytes()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    out.rename(tmp_path / f".out.old-{dead}")
    code, err = run_cli(["--hf-path", str(src), "--mlx-path", str(out)], capsys)
    assert code == 1 and "exists; pass --force" in err and "restored" in err
    assert (out / "config.json").read_bytes() == before


def test_output_gets_normal_permissions(src, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert run_cli(["--hf-path", str(src), "--mlx-path", str(tmp_path / "out")], capsys)[0] == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
