"""Which square matrix each layer loses: the plan behind `convert --remove auto`.

A layer that loses B (its Q, or K or V in MHA) stores matrices multiplied by
B⁻¹, which amplifies the target dtype's rounding by up to cond(B): exact on
paper, but on real trained matrices a bfloat16 conversion can lose all top-1
agreement that plain bfloat16 rounding of the original keeps.
That is a worst-case bound, often far from what happens, so the planner
measures instead: the plans form a ladder, from "every layer loses its
best-conditioned matrix" to "nothing removed" (the original itself, which is
within any budget), each rung keeping B in one more of the worst-conditioned
layers; the converter tries the top rung and, if the converted model is over
the fidelity budget, bisects the ladder. Bisection assumes that keeping B in
more ill-conditioned layers never makes the model worse, which is what the
bound says. Without measurements (--no-verify) the bound alone decides.
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .fusion import SINGULAR_COND

# The bound's rule: keep B when cond(B) exceeds both. Fusion multiplies the dtype's own
# rounding error by up to cond(B), harmless while cond(B)·u is tiny (float32) or cond(B)
# itself is small; measured in tests/test_convert.py (cond 1e2 and 1e4 in bf16).
AMPLIFICATION_BUDGET = 0.01
MAX_AMPLIFICATION = 10.0

Conds = Sequence[Dict[str, float]]  # per layer: {"q": cond(Q), ...} for each square projection


def best(conds: Conds) -> List[Optional[str]]:
    """Per layer the best-conditioned square projection, None where there is none
    or it is singular."""
    out = []
    for row in conds:
        name = min(row, key=row.get) if row else None
        out.append(name if name and row[name] <= SINGULAR_COND else None)
    return out


def bound_limit(unit_roundoff: float) -> float:
    return max(MAX_AMPLIFICATION, AMPLIFICATION_BUDGET / unit_roundoff)


def doubtful(conds: Conds, unit_roundoff: float) -> List[int]:
    """Layers whose best B the bound would keep: only a measurement can remove it."""
    limit = bound_limit(unit_roundoff)
    return [i for i, (row, n) in enumerate(zip(conds, best(conds))) if n and row[n] > limit]


def bound_plan(conds: Conds, unit_roundoff: float, merge_p: str) -> Tuple[List[str], Dict[int, str]]:
    """(forms, notes) from the condition numbers alone."""
    limit = bound_limit(unit_roundoff)
    forms = [n + merge_p if n and row[n] <= limit else merge_p for row, n in zip(conds, best(conds))]
    return forms, notes_for(conds, forms, f"exceeds the bound's limit {limit:.3g} (nothing measured)")


def ladder(conds: Conds, merge_p: str) -> List[List[str]]:
    """Rung k keeps B in the k worst-conditioned removable layers; the last rung
    removes nothing, not even P, so it is the original model."""
    names = best(conds)
    order = sorted((i for i, n in enumerate(names) if n), key=lambda i: -conds[i][names[i]])
    rungs = []
    for k in range(len(order) + 1):
        kept = set(order[:k])
        rungs.append([merge_p if (n is None or i in kept) else n + merge_p for i, n in enumerate(names)])
    rungs.append([""] * len(conds))
    return rungs


def search(admits: Callable[[int], bool], top: int, failed: int = 0) -> int:
    """The lowest rung in (failed, top] that admits(), given that `failed` does
    not and `top` does (the original model)."""
    lo, hi = failed, top
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if admits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def notes_for(conds: Conds, forms: Sequence[str], why: str) -> Dict[int, str]:
    """Why each layer that keeps its Q/K/V does."""
    notes = {}
    for i, (row, name, form) in enumerate(zip(conds, best(conds), forms)):
        if form.replace("p", ""):
            continue
        if not row:
            notes[i] = "no square Q/K/V to remove"
        elif name is None:
            notes[i] = _kept(row, "is singular")
        else:
            notes[i] = _kept(row, why)
    return notes


def _kept(row: Dict[str, float], why: str) -> str:
    name = min(row, key=row.get)
    return f"kept Q/K/V: best condition number {row[name]:.3g} ({name.upper()}) {why}"
