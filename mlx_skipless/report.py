"""The conversion report: the record stored as `conversion` in config.json, and its log lines."""

import numpy as np

from . import __version__, counting, verify
from .names import LM_HEAD


def verification_record(logits, reference, stored_as, probe_shape):
    """The verification of one pass: the converted model in float32 and as stored, each against the
    original in float32, beside the original's own rounding in the stored dtype."""
    ref = reference["original"]
    converted = verify.compare(logits["converted"], ref)
    stored = verify.compare(logits["converted_stored"], ref)
    rounding = verify.compare(reference["original_stored"], ref)
    return {
        "reference": "the original model in float32",
        "probe": f"{probe_shape[0]} x {probe_shape[1]} random token ids, seed 0",
        "reference_max_abs_logit": float(np.abs(ref).max()),
        "float32": converted,
        "stored_as": stored_as,
        "stored": {"converted": stored, "original": rounding},
        "degraded": degraded(converted, stored, rounding),
    }


def degraded(float32, stored, rounding):
    """Clearly worse than rounding the original the same way, or than exact in float32."""
    return verify.is_degraded(stored, rounding) or verify.is_degraded(float32, verify.EXACT)


def build_report(source, ckpt, args, new_args, forms, notes, inverted, dtype, quant):
    """The conversion report without its plan and verification, which the caller adds."""
    savings = counting.compare(args, new_args)
    layers = []
    for i, (form, inv) in enumerate(zip(forms, inverted)):
        entry = {"layer": i, "removed": form}
        if inv is not None:
            entry.update(inverted=inv.matrix, cond=inv.cond)
        if i in notes:
            entry["note"] = notes[i]
        layers.append(entry)
    return {
        "source": source,
        "family": ckpt.family,
        "mlx_skipless_version": __version__,
        "dtype": dtype,
        "quantization": quant,
        "layers": layers,
        "weights": {
            "before": savings["vanilla"]["total"],
            "after": savings["reduced"]["total"],
            "removed": savings["removed"],
            "removed_fraction": savings["removed_fraction"],
            "untied_head": savings["reduced"]["components"].get(LM_HEAD, 0)
            - savings["vanilla"]["components"].get(LM_HEAD, 0),
        },
        "predicted_speedup": {"paper": savings["speedup_paper"], "bytes_read": savings["speedup_predicted"]},
    }


def verification_rows(v):
    """(label, metrics): float32, then, if stored otherwise, converted and original as stored."""
    # after --remove auto rewrote a plan from the first one's blocks, float32 is the first plan's
    rows = [("converted, float32" + (" (first plan)" if v.get("float32_plan") else ""), v["float32"])]
    if v["stored_as"] != "float32":
        rows += [
            (f"converted, {v['stored_as']}", v["stored"]["converted"]),
            (f"original, {v['stored_as']}", v["stored"]["original"]),
        ]
        if "original_p_merged" in v["stored"]:
            rows.append((f"original, P merged, {v['stored_as']}", v["stored"]["original_p_merged"]))
    return rows


def log_report(report, log):
    """The report as the converter's [INFO], [VERIFY] and [WARNING] lines."""
    w = report["weights"]
    conds = [entry["cond"] for entry in report["layers"] if "cond" in entry]
    log(
        f"[INFO] weights {w['before']:,} -> {w['after']:,} ({100 * w['removed_fraction']:.1f}% removed), "
        f"predicted batch-1 speedup {report['predicted_speedup']['bytes_read']:.3f}x"
    )
    if conds:
        log(f"[INFO] inverted {len(conds)} matrices, condition numbers {min(conds):.3g} to {max(conds):.3g}")
    v = report.get("verification")
    if v:
        rows = verification_rows(v)
        width = max(28, *(len(name) for name, _ in rows))
        for name, m in rows:
            log(
                f"[VERIFY] {name:<{width}} max rel. logit error {m['max_rel_error']:.2e}, "
                f"top-1 agreement {100 * m['top1_agreement']:.1f}%, KL {m['kl']:.2e}"
            )
        if v.get("reference_max_abs_logit") == 0:
            log(
                "[WARNING] the original's logits on the probe are all zero (its activations vanish "
                "through the blocks): the figures above compare nothing"
            )
        if v["degraded"]:
            log("[WARNING] " + "!" * 60)
            log("[WARNING] FUSION MADE THIS MODEL CLEARLY WORSE than plain rounding of the original.")
            log("[WARNING] " + "!" * 60)
