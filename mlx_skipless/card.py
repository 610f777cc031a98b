"""The model card (README.md) of a converted model, from its conversion report."""

from .report import verification_rows


def model_card(report, model="PATH") -> str:
    """The README.md of a converted model; its commands name `model` (where it was written or uploaded)."""
    lines = ["---", "library_name: mlx", "pipeline_tag: text-generation", "tags: [mlx, skipless]", "---", ""]
    lines += card_body(report)
    lines += [
        "## Use",
        "",
        "mlx-skipless is not on PyPI: install it from a checkout of its repository "
        "(`pip install ./mlx-skipless`), or run the model with stock mlx-lm.",
        "",
        "```bash",
        f"mlx-skipless generate --model {model} --prompt 'def fib(n):'",
        "# or with stock mlx-lm:",
        f"mlx_lm generate --model {model} --trust-remote-code --prompt 'def fib(n):'",
        "```",
        "",
        "The full report, the plans tried included: `conversion` in config.json.",
        "",
    ]
    return "\n".join(lines)


def card_body(report) -> list:
    """Markdown lines: weights removed, verification, and the conversion plan."""
    w, s = report["weights"], report["predicted_speedup"]
    lines = [
        "# Skipless model, reduced with mlx-skipless",
        "",
        f"Converted from `{report['source']}` ({report['family']}) by mlx-skipless "
        f"{report['mlx_skipless_version']}, stored as {report['dtype']}"
        + (f", {report['quantization']['bits']}-bit" if report["quantization"] else "")
        + ".",
        "",
        f"Weights: {w['before']:,} -> {w['after']:,} ({100 * w['removed_fraction']:.1f}% removed"
        + (f"; the head was untied, adding {w['untied_head']:,}" if w["untied_head"] else "")
        + ").",
        f"Predicted batch-1 decode speedup: {s['bytes_read']:.3f}x from weights read per token "
        f"({s['paper']:.3f}x as the paper counts it).",
        "",
    ]
    v = report.get("verification")
    if v:
        lines += [
            f"Verification against {v['reference']} on {v['probe']}:",
            "",
            "| model | max rel. logit error | top-1 agreement | KL |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {n} | {m['max_rel_error']:.2e} | {100 * m['top1_agreement']:.1f}% | {m['kl']:.2e} |"
            for n, m in verification_rows(v)
        ]
        lines.append("")
    return lines + plan_section(report)


def plan_section(report) -> list:
    """Markdown lines: what each layer lost, and how the plan was chosen."""
    lines = ["## Conversion plan", ""]
    plan = report.get("plan")
    if plan and "budget" in plan:
        b = plan["budget"]
        lines += [
            f"Planned by measurement (`--remove auto`): KL at most {b['kl_ratio']:g}x and top-1 agreement "
            f"at most {b['top1_points']:g} point(s) (or {b['sigmas']:g} standard errors) worse than "
            f"rounding the original in the same dtype; {len(plan['trials'])} plan(s) tried, "
            f"rung {plan['chosen_rung']} chosen (rung k keeps Q/K/V in the k worst-conditioned layers).",
            "",
        ]
    elif plan:
        lines += [f"Planned without measuring (`--no-verify`): {plan['method']}.", ""]
    lines += ["| layer | removed | inverted | condition number | note |", "|---|---|---|---|---|"]
    lines += [
        f"| {e['layer']} | {e['removed'].upper() or '-'} | {e.get('inverted', '-')} | "
        f"{e['cond']:.3g} | {e.get('note', '')} |"
        if "cond" in e
        else f"| {e['layer']} | {e['removed'].upper() or '-'} | - | - | {e.get('note', '')} |"
        for e in report["layers"]
    ]
    return lines + [""]
