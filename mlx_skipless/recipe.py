"""A zoo recipe's steps as commands of this package, run in order in one work directory.

`zoo.run` sizes a recipe and runs it here; `zoo.commands` gives the same commands without
running them, for a caller that names them beside what they produced.
"""

import importlib
import json
import math
import shlex
import shutil
from pathlib import Path
from typing import NamedTuple, Optional

from . import cli
from .manifest import foreign_entries, written_by_us

RUN_MARK = "zoo-run.json"  # a zoo run's own mark, and the model config its train step reads
MODULES = {
    "train": "train",
    "normfree": "normfree",
    "convert": "convert",
    "quantize": "convert",
    "generate": "generate",
}


class Step(NamedTuple):
    kind: str
    module: str  # the command's module in this package
    argv: list  # its arguments; training's without --resume
    target: Optional[Path]  # the model it writes (generate: none)
    source: Optional[Path]  # the checkpoint it is made from (train: none)

    def command(self) -> str:
        return f"python -m mlx_skipless.{self.module} {shlex.join(self.argv)}"


def flags(options: dict) -> list:
    """A step's options as its command's flags: True a bare flag, a list its values, False and None nothing."""
    out = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        elif value is not False and value is not None:
            out += [flag, str(value)]
    return out


def plan(name: str, steps, out: Path, dirs: Optional[dict] = None) -> list:
    """[Step] of the sized `steps` ([(kind, options)]) in `out`: each in out/KIND, or the
    directory `dirs` names for its kind; each made from the newest unconverted checkpoint."""
    dirs = dirs or {}
    planned, source, latest = [], None, None
    for kind, options in steps:
        target = out / dirs.get(kind, kind)
        if kind == "train":
            argv = ["--config", str(out / RUN_MARK), "--mlx-path", str(target)]
        elif kind == "normfree":
            argv = ["--model", str(source), "--mlx-path", str(target), "--force"]
        elif kind in ("convert", "quantize"):
            argv = ["--hf-path", str(source), "--mlx-path", str(target), "--force"]
            argv += ["-q"] if kind == "quantize" else []
        elif kind == "generate":
            argv, target = ["--model", str(latest)], None
        else:
            raise KeyError(f"recipe {name!r}: unknown step {kind!r}")
        planned.append(Step(kind, MODULES[kind], argv + flags(options), target, source))
        if kind in ("train", "normfree"):
            source = target
        if target is not None:
            latest = target
    return planned


def claim(out: Path, kinds, force: bool, resume: bool) -> bool:
    """Check that `out` may hold this run: absent, empty, or an earlier zoo run of which every
    entry is the mark or a step's model directory this tool wrote and nobody added to. With
    `force`, remove those models (True); an earlier run without `force` or `resume` is refused."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise cli.CommandError(f"{out} exists and is not a directory: choose another --out")
    entries = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if not entries:
        return False
    try:
        mark = json.loads((out / RUN_MARK).read_text()) if (out / RUN_MARK).is_file() else None
    except (OSError, ValueError):
        mark = None
    if not isinstance(mark, dict) or mark.get("writer") != "mlx-skipless zoo":
        raise cli.CommandError(f"{out} is not empty and holds no zoo run (no {RUN_MARK} of ours): choose another --out")
    ours = {RUN_MARK, *kinds}
    foreign = [e for e in entries if e not in ours] + [
        f"{k}/{f}"
        for k in kinds
        if (out / k).exists()
        for f in (["(not written by mlx-skipless)"] if not written_by_us(out / k) else foreign_entries(out / k))
    ]
    if foreign:
        raise cli.CommandError(
            f"{out} holds what no zoo run wrote ({', '.join(foreign[:5])}): move it or choose another --out"
        )
    if force:
        for k in kinds:
            if (out / k).exists():
                shutil.rmtree(out / k)
        return True
    if not resume:
        raise cli.CommandError(
            f"{out} holds an earlier run: pass --resume to continue its training "
            "(and redo the later steps) or --force to start over"
        )
    return False


def trained_to(checkpoint: Path) -> int:
    """The step a training checkpoint reached (0: none yet)."""
    from .modeldir import training_state

    return training_state(checkpoint).get("step", 0)


def stale(target: Path, source: Path) -> bool:
    """`target` is missing or older than the checkpoint it was made from."""
    made, used = target / "config.json", source / "model.safetensors"
    return not made.exists() or made.stat().st_mtime < used.stat().st_mtime


def kept(step: Step, options: dict) -> Optional[str]:
    """Why a finished `step` need not run again (None: it must): training that reached its
    steps, or a model newer than the checkpoint it was made from."""
    if step.kind == "train":
        done = trained_to(step.target)
        return f"trained ({done} steps)" if done >= options.get("steps", math.inf) else None
    if step.target is not None and not stale(step.target, step.source):
        return "newer than " + step.source.name
    return None


def run(
    name: str,
    size: str,
    model: dict,
    steps,
    out: Path,
    log=print,
    force: bool = False,
    resume: bool = False,
    dirs: Optional[dict] = None,
    keep: bool = False,
) -> dict:
    """Run the sized `steps` of recipe `name` for `model` in `out`; returns {kind: model directory}.
    An existing `out` is refused unless `force` (start over) or `resume` (continue its training,
    redo the later steps). With `keep`, `out` is the caller's, continued as it stands: a step
    `kept` says is finished is not run again, and an interrupted training resumes."""
    planned = plan(name, steps, out, dirs)
    if not keep and claim(out, [(dirs or {}).get(kind, kind) for kind, _ in steps], force, resume):
        log(f"[zoo] --force: removing the earlier run's models in {out}")
    train_dir = next((s.target for s in planned if s.kind == "train"), None)
    resume = resume and train_dir is not None and train_dir.exists()
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MARK).write_text(
        json.dumps({"writer": "mlx-skipless zoo", "recipe": name, "size": size, "model": model}, indent=2)
    )
    paths = {}
    for step, (kind, options) in zip(planned, steps):
        why = kept(step, options) if keep else None
        log(f"[zoo] {name} ({size}): {kind}" + (f" kept: {why}" if why else ""))
        if why is None:
            again = kind == "train" and (resume or (keep and trained_to(step.target) > 0))
            _execute(name, step, step.argv + (["--resume"] if again else []))
        if step.target is not None:
            paths[kind] = step.target
    return paths


def _execute(name: str, step: Step, argv: list):
    command = importlib.import_module(f".{step.module}", __package__)
    try:  # the step's error, said once, with the step it stopped
        code = command.main.nested(argv)
    except BrokenPipeError:  # `| head`: the outer command ends quietly
        raise
    except Exception as e:  # noqa: BLE001 -- reported as the step's own error would be
        stopped = cli.CommandError(f"recipe {name!r} stopped at {step.kind!r}: {cli.message(e)}")
        stopped.exit_code = getattr(e, "exit_code", 1)
        raise stopped from e
    if code:
        raise cli.CommandError(f"recipe {name!r} stopped at {step.kind!r} (exit status {code})")
