"""How far a converted model is from its original, next to what plain rounding costs.

Fusion is exact on paper but multiplies rounding error by up to cond(Q), the
condition number of the matrix whose inverse it folds into the neighbouring
block, so a number on its own says little: each figure for the converted model
comes with the same figure for the *unconverted* model stored in that dtype.
"""

from dataclasses import asdict, dataclass
from typing import Dict, Mapping, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
PROBE_BATCH, PROBE_LENGTH = 4, 32
PROBE_TOKENS = PROBE_BATCH * PROBE_LENGTH
KL_FLOOR = 1e-5  # nats per token


@dataclass(frozen=True)
class Metrics:
    """How far one model's logits are from the reference's on the probe.

    The report records it as a JSON object (`as_dict`, its keys in this order); the
    budget and the planner take either form (`of`)."""

    max_rel_error: float
    top1_agreement: float
    kl: float  # mean KL(reference || model), nats per token
    tokens: int = PROBE_TOKENS  # positions compared: records of older versions lack it

    @classmethod
    def of(cls, m: "MetricsLike") -> "Metrics":
        """`m` itself, or the record of it."""
        if isinstance(m, Metrics):
            return m
        return cls(m["max_rel_error"], m["top1_agreement"], m["kl"], m.get("tokens", PROBE_TOKENS))

    def as_dict(self) -> dict:
        return asdict(self)


MetricsLike = Union[Metrics, Mapping[str, float]]
EXACT = Metrics(max_rel_error=0.0, top1_agreement=1.0, kl=0.0, tokens=1 << 30)


def probe_tokens(vocab_size: int, batch: int = PROBE_BATCH, length: int = PROBE_LENGTH, seed: int = 0) -> mx.array:
    """A fixed batch of random token ids: every run verifies on the same input."""
    return mx.array(np.random.default_rng(seed).integers(0, vocab_size, (batch, length)))


def compare(test: np.ndarray, ref: np.ndarray) -> Dict[str, float]:
    """`measure`, as the report records it."""
    return measure(test, ref).as_dict()


def measure(test: np.ndarray, ref: np.ndarray) -> Metrics:
    """Max relative logit error, top-1 agreement and mean KL(ref || test)."""

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(test)
    error, scale = np.abs(test - ref).max(), np.abs(ref).max()
    return Metrics(
        # relative to logits that are all zero (activations that vanish), any error is infinite
        max_rel_error=float(error / scale if scale else (0.0 if error == 0 else np.inf)),
        top1_agreement=float((test.argmax(-1) == ref.argmax(-1)).mean()),
        kl=float((np.exp(lp) * (lp - lq)).sum(-1).mean()),
        tokens=int(np.prod(ref.shape[:-1])),
    )


@dataclass(frozen=True)
class Budget:
    """How much worse than storing the original in the same dtype a converted
    model may be: KL at most `kl_ratio` times rounding's (plus a floor for
    float32, where rounding's is ~0), and top-1 agreement lower by at most
    `top1_points`, or by `sigmas` standard errors of the difference of two
    agreement rates on the probe if that is more: near-ties in the logits flip
    under any rounding, and a coarse dtype (4-bit) flips many."""

    kl_ratio: float = 1.5
    top1_points: float = 1.0
    sigmas: float = 2.0

    def admits(self, converted: MetricsLike, rounding: MetricsLike) -> bool:
        converted, rounding = Metrics.of(converted), Metrics.of(rounding)
        if not all(np.isfinite(x) for x in (converted.max_rel_error, converted.top1_agreement, converted.kl)):
            return False  # a NaN compares false with everything: it would pass any test below
        p = rounding.top1_agreement
        noise = self.sigmas * np.sqrt(2 * p * (1 - p) / rounding.tokens)
        lost = p - converted.top1_agreement
        return bool(
            converted.kl <= self.kl_ratio * rounding.kl + KL_FLOOR and lost <= max(self.top1_points / 100, float(noise))
        )


def worst(*metrics: MetricsLike) -> Metrics:
    metrics = [Metrics.of(m) for m in metrics]
    return Metrics(
        max(m.max_rel_error for m in metrics),
        min(m.top1_agreement for m in metrics),
        max(m.kl for m in metrics),
        min(m.tokens for m in metrics),
    )


# What the converter refuses to write without --allow-degraded, whatever was asked for.
CLEARLY_WORSE = Budget(kl_ratio=2.0, top1_points=1.0, sigmas=3.0)


def is_degraded(converted: MetricsLike, rounding: MetricsLike) -> bool:
    return not CLEARLY_WORSE.admits(converted, rounding)


@dataclass(frozen=True)
class Verification:
    """The figures of one written conversion: the converted model in float32 and as
    stored, each against the original in float32, beside what storing the original
    the same way costs. The output's config.json and report hold `as_dict()`."""

    reference: str
    probe: str
    reference_max_abs_logit: float
    float32: Metrics
    stored_as: str
    converted: Metrics  # as stored
    original: Metrics  # the original as stored: rounding alone
    degraded: bool
    original_p_merged: Optional[Metrics] = None  # also a rounding of the original: P merged only
    float32_plan: Optional[str] = None  # "first": `float32` is that of the plan written first

    @classmethod
    def of(cls, record: Mapping) -> "Verification":
        """From the record of a verification (as `as_dict` gives it)."""
        stored = record["stored"]
        merged = stored.get("original_p_merged")
        return cls(
            record["reference"],
            record["probe"],
            record["reference_max_abs_logit"],
            Metrics.of(record["float32"]),
            record["stored_as"],
            Metrics.of(stored["converted"]),
            Metrics.of(stored["original"]),
            record["degraded"],
            None if merged is None else Metrics.of(merged),
            record.get("float32_plan"),
        )

    def as_dict(self) -> dict:
        stored = {"converted": self.converted.as_dict(), "original": self.original.as_dict()}
        if self.original_p_merged is not None:
            stored["original_p_merged"] = self.original_p_merged.as_dict()
        record = {
            "reference": self.reference,
            "probe": self.probe,
            "reference_max_abs_logit": self.reference_max_abs_logit,
            "float32": self.float32.as_dict(),
            "stored_as": self.stored_as,
            "stored": stored,
            "degraded": self.degraded,
        }
        if self.float32_plan is not None:
            record["float32_plan"] = self.float32_plan
        return record


class NumpyLinear(nn.Module):
    """A linear layer computed by numpy's BLAS in float32.

    MLX on a CPU multiplies with a slow reference BLAS unless another is preloaded;
    numpy brings an optimized one. Weights hold the values of their dtype (quantized
    ones dequantized once), products accumulate in float32 and the output is rounded
    to the dtype the MLX layer would have returned: `dtype`, or the input's if None."""

    def __init__(self, weight: np.ndarray, bias: Optional[np.ndarray] = None, dtype=mx.float32):
        super().__init__()
        self.w = np.asarray(weight, np.float32).T  # (in, out); no copy for float32
        self.b = None if bias is None else np.asarray(bias, np.float32)
        self.dtype = dtype

    @classmethod
    def of(cls, layer: nn.Module) -> "NumpyLinear":
        """The numpy twin of an MLX Linear or QuantizedLinear layer."""
        if isinstance(layer, nn.QuantizedLinear):
            weight = mx.dequantize(
                layer.weight, layer.scales, layer.get("biases"), layer.group_size, layer.bits, mode=layer.mode
            )
            dtype = None
        else:
            weight, dtype = layer.weight, layer.weight.dtype
        bias = np.asarray(layer.bias.astype(mx.float32)) if "bias" in layer else None
        return cls(np.asarray(weight.astype(mx.float32)), bias, dtype)

    def __call__(self, x: mx.array) -> mx.array:
        with np.errstate(all="ignore"):  # overflow gives inf, as in MLX: verification reports it
            y = np.asarray(x.astype(mx.float32)).reshape(-1, self.w.shape[0]) @ self.w
            if self.b is not None:
                y += self.b
        dtype = x.dtype if self.dtype is None or x.dtype == self.dtype else mx.float32
        return mx.array(y.reshape(*x.shape[:-1], -1)).astype(dtype)


def _linears(module: nn.Module) -> Dict[str, nn.Module]:
    return {
        p: m
        for p, m in tree_flatten(module.leaf_modules(), is_leaf=nn.Module.is_module)
        if isinstance(m, (nn.Linear, nn.QuantizedLinear))
    }


def on_numpy(module: nn.Module, tensors: Optional[Dict[str, np.ndarray]] = None, dtype=mx.float32) -> nn.Module:
    """`module` with every Linear and QuantizedLinear layer computed by numpy (in place):
    from its own weights, or from float32 `tensors` (named as in the module), and then
    the module's other parameters are loaded from `tensors` too. `dtype`: the one the
    weights are stored in (their values are `tensors`), which MLX would compute in."""
    linears = _linears(module)
    if tensors is None:
        module.update_modules(tree_unflatten([(p, NumpyLinear.of(m)) for p, m in linears.items()]))
        return module
    module.update_modules(
        tree_unflatten([(p, NumpyLinear(tensors[f"{p}.weight"], tensors.get(f"{p}.bias"), dtype)) for p in linears])
    )
    rest = [
        (k, mx.array(np.asarray(v, np.float32)).astype(dtype))
        for k, v in tensors.items()
        if k.rsplit(".", 1)[0] not in linears
    ]
    module.load_weights(rest)
    return module


class Streams:
    """Probe tokens pushed through several models that arrive one block at a time;
    their matrix products run on numpy's BLAS, so verifying costs what converting does."""

    def __init__(self, tokens: mx.array):
        self.tokens, self.h = tokens, {}

    def start(self, name, shell):
        self.h[name] = shell.model.embed(self.tokens)
        on_numpy(shell)

    def step(self, name, block):
        self.h[name] = on_numpy(block)(self.h[name], "causal")
        mx.eval(self.h[name])

    def finish(self, name, shell) -> np.ndarray:
        h = self.h.pop(name)
        h = shell.model.norm(h) if "norm" in shell.model else h
        return np.array(shell.head(h).astype(mx.float32), dtype=np.float64)
