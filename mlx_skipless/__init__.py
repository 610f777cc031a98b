"""mlx-skipless: skipless transformers for MLX, and the fusion that shrinks them."""

__version__ = "0.1.0"

_LAZY = {"load": "loading", "load_model": "loading", "convert": "convert",
         "generate": "generate", "stream_generate": "generate",
         "Model": "models.skipless", "ModelArgs": "models.skipless"}


def __getattr__(name):
    # Imported on first use: mlx_lm brings in transformers, which is slow to import.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
