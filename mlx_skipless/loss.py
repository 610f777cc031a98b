"""The language-modelling loss, and its value on held-out text (training and norm removal)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .data import TokenStreams


def cross_entropy(model, x, y):
    return nn.losses.cross_entropy(model(x), y).mean()


def validation_loss(model, corpus: TokenStreams, context: int, batches: int = 8, batch_size: int = 16) -> float:
    """Mean loss on fixed held-out windows: the same figure for every model compared."""
    losses = [
        cross_entropy(model, mx.array(x), mx.array(y)).item()
        for x, y in corpus.validation(batches, batch_size, context)
    ]
    return float(np.mean(losses))
