"""Token streams and trained tokenizers come from the cache on a second run, and a changed
file or another tokenizer misses it (mlx_skipless.tokencache)."""

import os
import shutil

import numpy as np
import pytest

from mlx_skipless import corpus, data, tokencache


@pytest.fixture
def counted(tmp_path, monkeypatch):
    """A private cache, files to tokenize, and counts of the real work done."""
    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path / "cache"))
    text = tmp_path / "text"
    shutil.copytree(data.stdlib_path() / "json", text, ignore=shutil.ignore_patterns("__pycache__"))
    calls = {"encode": 0, "train": 0}

    def count(name, f):
        def wrapper(*a, **k):
            calls[name] += 1
            return f(*a, **k)

        return wrapper

    monkeypatch.setattr(data, "encode", count("encode", data.encode))
    monkeypatch.setattr(data, "train_tokenizer", count("train", data.train_tokenizer))
    return text, calls


def test_second_run_reads_the_cache_and_changes_miss_it(counted, tmp_path):
    text, calls = counted
    files = data.find_files([str(text)])
    tok = data.cached_tokenizer(files, 300)
    first = data.TokenStreams.build([str(text)], tok)
    assert calls == {"encode": 2, "train": 1}  # train and validation streams

    again = data.TokenStreams.build([str(text)], data.cached_tokenizer(files, 300))
    assert calls == {"encode": 2, "train": 1}
    assert again.files == first.files and again.train.dtype == np.int32
    np.testing.assert_array_equal(again.train, first.train)
    np.testing.assert_array_equal(again.val, first.val)
    tok.save(str(tmp_path / "tokenizer.json"))  # the same tokenizer read from a file: a hit
    data.TokenStreams.build([str(text)], data.read_tokenizer_json(tmp_path / "tokenizer.json"))
    assert calls["encode"] == 2

    data.TokenStreams.build([str(text)], tok, val_fraction=0.2)  # another split
    assert calls["encode"] == 4
    data.TokenStreams.build([str(text)], data.cached_tokenizer(files, 280))  # another tokenizer
    assert calls == {"encode": 6, "train": 2}

    edited = text / "decoder.py"
    edited.write_text(edited.read_text() + "\n# edited\n")
    changed = data.TokenStreams.build([str(text)], tok)
    assert calls["encode"] == 8 and len(changed.train) + len(changed.val) > len(first.train) + len(first.val)
    data.cached_tokenizer(data.find_files([str(text)]), 300)
    assert calls["train"] == 3

    os.utime(edited, ns=(1, 1))  # touched, not changed: a miss all the same (size and mtime are the key)
    data.TokenStreams.build([str(text)], tok)
    assert calls["encode"] == 10


def test_old_entries_are_pruned(counted, monkeypatch):
    text, calls = counted
    monkeypatch.setattr(tokencache, "KEEP", 2)
    tok = data.cached_tokenizer(data.find_files([str(text)]), 280)
    for fraction in (0.1, 0.2, 0.3):
        data.TokenStreams.build([str(text)], tok, val_fraction=fraction)
    assert len(list(tokencache.folder("tokens").glob("*.npz"))) == 2
    assert not list(tokencache.folder("tokens").glob("*.partial"))
