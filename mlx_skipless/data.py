"""Text corpora for training: files in, token streams out.

A corpus is any set of files or folders; `stdlib` names the running Python's
standard library, a code corpus every machine has, and a corpus directory built
by `mlx_skipless.corpus` (`corpus`: the one in its default place) stands for its
training split; its held-out packages are for evaluation only. Files go to the
validation split by a hash of their path, so the split does not depend on file order.
Token streams and trained tokenizers are cached (mlx_skipless.tokencache): a second
run on the same files starts in seconds.
"""

import inspect
import json
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np

from . import corpus, tokencache

EOS = "<|endoftext|>"
DEFAULT_PATTERNS = ("*.py", "*.txt", "*.md", "*.rst")
MIN_VAL_TOKENS = 1024  # windows may overlap; they must fit
ENCODE_CHUNK = 256  # texts per encode_batch call: all of the corpus's Encodings at once take 4.5 GB


def stdlib_path() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def find_files(paths: Sequence[str], patterns: Sequence[str] = DEFAULT_PATTERNS, split: str = "train") -> List[Path]:
    files = []
    for p in paths:
        if p == "stdlib" or p.startswith("stdlib/"):
            path = stdlib_path() / p.removeprefix("stdlib").lstrip("/")
        elif p == "corpus":
            path = corpus.DEFAULT_OUT.expanduser()
            if not (path / corpus.MANIFEST).is_file():
                raise FileNotFoundError(f"corpus: no corpus at {path}; build it: python -m mlx_skipless.corpus")
        else:
            path = Path(p).expanduser()
        path = corpus.split_of(path, split)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [
                f for pattern in patterns for f in path.rglob(pattern) if f.is_file() and "site-packages" not in f.parts
            ]
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    files = sorted(set(files))
    if not files:
        raise FileNotFoundError(f"no files matching {', '.join(patterns)} under {', '.join(paths)}")
    return files


def is_validation(path: Path, fraction: float) -> bool:
    return zlib.crc32(str(path.name).encode()) % 10_000 < fraction * 10_000


def read_texts(files: Sequence[Path]) -> List[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def cached_tokenizer(files: Sequence[Path], vocab_size: int, log=print):
    """train_tokenizer on `files`, or the one trained on them before (same files, sizes
    and modification times, vocabulary size, tokenizers version and training code)."""
    import tokenizers

    name = tokencache.key(
        "tokenizer",
        tokencache.file_signature(files),
        vocab_size,
        tokenizers.__version__,
        inspect.getsource(train_tokenizer),
    )
    text = tokencache.load_text("tokenizers", name)
    if text is not None:
        log(f"[INFO] the {vocab_size}-token BPE tokenizer of these {len(files)} files, from the cache")
        return tokenizers.Tokenizer.from_str(text)
    log(f"[INFO] training a {vocab_size}-token BPE tokenizer on {len(files)} files")
    tok = train_tokenizer(read_texts(files), vocab_size)
    tokencache.store_text("tokenizers", name, tok.to_str())
    return tok


# A base model has no roles: its chat template renders the messages' text as it is, so
# a prompt gives the same tokens with or without it, and mlx_lm chat (which needs a
# template) runs the model as a plain continuation of what the user types.
PLAIN_CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def save_tokenizer(tok, directory: Path, context: int):
    directory = Path(directory)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": EOS,
                "bos_token": EOS,
                "unk_token": EOS,
                "model_max_length": context,
                "clean_up_tokenization_spaces": False,
                "chat_template": PLAIN_CHAT_TEMPLATE,
            },
            indent=2,
        )
    )


def read_tokenizer_json(path: Path):
    """The `tokenizers.Tokenizer` of a tokenizer.json, or of the one in directory `path`: the
    bare tokenizer this module trains and encodes with, not loading.load_tokenizer's mlx-lm
    wrapper (which generation needs)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(path) / "tokenizer.json" if Path(path).is_dir() else path))


def encode(tok, texts: Sequence[str]) -> np.ndarray:
    """One stream of token ids, each text followed by the end-of-text token."""
    eos, texts = tok.token_to_id(EOS), list(texts)
    ids = [
        np.append(np.asarray(e.ids, np.int32), eos)
        for i in range(0, len(texts), ENCODE_CHUNK)
        for e in tok.encode_batch(texts[i : i + ENCODE_CHUNK])
    ]
    return np.concatenate(ids) if ids else np.zeros(0, np.int32)


@dataclass
class TokenStreams:
    """The token ids of a set of files, split into a training and a validation stream:
    what training, norm removal and their losses read. It lives here, beside the
    tokenizers and find_files that make it, and not in corpus.py, which is a command
    that builds a corpus *directory* of source files (one of the inputs this reads)."""

    train: np.ndarray
    val: np.ndarray
    files: int

    @classmethod
    def build(cls, paths, tok, val_fraction=0.05, patterns=DEFAULT_PATTERNS, log=print):
        """The token streams of the files under `paths`, from the cache when these files
        (paths, sizes, modification times) were tokenized by this tokenizer before."""
        files = find_files(paths, patterns)
        name = tokencache.key(
            "streams", tokencache.tokenizer_id(tok), tokencache.file_signature(files), val_fraction, MIN_VAL_TOKENS
        )
        cached = tokencache.load_streams(name)
        if cached is not None:
            log(f"[INFO] token streams of {len(files)} files from the cache")
            return cls(cached["train"], cached["val"], len(files))
        log(f"[INFO] tokenizing {len(files)} files (cached for the next run)")
        corpus = cls._tokenize(files, tok, val_fraction)
        tokencache.store_streams(name, train=corpus.train, val=corpus.val)
        return corpus

    @classmethod
    def _tokenize(cls, files, tok, val_fraction):
        val_files = [f for f in files if is_validation(f, val_fraction)]
        train_files = [f for f in files if not is_validation(f, val_fraction)]
        train, val = encode(tok, read_texts(train_files)), encode(tok, read_texts(val_files))
        if len(val) < MIN_VAL_TOKENS:  # too few files to split by file: split the stream
            stream = np.concatenate([train, val])
            cut = int(len(stream) * (1 - val_fraction))
            train, val = stream[:cut], stream[cut:]
        if len(val) < MIN_VAL_TOKENS or len(train) < MIN_VAL_TOKENS:
            raise ValueError(f"the corpus is too small: {len(train) + len(val)} tokens")
        return cls(train, val, len(files))

    def batch(self, step: int, batch_size: int, context: int, seed: int = 0):
        """Random windows, a function of (seed, step) alone: a resumed run sees the same data."""
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.train) - context - 1, batch_size)
        windows = np.stack([self.train[s : s + context + 1] for s in starts])
        return windows[:, :-1], windows[:, 1:]

    def validation(self, batches: int, batch_size: int, context: int):
        """Fixed, evenly spaced windows of the validation split."""
        n = batches * batch_size
        starts = np.linspace(0, len(self.val) - context - 1, n).astype(int)
        windows = np.stack([self.val[s : s + context + 1] for s in starts])
        for i in range(0, n, batch_size):
            yield windows[i : i + batch_size, :-1], windows[i : i + batch_size, 1:]
