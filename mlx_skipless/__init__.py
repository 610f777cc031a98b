"""mlx-skipless: skipless transformers for MLX, and the fusion that shrinks them."""

__version__ = "0.1.0"

from .models.skipless import Model, ModelArgs  # noqa: E402,F401
