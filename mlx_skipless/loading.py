"""Open skipless checkpoints (any supported family) and converted models."""

import warnings
from dataclasses import asdict, replace
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import families, names
from .errors import CheckpointError
from .hub import TOKENIZER_FILES, read_config, read_json, resolve
from .models.skipless import Block, Model, ModelArgs
from .safetensors_reader import TensorSource


class SkiplessCheckpoint:
    """A vanilla skipless checkpoint in a Hugging Face layout, its tensors
    mapped to the skipless model's names and read lazily, block by block."""

    def __init__(self, path_or_repo: str, revision: Optional[str] = None, assume_skipless: bool = False):
        self.path = resolve(path_or_repo, revision)
        self.config = read_config(self.path)
        self.source = TensorSource(self.path)
        self.mapping = families.WeightMapping(self.config, self.source.shapes, assume_skipless, str(self.path))
        self.family, self.args = self.mapping.family.name, self.mapping.args
        if any(self.args.removed):
            raise CheckpointError(
                f"{self.path} is already reduced (layers without {sorted(set(self.args.removed) - {''})}): "
                "fusion starts from the vanilla checkpoint it was converted from; pass that instead"
            )

    def layer(self, i: int, dtype=np.float64) -> Dict[str, np.ndarray]:
        """Block i as float64 (or float32) arrays, named relative to the block
        ("self_attn.q_proj.weight")."""
        return self.mapping.layer(i, self.source.numpy if dtype == np.float64 else self.source.float32)

    def globals(self) -> Dict[str, np.ndarray]:
        """Embeddings, final norm and head, as float32 arrays under the model's names
        (vocabulary-sized: fusion takes its float64 products a few rows at a time)."""
        return self.mapping.globals(self.source.float32)

    def dtype(self) -> str:
        named = self.config.get("torch_dtype") or self.config.get("dtype")
        return named if named in ("float32", "float16", "bfloat16") else self.source.dtype()


def to_mlx(tensors: Dict[str, np.ndarray], dtype=mx.float32):
    return [(k, mx.array(np.asarray(v, np.float32)).astype(dtype)) for k, v in tensors.items()]


def block_module(args: ModelArgs, i: int, tensors: Dict[str, np.ndarray]) -> Block:
    """Block i of `args` holding `tensors` (named relative to the block), in float32."""
    block = Block(args, args.removed[i])
    block.load_weights(to_mlx(tensors))
    return block


def shell_module(args: ModelArgs, tensors: Dict[str, np.ndarray]) -> Model:
    """The model without blocks: embeddings, final norm and head, in float32."""
    shell = Model(replace(args, num_hidden_layers=0, removed=[]))
    shell.load_weights(to_mlx(tensors))
    return shell


def store(module: nn.Module, dtype, quantize: Optional[dict]) -> nn.Module:
    """Cast, then quantize as mlx-lm does (layers whose input width fits the groups)."""
    module.set_dtype(dtype)
    if quantize:
        nn.quantize(
            module,
            quantize["group_size"],
            quantize["bits"],
            mode=quantize.get("mode", "affine"),
            class_predicate=lambda _, m: (
                hasattr(m, "to_quantized") and m.weight.shape[-1] % quantize["group_size"] == 0
            ),
        )
    return module


def check_quantization(args: ModelArgs, group_size: int, bits: int):
    """Refuse settings mx.quantize rejects, or that would quantize no matrix of this
    model (`store` skips a layer whose input width is not a multiple of the group)."""
    if type(group_size) is not int or group_size <= 0:  # mx.quantize crashes the process on 0
        raise CheckpointError(f"--q-group-size must be a positive integer, not {group_size!r}")
    widths = sorted({args.hidden_size, args.num_attention_heads * args.head_dim, args.intermediate_size})
    fits = [w for w in widths if w % group_size == 0]
    if not fits:
        raise CheckpointError(
            f"--q-group-size {group_size} divides none of this model's matrix input "
            f"widths {widths}: nothing would be quantized"
        )
    try:
        mx.eval(mx.quantize(mx.zeros((1, fits[0])), group_size=group_size, bits=bits))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"-q --q-bits {bits} --q-group-size {group_size}: {e}") from None


def load_model(
    path_or_repo: str, revision: Optional[str] = None, lazy: bool = False, assume_skipless: bool = False
) -> Tuple[Model, dict]:
    """A converted model directory, or a vanilla skipless checkpoint of any family."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    path = resolve(path_or_repo, revision)
    config = read_config(path)
    if config.get("model_type") == "skipless" and not list(path.glob("model*.safetensors")):
        raise CheckpointError(f"{path} has no model*.safetensors weight files")
    if config.get("model_type") == "skipless":
        # Our own code builds the model, so the copied model_file need not run.
        model, config = mlx_lm_load_model(
            path, lazy=lazy, model_config={"model_file": None}, get_model_classes=lambda config: (Model, ModelArgs)
        )
        return model, config
    ckpt = SkiplessCheckpoint(str(path), assume_skipless=assume_skipless)
    model = Model(ckpt.args)
    dtype = getattr(mx, ckpt.dtype())
    # Block by block into the checkpoint's dtype: the float64 arrays read for fusion
    # are 8 bytes a weight, and only one block of them need exist at a time.
    weights = to_mlx(ckpt.globals(), dtype)
    for i in range(ckpt.args.num_hidden_layers):
        block = to_mlx({names.block_key(i, k): v for k, v in ckpt.layer(i).items()}, dtype)
        mx.eval([v for _, v in block])
        weights += block
    model.load_weights(weights)
    if not lazy:
        mx.eval(model.parameters())
    return model, {**ckpt.config, **asdict(ckpt.args)}


def load_tokenizer(path, eos_token_id=None, tokenizer_config: Optional[dict] = None):
    """mlx-lm's tokenizer of a model directory, or a CheckpointError naming the
    file that keeps it from loading. None where the directory has no tokenizer files."""
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer
    from transformers.utils import logging

    present = [path / n for n in TOKENIZER_FILES if (path / n).exists() or (path / n).is_symlink()]
    if not present:
        return None
    for f in present:
        if f.suffix == ".json":
            read_json(f, unique_keys=False)  # regular, valid JSON: else an error naming it
        elif not f.is_file():
            raise CheckpointError(f"{f} is not a regular file")
    # transformers warns about the model's config (unknown model_type "skipless", deprecated
    # rope names); it only needs the tokenizer.
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return mlx_lm_load_tokenizer(path, tokenizer_config or {}, eos_token_ids=eos_token_id)
    except Exception as e:  # tokenizers and transformers raise many types for a bad file
        names, why = ", ".join(f.name for f in present), " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path}: the tokenizer ({names}) does not load: {why}") from None
    finally:
        logging.set_verbosity(verbosity)


def check_tokenizer_fits(tokenizer, vocab_size: int, where):
    """Refuse a tokenizer whose ids reach past the model's embedding (mlx-lm's tokenizer
    wrapper, or a `tokenizers.Tokenizer`): those ids would read outside it."""
    if hasattr(tokenizer, "get_vocab_size"):
        n = tokenizer.get_vocab_size()
    else:
        n = max(tokenizer.get_vocab().values(), default=-1) + 1
    if n > vocab_size:
        raise CheckpointError(
            f"{where}: the tokenizer has {n:,} token ids but the model's embedding only "
            f"{vocab_size:,} rows; use the tokenizer the model was trained with"
        )


def load(
    path_or_repo: str,
    revision: Optional[str] = None,
    lazy: bool = False,
    assume_skipless: bool = False,
    tokenizer_config: Optional[dict] = None,
):
    """(model, tokenizer), like mlx_lm.load, for converted and vanilla skipless models."""
    path = resolve(path_or_repo, revision)
    model, config = load_model(str(path), None, lazy, assume_skipless)
    tokenizer = load_tokenizer(path, config.get("eos_token_id"), tokenizer_config)
    if tokenizer is None:
        raise CheckpointError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)")
    check_tokenizer_fits(tokenizer, model.args.vocab_size, path)
    return model, tokenizer
