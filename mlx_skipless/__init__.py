"""mlx-skipless: skipless transformers for MLX, and the fusion that shrinks them."""

__version__ = "0.1.0"

# name: (module, the name there). A name here that is also a submodule would change what it
# is once the submodule is imported (the import binds the module to the package's attribute):
# so the conversion function is convert_checkpoint, and mlx_skipless.convert is the module.
# `generate` keeps mlx-lm's spelling; generate.py makes its module callable for that.
_LAZY = {
    "load": ("loading", "load"),
    "load_model": ("loading", "load_model"),
    "convert_checkpoint": ("convert", "convert"),
    "generate": ("generate", "generate"),
    "stream_generate": ("generate", "stream_generate"),
    "Model": ("models.skipless", "Model"),
    "ModelArgs": ("models.skipless", "ModelArgs"),
}


def __getattr__(name):
    # Imported on first use: mlx_lm brings in transformers, which is slow to import.
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
