"""Norms with a frozen scale, and folding them into the next linear layers.

A norm divides by a statistic of its input; that division is what stops a
matrix from moving across it. Heimersheim (2024) replaces the live statistic by
its average over data, then fine-tunes: the norm becomes linear, x -> C·x·g/s + b
(C centres for LayerNorm, is I for RMSNorm), and folds exactly into its neighbours:
the gain, scale and bias into the layers it feeds (W' = W·diag(g/s), c' = W·b + c),
the centring into the layers that produce its input. Folding C into the consumers
instead would make them singular (C has rank d - 1), and a singular Q cannot be
fused away.
"""

from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np


class FixedNorm(nn.Module):
    """RMSNorm or LayerNorm with its 1/rms (1/std) replaced by the constant 1/scale."""

    def __init__(self, norm: nn.Module, scale: float):
        super().__init__()
        self.centered = isinstance(norm, nn.LayerNorm)
        self.weight = norm.weight
        if self.centered and "bias" in norm:
            self.bias = norm.bias
        self.scale = scale  # a Python float: frozen, not a parameter

    def __call__(self, x):
        if self.centered:
            x = x - x.mean(-1, keepdims=True)
        y = x * (self.weight / self.scale)
        return y + self.bias if "bias" in self else y


class ScaleRecorder(nn.Module):
    """Passes through a live norm and records the mean of the statistic it divides by."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm, self.sums, self.count = norm, 0.0, 0

    def __call__(self, x):
        centered = isinstance(self.norm, nn.LayerNorm)
        z = x - x.mean(-1, keepdims=True) if centered else x
        stat = mx.sqrt(mx.mean(mx.square(z.astype(mx.float32)), -1) + self.norm.eps)
        self.sums += stat.sum().item()
        self.count += stat.size
        return self.norm(x)

    @property
    def scale(self) -> float:
        return self.sums / self.count


def fold(
    W: np.ndarray, c: Optional[np.ndarray], gain: np.ndarray, beta: Optional[np.ndarray], scale: float
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(W', c') of a linear layer (out, in) — or a stack of experts (n, out, in) —
    that absorbs the fixed norm's affine part. c' is None when no bias is needed."""
    W = np.asarray(W, np.float64)
    Wn = W * (np.asarray(gain, np.float64) / scale)
    shift = None if beta is None else W @ np.asarray(beta, np.float64)
    if c is None and (shift is None or not np.any(shift)):
        return Wn, None
    c = np.zeros(W.shape[:-1]) if c is None else np.asarray(c, np.float64)
    return Wn, c + (0 if shift is None else shift)


def center_output(W: np.ndarray, axis: int) -> np.ndarray:
    """C applied to a producer's outputs: subtract their mean over the features
    (`axis`: -2 for a linear weight (out, in), -1 for a bias or embedding rows)."""
    W = np.asarray(W, np.float64)
    return W - W.mean(axis=axis, keepdims=True)
