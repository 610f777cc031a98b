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

from dataclasses import asdict, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import fusion, verify
from .fusion import SINGULAR_COND
from .names import attention
from .report import degraded

# The bound's rule: keep B when cond(B) exceeds both. Fusion multiplies the dtype's own
# rounding error by up to cond(B), harmless while cond(B)·u is tiny (float32) or cond(B)
# itself is small; measured in tests/test_convert.py (cond 1e2 and 1e4 in bf16).
AMPLIFICATION_BUDGET = 0.01
MAX_AMPLIFICATION = 10.0

Conds = Sequence[Dict[str, float]]  # per layer: {"q": cond(Q), ...} for each square projection
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def storage_roundoff(dtype: str, q_bits: Optional[int] = None) -> float:
    """The relative rounding error of storing in `dtype`, or in `q_bits`-bit quantization if coarser."""
    return max(UNIT_ROUNDOFF[dtype], 2.0**-q_bits if q_bits else 0.0)


def condition_numbers(ckpt) -> list:
    """Per layer {"q": cond(Q), ...} for every square projection of a checkpoint, as the conversion reports them."""
    square = fusion.square_projections(ckpt.args)
    return [
        {m: fusion.factor_and_condition(layer[attention(m) + ".weight"])[1] for m in square}
        for layer in map(ckpt.layer, range(ckpt.args.num_hidden_layers))
    ]


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


def _over_bound(limit: float) -> str:
    return f"exceeds the bound's limit {limit:.3g} (nothing measured)"


def doubtful(conds: Conds, unit_roundoff: float) -> List[int]:
    """Layers whose best B the bound would keep: only a measurement can remove it."""
    limit = bound_limit(unit_roundoff)
    return [i for i, (row, n) in enumerate(zip(conds, best(conds))) if n and row[n] > limit]


def bound_plan(conds: Conds, unit_roundoff: float, merge_p: str) -> Tuple[List[str], Dict[int, str]]:
    """(forms, notes) from the condition numbers alone."""
    limit = bound_limit(unit_roundoff)
    forms = [n + merge_p if n and row[n] <= limit else merge_p for row, n in zip(conds, best(conds))]
    return forms, notes_for(conds, forms, _over_bound(limit))


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


def first_plan(remove: str, merge_p: str, layers: int, unit: float, measured: bool):
    """What the first pass fuses: a fixed list of forms, or, for --remove auto, a
    function from a layer's condition numbers to its form, decided as each block
    is read. Measured, that is the ladder's top rung; otherwise the bound's plan."""
    if remove != "auto":
        return [remove + merge_p] * layers
    if measured:
        return lambda row: ladder([row], merge_p)[0][0]
    return lambda row: bound_plan([row], unit, merge_p)[0][0]


def settle(passes, staging, first, merge_p: str, unit: float, budget, stored_as: str, log):
    """(forms, written pass, planning record, notes) of --remove auto once the
    first pass is written: measured against `budget` (None: the bound decided)."""
    conds = passes.conds
    if budget is None:
        planning = {
            "method": "bound: keep B where cond(B) is past "
            f"max({MAX_AMPLIFICATION:g}, {AMPLIFICATION_BUDGET:g}/u), u = {unit:.3g}"
        }
        notes = notes_for(conds, first.forms, _over_bound(bound_limit(unit)))
        return first.forms, first, planning, notes
    rungs = ladder(conds, merge_p)
    forms, first, planning = measured_plan(
        passes, staging, rungs, len(doubtful(conds, unit)), first, budget, stored_as, log
    )
    notes = notes_for(conds, forms, f"removing it put the model over the budget in {stored_as}")
    return forms, first, planning, notes


def measured_plan(passes, staging, rungs, n_doubtful, first, budget, stored_as, log):
    """(forms, written pass, planning record) for --remove auto with verification.

    `first`, the top rung, is already written; if it is over the budget, the
    ladder is bisected and the chosen rung written instead. The first
    `n_doubtful` rungs remove a layer that the condition-number bound would keep:
    they must be within `budget`. Later rungs are at least as cautious as the
    bound and need only not be clearly worse than rounding, so that measuring
    never removes less than the bound would (on a sensitive model, noise on the
    probe can exceed a tight budget however well-conditioned B is). Rounding noise is
    measured twice where blocks merge P: the original as stored, and the
    original with only P merged, an exact re-expression that inverts nothing.
    The budget is relative to the worse of the two, because on a sensitive
    model two equally good roundings can differ several-fold in KL."""
    noise = {"original": first.checked.original}
    figures = {0: first.checked.converted}
    p_merged = len(rungs) - 2 if rungs[-2] != rungs[-1] else None

    def admits(k):
        if k == len(rungs) - 1:
            return True  # the original model itself
        if k not in figures:
            log(f"[PLAN] trying rung {k} of {len(rungs) - 1}: Q/K/V kept in the {k} worst-conditioned layers")
            figures[k] = passes.measure(rungs[k])
        return (budget if k < n_doubtful else verify.CLEARLY_WORSE).admits(figures[k], verify.worst(*noise.values()))

    if not admits(0) and p_merged is not None:
        if p_merged not in figures:  # rung 0 is the P-merged one when no layer can lose Q/K/V
            log(f"[PLAN] over the fidelity budget in {stored_as}; measuring a second rounding of the original")
            figures[p_merged] = passes.measure(rungs[p_merged])
        noise["p_merged"] = figures[p_merged]
    chosen = 0
    if not admits(0):
        log(
            f"[PLAN] removing every removable Q/K/V is over the fidelity budget in {stored_as}; "
            "searching for the largest plan within it"
        )
        # the P-merged rung is a reference rounding itself: within budget by definition
        chosen = search(admits, len(rungs) - 1 if p_merged is None else p_merged)
        first = passes.write_instead(staging, first, rungs[chosen], figures.get(chosen))
    if "p_merged" in noise:
        v = first.checked
        first = first._replace(
            checked=replace(
                v,
                original_p_merged=noise["p_merged"],
                degraded=degraded(v.float32, v.converted, verify.worst(*noise.values())),
            )
        )
    planning = {
        "method": "measured: the top rung, then bisection on layers ordered by condition number",
        "budget": asdict(budget),
        "doubtful_layers": n_doubtful,
        "rounding": {k: m.as_dict() for k, m in noise.items()},
        "chosen_rung": chosen,
        "trials": [
            {"rung": k, "removed": [f or "-" for f in rungs[k]], "converted": m.as_dict(), "admitted": admits(k)}
            for k, m in figures.items()
        ],
    }
    return rungs[chosen], first, planning
