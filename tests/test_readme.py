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
from test_zoo import README_RECIPE, check_tiny_run

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
    (
        r"--steps 2000",
        "--steps 4 --batch-size 2 --context 32 --vocab-size 300 --eval-every 2 --eval-batches 1 --save-every 4",
    ),
    (
        r"(mlx_skipless\.normfree .*)$",
        r"\1 --data stdlib/json --steps-per-norm 0 --final-steps 0 --calibration-batches 1 --eval-batches 1"
        r" --batch-size 2",
    ),
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


# The commands in chains that read each other's outputs, each walked in its own copy of the
# checkout so that pytest-xdist spreads them; a command goes to the first chain that takes it.
CHAINS = {
    "zoo": lambda command: "mlx_skipless.zoo" in command,
    "train": lambda command: re.search(r"(--mlx-path|--model|--hf-path) run\b", command),
    "quantized": lambda command: "--mlx-path out" in command,
    "model": lambda command: True,  # the main job's ./mlx_model, and all that reads it
}


def chain(name):
    """The commands of chain `name` as the walk runs them, scaled down."""
    for command in commands():
        if any(command.startswith(prefix) for prefix in SKIPPED):
            continue
        if next(n for n, takes in CHAINS.items() if takes(command)) == name:
            for pattern, replacement in SCALED:
                command = re.sub(pattern, replacement, command)
            yield command


def test_the_walk_covers_every_kind_of_command():
    walked = {name: list(chain(name)) for name in CHAINS}
    assert all(walked.values()), walked  # no chain emptied by a README edit
    every = [c for commands in walked.values() for c in commands]
    assert len(every) >= 10 and any("zoo run" in c for c in every) and any("mlx_lm chat" in c for c in every)


@pytest.mark.slow
@pytest.mark.parametrize("name", CHAINS)
def test_every_readme_command_runs_as_written(tmp_path, name):
    work = tmp_path / "checkout"
    copy_checkout(ROOT, work)
    scaled_config(work)
    # `python`, `mlx_lm` and `mlx-skipless` of the interpreter running the tests
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in chain(name):
        t0 = time.perf_counter()
        run = subprocess.run(
            ["bash", "-c", command], cwd=work, env=env, input=TYPED, capture_output=True, text=True, timeout=600
        )
        assert run.returncode == 0, f"{command}\n{run.stdout[-1500:]}\n{run.stderr[-3000:]}"
        if f"zoo run {README_RECIPE} --size tiny" in command:  # the recipe test_zoo leaves to this walk
            runs = work / "zoo-runs" / f"{README_RECIPE}-tiny"
            check_tiny_run({d.name: d for d in runs.iterdir() if d.is_dir()}, run.stdout)
        print(f"{time.perf_counter() - t0:6.1f}s {command}")
    for block in fenced("python") if name == "model" else ():  # they use ./mlx_model
        run = subprocess.run([sys.executable, "-c", block], cwd=work, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{block}\n{run.stderr[-3000:]}"


# -- the README's structure, and the docs it links to (fast: no subprocesses) -------------------

DOCS = sorted((ROOT / "docs").glob("*.md"))


def anchor(heading):
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_readme_stays_a_readme():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 300, "the measurement log belongs in docs/numbers.md"
    measured = re.sub(r"\(\d+ min \d+ s on", "(TIME on", lines[14])  # the time as last measured
    assert lines[8:14] + [measured] + lines[15:16] == [  # the two commands at the top; .ci/run depends on them
        "```bash",
        "pip install -e .                                                     # set-up (or `pip install .`; not on PyPI)",  # noqa: E501
        "python -m mlx_skipless.convert && python -m mlx_skipless.generate   # main job, on the packaged model",
        "```",
        "",
        "```bash",
        'pip install -e ".[test]" && python -m pytest                         # the tests (TIME on 2 CPU cores)',
        "```",
    ]


@pytest.mark.parametrize("path", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_every_link_resolves_inside_the_repository(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file, _, fragment = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        assert resolved.exists(), f"{path.name}: {target} does not exist"
        assert ROOT in resolved.parents or resolved == ROOT, f"{path.name}: {target} is outside the repository"
        if fragment and resolved.suffix == ".md":
            assert fragment in anchors(resolved), f"{path.name}: {target}: no such heading"


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert [p.name for p in DOCS if f"(docs/{p.name})" not in readme] == []


def test_layout_table_lists_every_module():
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(mlx_skipless/[\w/]+\.py)` \|", layout, re.M))
    modules = {
        str(p.relative_to(ROOT))
        for p in [*(ROOT / "mlx_skipless").glob("*.py"), *(ROOT / "mlx_skipless/models").glob("*.py")]
        if p.name != "__init__.py" or p.parent.name == "mlx_skipless"
    }
    assert sorted(modules - listed) == [], "add a row to the README's layout table"
    assert sorted(listed - modules) == [], "the README's layout table lists a module that is gone"
