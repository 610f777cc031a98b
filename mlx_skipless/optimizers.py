"""The optimizer and learning-rate schedule a training run steps with.

Why wider and deeper stacks need a smaller step for their block matrices.
With every matrix at lr 1e-3, a d 256 x 4 skipless model learns but
d 512 x 8 stays at the corpus's unigram entropy (5.9 nats: token frequencies
only). `scripts/signal_propagation.py` logs, per layer, the output RMS and the
mean cosine between the positions of a sequence (1: every token maps to the same
vector, rank collapse) and the attention entropy. At initialisation both shapes
are healthy in every layer (cosine 0.02-0.03, entropy 0.999 of uniform, RMS
0.6): the initialisation is not the cause. The first steps are. Adam moves each
weight by about lr per step whatever the width, so a block's output moves in
proportion to lr x width, and without a residual path each layer's change
compounds through every layer above it; the early gradient is dominated by the
direction every position shares (token frequencies), so the stack grows a common
component layer by layer until it swamps the token-specific signal. Measured
(`scripts/signal_propagation.py --size 256x8 --steps 20`, 16 x 128 tokens of the
standard library, 1,024-token BPE, OpenBLAS preloaded), d 256 x 8 after 20 steps
at a flat lr 1e-3 (`--block-lr-scale 1`): cosine 0.05-0.89 in layers 0-6 and
0.996 in the last, last-layer RMS 23.5, attention entropy down to 0.50, val loss
6.02 (unigram 5.92): depth alone suffices. d 512 x 8 collapses faster (cosine
0.998-1.00 in layers 4-7 and entropy 0.16-0.33 by step 10, val loss rising from
6.69 at step 5 to 7.05 at step 10). The fix, a default: the matrices inside the
blocks train at lr x hidden_lr_scale(args) = lr x min(1, 256 / d) x
min(1, 4 / layers) (muP's 1/width for hidden matrices under Adam, and 1/depth
for a stack without skips); embeddings, head and norm gains keep lr, and up to
d 256 x 4 nothing changes. d 256 x 8 then keeps cosine 0.03-0.14 in layers 0-6
(0.49 in the last), entropy >= 0.985, and reaches val loss 5.41 at step 20
(docs/training.md, "Training recipe at scale").
"""

import mlx.core as mx
import mlx.optimizers as optim

from . import names
from .models.skipless import ModelArgs

BASE_WIDTH, BASE_DEPTH = 256, 4  # the largest shape the unscaled learning rate trains


def hidden_lr_scale(args: ModelArgs) -> float:
    """The learning rate of the matrices inside the blocks, relative to `lr`: a model
    wider or deeper than BASE_WIDTH x BASE_DEPTH steps its block matrices by less
    (μP-style, lr ∝ 1/width, and ∝ 1/depth for a stack without skips, where every
    layer's change compounds through all the layers above it; a residual stack adds
    each layer's change instead). See the module docstring."""
    depth = 1.0 if args.residual else min(1.0, BASE_DEPTH / args.num_hidden_layers)
    return min(1.0, BASE_WIDTH / args.hidden_size) * depth


def is_hidden(path: str, w: mx.array) -> bool:
    return path.startswith(names.BLOCKS) and w.ndim >= 2


OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")


def make_optimizer(
    lr: float,
    scale: float,
    steps: int,
    warmup: int,
    weight_decay: float,
    kind: str = "adamw",
    muon_lr: float = 0.02,
    shape: str = "cosine",
    cooldown: float = 0.2,
):
    """AdamW, the block matrices at lr · scale; or Muon for the block matrices (at
    muon_lr · scale) with AdamW for embeddings, head and the 1-D gains, which
    Muon's orthogonalized update does not suit."""
    rate = lambda r: schedule(r, steps, warmup, shape, cooldown)
    adamw = lambda r: optim.AdamW(rate(r), weight_decay=weight_decay)
    if kind == "muon":
        # Muon's update has unit spectral norm whatever the width; weight decay through
        # its coupled L2 term would be orthogonalized away, so it has none.
        return optim.MultiOptimizer([optim.Muon(rate(muon_lr * scale), weight_decay=0.0), adamw(lr)], [is_hidden])
    if scale == 1.0:
        return adamw(lr)
    return optim.MultiOptimizer([adamw(lr * scale), adamw(lr)], [is_hidden])


def cooldown_start(steps: int, cooldown: float) -> int:
    """The first step of a warmup-stable-decay run's cooldown."""
    return steps - max(1, round(cooldown * steps))


def schedule(lr: float, steps: int, warmup: int, shape: str = "cosine", cooldown: float = 0.2):
    """Linear warm-up, then cosine decay to lr/10; or ("wsd") a constant rate and a
    1 − sqrt cooldown to zero over the last `cooldown` of the steps (Hägele et al.
    2024): as good as cosine, and a run saved before its cooldown can be extended
    to more steps without starting over."""
    warmup = max(warmup, 1)
    warm = optim.linear_schedule(lr / warmup, lr, warmup)
    if shape == "cosine":
        decay = optim.cosine_decay(lr, max(steps - warmup, 1), end=lr / 10)
        return optim.join_schedules([warm, decay], [warmup])
    start = max(cooldown_start(steps, cooldown), warmup)
    length = max(steps - start, 1)

    def stable_then_cool(step):  # join_schedules counts its steps from the warm-up's end
        # the optimizer's step is unsigned: subtract in floating point, or it wraps around
        done = mx.clip((step.astype(mx.float32) + warmup - start) / length, 0.0, 1.0)
        return lr * (1 - mx.sqrt(done))

    return optim.join_schedules([warm, stable_then_cool], [warmup])
