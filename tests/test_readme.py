"""Every command the README shows runs as written (issue 16, item 8), from a copy of the
checkout, with training scaled down; the few that cannot run here are listed with why."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import copy_checkout
from mlx_skipless.zoo import tomllib  # tomli on Python 3.10

ROOT = Path(__file__).resolve().parents[1]

SKIPPED = {  # command prefix -> why it is not run here
    "pip install": "changes the environment (tests/test_install.py installs into a fresh venv)",
    "mlx_lm server": "serves until stopped (tests/test_generate.py runs the server)",
    "python scripts/bench_decode.py": "a benchmark: minutes of decoding",
    "python scripts/make_checkpoint.py": "writes synthetic checkpoints of 0.8 to 28 GB",
    "LD_PRELOAD=": "conversions of those checkpoints and their benchmarks: seconds to an hour of fusing",
}
SCALED = [  # (pattern, replacement): the same command, a few seconds of training
    (r"--config zoo/skipless-python.toml", "--config narrow.toml"),  # written by scaled_config
    (r"--data stdlib\b", "--data stdlib/json"),
    (r"--steps 2000", "--steps 4 --batch-size 2 --context 32 --vocab-size 300 --eval-every 2 --save-every 4"),
    (r"(mlx_skipless\.normfree .*)$", r"\1 --data stdlib/json --steps-per-norm 0 --final-steps 0 --calibration-batches 1 --eval-batches 1 --batch-size 2"),
]
TYPED = "import os\nq\n"  # what a user types into the chat commands


def scaled_config(work):
    """The zoo's demo config at a quarter of its width: the same architecture, 1/16 the FLOPs."""
    model = tomllib.loads((work / "zoo/skipless-python.toml").read_text())["model"]
    model.update(hidden_size=64, intermediate_size=192)
    lines = [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {str(v).lower()}" for k, v in model.items()]
    (work / "narrow.toml").write_text("\n".join(lines).replace("'", '"') + "\n")


def fenced(language):
    blocks = re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b.replace("\\\n", " ") for b in blocks]


def commands():
    for block in fenced("bash"):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                yield line


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path):
    work = tmp_path / "checkout"
    copy_checkout(ROOT, work)
    scaled_config(work)
    # `python`, `mlx_lm` and `mlx-skipless` of the interpreter running the tests
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    ran = []
    for command in commands():
        if any(command.startswith(prefix) for prefix in SKIPPED):
            continue
        for pattern, replacement in SCALED:
            command = re.sub(pattern, replacement, command)
        t0 = time.perf_counter()
        run = subprocess.run(["bash", "-c", command], cwd=work, env=env, input=TYPED, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, f"{command}\n{run.stdout[-1500:]}\n{run.stderr[-3000:]}"
        ran.append(command)
        print(f"{time.perf_counter() - t0:6.1f}s {command}")
    for block in fenced("python"):
        run = subprocess.run([sys.executable, "-c", block], cwd=work, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{block}\n{run.stderr[-3000:]}"
    assert len(ran) >= 10 and any("zoo run" in c for c in ran) and any("mlx_lm chat" in c for c in ran)
