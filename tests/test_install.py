"""`pip install .` (not editable) in a fresh venv has the zoo and runs the main job (issue 16, item 6),
from a directory outside the checkout."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import copy_checkout

ROOT = Path(__file__).resolve().parents[1]


def can_build_offline() -> bool:
    """setuptools >= 68 and wheel here: build without an isolated (downloaded) build environment."""
    if not importlib.util.find_spec("wheel"):
        return False
    import setuptools

    return int(setuptools.__version__.split(".")[0]) >= 68


@pytest.mark.slow
def test_installed_package_has_the_zoo_and_runs_the_main_job(tmp_path):
    source, venv, elsewhere = tmp_path / "source", tmp_path / "venv", tmp_path / "elsewhere"
    copy_checkout(ROOT, source)
    # The venv sees this interpreter's packages (mlx, mlx-lm...), so nothing is downloaded but,
    # where this Python cannot build a wheel itself, setuptools for the build.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # Run from inside a venv, this interpreter's packages are not the base one's that
    # --system-site-packages shows: name its package folders to the new venv too.
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    Path(purelib).mkdir(parents=True, exist_ok=True)
    (Path(purelib) / "_running_interpreter.pth").write_text("\n".join(ours) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed copy, not this checkout
    isolation = ["--no-build-isolation"] if can_build_offline() else []
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", *isolation, str(source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere.mkdir()

    def run(*argv):
        done = subprocess.run(argv, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{argv}\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}"
        return done.stdout

    where = run(python, "-c", "import mlx_skipless; print(mlx_skipless.__file__)")
    assert where.startswith(str(venv)), where
    listed = run(str(venv / "bin" / "mlx-skipless"), "zoo", "list")
    assert "mistral-7b" in listed and "skipless-python" in listed.split("recipes:")[1]
    assert "Mistral-7B" in run(python, "-m", "mlx_skipless.zoo", "show", "mistral-7b")
    # the recipes are read from the installed package (a recipe's run: tests/test_zoo.py, test_cli.py)
    assert "recipes: skipless-python" in run(python, "-m", "mlx_skipless.zoo", "show", "skipless-python")
    run("bash", "-c", f"{python} -m mlx_skipless.convert && {python} -m mlx_skipless.generate --max-tokens 8")
    assert (elsewhere / "mlx_model" / "config.json").exists()
