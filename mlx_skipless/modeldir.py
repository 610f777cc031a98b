"""Model directories: the files every command writes (one format for all), and their reader.

convert, train, normfree and whatif all write the same thing: config.json
(ModelArgs under Hugging Face names, plus which command wrote it and that
command's record), the weights in mlx-lm's files (model.safetensors, or shards
and an index), a copy of the model file so that stock mlx-lm runs it with
--trust-remote-code, and the tokenizer when there is one. A trainer's own state
(step, options, optimizer moments) lives in training/, where no loader looks for
weights. Where the directory goes, and that it appears whole or not at all, is
output_dir.OutputDir's job.
"""

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from . import __version__
from .errors import CheckpointError
from .hub import read_config, read_json
from .manifest import OPTIMIZER_STATE as OPTIMIZER
from .manifest import TRAINER_STATE as STATE
from .manifest import TRAINING_DIR, WRITER_KEY
from .models import skipless
from .safetensors_reader import read_header
from .shards import ShardWriter

MODEL_FILE = "skipless.py"


def write_config(directory: Path, args: skipless.ModelArgs, command: str, dtype: str = "float32", **entries):
    """config.json and the model file. `entries`: the command's record
    (conversion=..., training=...), token ids, quantization."""
    config = {k: v for k, v in asdict(args).items() if v is not None}  # None: the default
    config.update(architectures=["SkiplessForCausalLM"], model_file=MODEL_FILE, torch_dtype=dtype)
    config.update({k: v for k, v in entries.items() if v is not None})
    config[WRITER_KEY] = {"version": __version__, "command": command}
    (Path(directory) / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))
    shutil.copy(skipless.__file__, Path(directory) / MODEL_FILE)


def write_weights(directory: Path, params: dict, total_parameters: Optional[int] = None):
    """Tensors by name, in mlx-lm's shard layout; `total_parameters` where the tensors
    hold packed (quantized) weights."""
    writer = ShardWriter(Path(directory))
    writer.add(params)
    writer.close(total_parameters or sum(v.size for v in params.values()))


def save(
    directory: Path,
    model: skipless.Model,
    args: skipless.ModelArgs,
    command: str,
    tokenizer=None,
    record: Optional[dict] = None,
    training: Optional[dict] = None,
    optimizer=None,
):
    """A model and its tokenizer (a `tokenizers.Tokenizer`) into `directory`,
    which the caller staged; `training` and `optimizer`: the trainer's state."""
    from . import data

    directory = Path(directory)
    params = dict(tree_flatten(model.parameters()))
    dtype = str(next(iter(params.values())).dtype).removeprefix("mlx.core.")
    eos = tokenizer.token_to_id(data.EOS) if tokenizer is not None else None
    write_config(
        directory,
        args,
        command,
        dtype,
        bos_token_id=eos,
        eos_token_id=eos,
        **({command: record} if record is not None else {}),
    )
    write_weights(directory, params)
    if tokenizer is not None:
        data.save_tokenizer(tokenizer, directory, args.max_position_embeddings)
    if training is not None or optimizer is not None:
        (directory / TRAINING_DIR).mkdir()
    if training is not None:
        (directory / TRAINING_DIR / STATE).write_text(json.dumps(training, indent=2))
    if optimizer is not None:
        mx.save_safetensors(str(directory / TRAINING_DIR / OPTIMIZER), dict(tree_flatten(optimizer.state)))


class Loaded(NamedTuple):
    model: skipless.Model
    args: skipless.ModelArgs
    tokenizer: object  # a tokenizers.Tokenizer, or None
    training: dict  # the trainer's state, or {}


def _training_file(path: Path, name: str) -> Path:
    """training/NAME, or where versions before 0.2 kept it (beside the weights)."""
    inside = path / TRAINING_DIR / name
    return inside if inside.exists() or not (path / name).exists() else path / name


def read(path) -> Loaded:
    """A model directory any command wrote: model, args, tokenizer, trainer state."""
    from . import data

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model directory")
    config = read_config(path)
    if config.get("model_type") != "skipless":
        raise CheckpointError(
            f"{path} is not a skipless model directory (model_type "
            f"{config.get('model_type')!r}); convert it with mlx_skipless.convert first"
        )
    from .loading import check_tokenizer_fits, load_model

    model, _ = load_model(str(path))
    tokenizer = data.read_tokenizer_json(path) if (path / "tokenizer.json").is_file() else None
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, model.args.vocab_size, path)
    return Loaded(model, model.args, tokenizer, training_state(path))


def training_state(path) -> dict:
    """The trainer's state of a run directory (step, options, history); {} where none."""
    state = _training_file(Path(path), STATE)
    if not state.exists():
        return {}
    record = read_json(state)  # a regular file of JSON, or a one-line error
    if not isinstance(record, dict):
        raise CheckpointError(f"{state} must hold a JSON object")
    return record


def read_optimizer_state(path):
    f = _training_file(Path(path), OPTIMIZER)
    if not f.exists():
        raise CheckpointError(f"{path} has no optimizer state to resume from ({TRAINING_DIR}/{OPTIMIZER})")
    read_header(f)  # a regular file with a sound safetensors header, before MLX's reader sees it
    state = mx.load(str(f))
    bad = next((k for k, v in state.items() if not mx.isfinite(v).all().item()), None)
    if bad is not None:
        raise CheckpointError(
            f"{f}: the optimizer state {bad!r} holds non-finite values; resuming from it would turn the weights to NaN"
        )
    return tree_unflatten(list(state.items()))
