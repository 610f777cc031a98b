"""The tests keep mlx-skipless's caches (token streams, tokenizers, the default corpus
place) in a temporary folder of their own, which their subprocesses inherit: a test run
neither reads a user's cache nor leaves entries in it."""

import atexit
import os
import shutil
import tempfile

from mlx_skipless import corpus

_CACHE = tempfile.mkdtemp(prefix="mlx-skipless-test-cache-")
os.environ[corpus.CACHE_ENV] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


def pytest_collection_modifyitems(items):
    """The slow tests first: under pytest-xdist, a long test that starts last keeps one core
    busy for its whole length while the other has nothing left to do."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
