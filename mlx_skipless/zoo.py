"""python -m mlx_skipless.zoo: model configs, what fusion does to them, and recipes.

  list                 the models and recipes
  show NAME            config, weights per component before and after each exact
                       reduction, savings, predicted batch-1 speedup, recipes
  table                every model side by side; --out DIR also writes Markdown and an SVG chart
  run RECIPE           run a recipe's steps (--size tiny runs in minutes on a laptop CPU);
                       again: --resume continues its training, --force starts over

Counts are of the skipless what-if of each architecture (same shapes, no residual
adds, no norms between blocks): the only form the fusion applies to.
"""

import argparse
import contextlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from . import cli, counting, fusion
from .hub import read_config
from .models.skipless import ModelArgs

PACKAGE = Path(__file__).resolve().parent


def _zoo_dir() -> Path:
    """The zoo/ folder users browse: in a checkout (or an editable install) beside
    the package; in an installed wheel, the copy the build put inside it (setup.py)."""
    return next((d for d in (PACKAGE / "zoo_data", PACKAGE.parent / "zoo") if d.is_dir()), PACKAGE.parent / "zoo")


ZOO = _zoo_dir()


def models() -> dict:
    return {p.stem: tomllib.loads(p.read_text()) for p in sorted(ZOO.glob("*.toml"))}


def recipes() -> dict:
    return {p.stem: tomllib.loads(p.read_text()) for p in sorted((ZOO / "recipes").glob("*.toml"))}


def lookup(table: dict, name: str, kind: str) -> dict:
    if name not in table:
        raise KeyError(f"no {kind} {name!r}; the zoo has: {', '.join(table)}")
    return table[name]


def args_of(entry: dict) -> ModelArgs:
    return ModelArgs(**entry["model"])


def model_args(name: str) -> ModelArgs:
    """The config of the zoo model `name`, the one place each known model's numbers are written."""
    return args_of(lookup(models(), name, "model"))


def skipless(args: ModelArgs) -> ModelArgs:
    """The architecture's skipless what-if: same shapes, nothing between blocks."""
    return replace(args, residual=False, block_norm=None, removed=None)


def summary(name: str, entry: dict) -> dict:
    args = args_of(entry)
    published = entry.get("parameters")
    total = counting.count(args)["total"]
    base = skipless(args)
    out = {
        "name": name,
        "title": entry.get("title", name),
        "source": entry.get("source"),
        "config": entry["model"],
        "parameters": total,
        "parameters_published": published,
        # exact, once what the entry says this model does not count (`uncounted`) is added
        "parameters_match": None if not published else total + entry.get("uncounted", 0) == published,
        "parameters_uncounted": entry.get("uncounted", 0),
        "skipless": counting.count(base),
        "reductions": {},
    }
    if entry.get("note"):
        out["note"] = entry["note"]
    if any(args.removed):  # a form trained reduced: priced against its standard twin
        return {**out, "form": form_summary(args), "recipes": recipes_of(name)}
    for remove in fusion.square_projections(base):
        r = counting.compare_plan(base, fusion.default_plan(base, remove))
        item = {
            "removed_per_block": [f.upper() for f in fusion.default_plan(base, remove)[0]],
            "before": r["vanilla"]["total"],
            "after": r["reduced"]["total"],
            "removed": r["removed"],
            "removed_fraction": r["removed_fraction"],
            "speedup_paper_count": r["speedup_paper"],
            "speedup_predicted": r["speedup_predicted"],
            "components_after": r["reduced"]["components"],
        }
        if "claim" in r:
            item["paper_claim_not_exact"] = r["claim"]
        out["reductions"][remove] = item
    out["converter_removes"], out["converter_removes_basis"] = converter_removes(entry, base)
    if "paper" in entry:
        out["paper"] = entry["paper"]
    out["recipes"] = recipes_of(name)
    return out


def recipes_of(name: str) -> list:
    return [n for n, rec in recipes().items() if rec.get("model") == name]


def form_summary(args: ModelArgs) -> dict:
    """A form trained reduced, against the same shape with every matrix present."""
    r = counting.compare(replace(args, removed=None), args)
    letters = {letter for form in args.removed for letter in form}
    return {
        "removed_per_block": [m.upper() for m in "qkvp" if m in letters],
        "standard": r["vanilla"]["total"],
        "weights": r["reduced"]["total"],
        "removed": r["removed"],
        "removed_fraction": r["removed_fraction"],
        "speedup_predicted": r["speedup_predicted"],
        "per_block": {
            "standard": counting.block_weights(replace(args, removed=None)),
            "form": counting.block_weights(args),
        },
    }


def converter_removes(entry: dict, base: ModelArgs):
    """(what the converter removes per block, on what basis): its own plan for
    the weights where the zoo has them (`checkpoint`, relative to the package);
    otherwise the choice the shapes leave it."""
    squares = fusion.square_projections(base)
    and_p = " and P" if fusion.merges_p(base) else ""
    if not squares:
        return "nothing", "no square Q, K or V"
    if "checkpoint" in entry:
        from collections import Counter

        from . import planner
        from .loading import SkiplessCheckpoint

        conds = planner.condition_numbers(SkiplessCheckpoint(str(PACKAGE / entry["checkpoint"])))
        forms = planner.ladder(conds, "p" if and_p else "")[0]
        counts = Counter(f.replace("p", "").upper() or "nothing" for f in forms)
        layers = lambda n: f"{n} layer" + "s" * (n != 1)  # noqa: E731
        what = ", ".join(f"{m} ({layers(n)})" for m, n in counts.items()) if len(counts) > 1 else next(iter(counts))
        return what + and_p, (
            "the converter's plan for the packaged weights: per layer the "
            "best-conditioned square matrix (--remove auto's first plan)"
        )
    if len(squares) > 1:
        return ", ".join(m.upper() for m in squares[:-1]) + f" or {squares[-1].upper()}" + and_p, (
            "equal counts; the converter picks per layer from the weights (--remove auto)"
        )
    return squares[0].upper() + and_p, "the only square projection"


def show(name: str) -> str:
    s = summary(name, lookup(models(), name, "model"))
    lines = [f"{s['title']}  ({s['source']})", ""]
    lines += [f"  {k} = {v}" for k, v in s["config"].items()]
    uncounted = f", of which {s['parameters_uncounted']:,} not counted here" if s["parameters_uncounted"] else ""
    match = (
        ""
        if s["parameters_match"] is None
        else (
            f" (published {s['parameters_published']:,}{uncounted}: {'match' if s['parameters_match'] else 'MISMATCH'})"
        )
    )
    if "form" in s:
        f = s["form"]
        lines += [
            "",
            f"weights: {s['parameters']:,}; the same shape with every matrix: {f['standard']:,}",
            f"without {' and '.join(f['removed_per_block'])} in every block: {f['removed']:,} fewer "
            f"({100 * f['removed_fraction']:.1f}%; per block {f['per_block']['standard']:,} -> "
            f"{f['per_block']['form']:,}), predicted batch-1 speedup {f['speedup_predicted']:.3f}x "
            "from weights read per token",
            "trained in this form (nothing to fuse): convert stores it in another dtype, verified",
        ]
        if s["recipes"]:
            lines += ["", "recipes: " + ", ".join(s["recipes"]) + "  (python -m mlx_skipless.zoo run NAME --size tiny)"]
        return "\n".join(lines)
    lines += ["", f"weights: {s['parameters']:,}{match}", "", "skipless what-if, per component:"]
    lines += [f"  {k:<16} {v:>16,}" for k, v in s["skipless"]["components"].items()]
    if not s["reductions"]:
        lines += [
            "",
            "no square Q, K or V: nothing can be removed exactly" + (f" ({s['note']})" if "note" in s else ""),
        ]
    for remove, r in s["reductions"].items():
        lines += [
            "",
            f"remove {' and '.join(r['removed_per_block'])} in every block: {r['before']:,} -> "
            f"{r['after']:,} ({100 * r['removed_fraction']:.1f}% removed), predicted batch-1 speedup "
            f"{r['speedup_predicted']:.3f}x from weights read per token ({r['speedup_paper_count']:.3f}x "
            "as the paper counts)",
        ]
        if "paper_claim_not_exact" in r:
            c = r["paper_claim_not_exact"]
            lines.append(
                f"  paper's claim (no Q and no P in a parallel block; not exact): "
                f"{100 * c['removed_fraction']:.1f}% removed, {c['speedup_paper']:.2f}x"
            )
    lines += ["", f"the converter removes: {s['converter_removes']} ({s['converter_removes_basis']})"]
    if "paper" in s:
        lines += ["", f"paper: {s['paper']}"]
    if s["recipes"]:
        lines += ["", "recipes: " + ", ".join(s["recipes"]) + "  (python -m mlx_skipless.zoo run NAME --size tiny)"]
    return "\n".join(lines)


def converted(report: dict) -> str:
    """A converted model's card without front matter and usage: weights
    removed, verification and the conversion plan."""
    from .card import card_body

    return "\n".join(card_body(report)).strip()


def table_rows():
    rows = []
    for name, entry in models().items():
        s = summary(name, entry)
        if "form" in s:  # trained reduced: its savings against the standard twin
            f = s["form"]
            rows.append(
                {
                    "name": name,
                    "parameters": f["standard"],
                    "removed_fraction": f["removed_fraction"],
                    "after": f["weights"],
                    "speedup_predicted": f["speedup_predicted"],
                    "speedup_paper_count": f["standard"] / f["weights"],
                    "removed": " and ".join(f["removed_per_block"]) + " (trained without)",
                    "paper_claim": None,
                    "parallel": entry["model"].get("parallel_block", False),
                }
            )
            continue
        best = min(s["reductions"].values(), key=lambda r: r["after"], default=None)
        rows.append(
            {
                "name": name,
                "parameters": s["parameters"],
                "removed_fraction": best["removed_fraction"] if best else 0.0,
                "after": best["after"] if best else s["skipless"]["total"],
                "speedup_predicted": best["speedup_predicted"] if best else 1.0,
                "speedup_paper_count": best["speedup_paper_count"] if best else 1.0,
                "removed": s["converter_removes"],
                "paper_claim": best.get("paper_claim_not_exact") if best else None,
                "parallel": entry["model"].get("parallel_block", False),
            }
        )
    return rows


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def markdown(rows) -> str:
    lines = [
        "| model | weights | removed per block | after | removed | speedup (weights read) | "
        "speedup (paper's count) | paper's parallel claim |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        claim = (
            f"{100 * r['paper_claim']['removed_fraction']:.1f}%, {r['paper_claim']['speedup_paper']:.2f}x"
            if r["paper_claim"]
            else ""
        )
        lines.append(
            f"| {r['name']} | {_human(r['parameters'])} | {r['removed']} | {_human(r['after'])} | "
            f"{100 * r['removed_fraction']:.1f}% | {r['speedup_predicted']:.3f}x | "
            f"{r['speedup_paper_count']:.3f}x | {claim} |"
        )
    return "\n".join(lines) + "\n"


def svg(rows) -> str:
    """A horizontal bar chart of the fraction of weights each model loses."""
    bar, left, width = 22, 150, 420
    top = max(r["removed_fraction"] for r in rows) or 1
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 80}" '
        f'height="{bar * len(rows) + 50}" font-family="sans-serif" font-size="12">',
        f'<text x="{left}" y="16">weights removed by exact fusion (skipless what-if)</text>',
    ]
    for i, r in enumerate(rows):
        y, w = 28 + i * bar, width * r["removed_fraction"] / top
        color = "#d98b3a" if r["parallel"] else "#3a7bd9"
        parts += [
            f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{r["name"]}</text>',
            f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar - 6}" fill="{color}"/>',
            f'<text x="{left + w + 4:.1f}" y="{y + 14}">{100 * r["removed_fraction"]:.1f}%</text>',
        ]
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# -- recipes ---------------------------------------------------------------------------------


def sized(name: str, size: str, data: Optional[dict] = None, options: Optional[dict] = None):
    """(model config, [(step, options)]) of a recipe at one of its sizes: the size's
    settings over the recipe's, over the zoo model's; then `options` ({step: options}) over
    those, and each data name `data` maps ({name: path}, e.g. "corpus") bound to its path."""
    recipe = lookup(recipes(), name, "recipe")
    sizes = recipe.get("sizes", {})
    if size not in sizes:
        raise KeyError(f"recipe {name!r} has sizes {', '.join(sizes)}, not {size!r}")
    chosen = sizes[size]
    model = {
        **lookup(models(), recipe["model"], "model")["model"],
        **recipe.get("model_overrides", {}),
        **chosen.get("model", {}),
    }
    return model, _over(
        [(s["step"], {**s.get("args", {}), **chosen.get(s["step"], {})}) for s in recipe["steps"]], data, options
    )


def _over(steps, data: Optional[dict], options: Optional[dict]):
    steps = [(kind, {**o, **(options or {}).get(kind, {})}) for kind, o in steps]
    for _, step in steps:
        if "data" in step and data:
            step["data"] = [str(data[d]) if d in data else d for d in step["data"]]
    return steps


def run(
    name: str,
    size: str,
    out: Path,
    log=print,
    force: bool = False,
    resume: bool = False,
    *,
    data: Optional[dict] = None,
    options: Optional[dict] = None,
    dirs: Optional[dict] = None,
    keep: bool = False,
) -> dict:
    """Run a recipe's steps in order, each output feeding the next; returns the paths.
    An existing work directory is refused unless `force` (start over) or `resume`
    (continue its training, redo the later steps). For a caller that owns `out` and builds
    on it: `data` and `options` as `sized` takes them, `dirs` ({step: directory in out}
    where not the step's name), and `keep`: finished steps are kept (recipe.run)."""
    from . import recipe as runner

    model, steps = sized(name, size)
    return runner.run(name, size, model, _over(steps, data, options), Path(out), log, force, resume, dirs, keep)


def commands(
    name: str,
    size: str,
    out: Path,
    *,
    data: Optional[dict] = None,
    options: Optional[dict] = None,
    dirs: Optional[dict] = None,
) -> list:
    """The commands `run` runs with the same arguments ([recipe.Step]), without running them."""
    from . import recipe as runner

    return runner.plan(name, sized(name, size, data, options)[1], Path(out), dirs)


def build_parser():
    p = argparse.ArgumentParser(
        prog="mlx-skipless zoo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = p.add_subparsers(dest="command", required=True, help="what to do (each has its own --help)")
    sub.add_parser("list", help="the models and recipes").add_argument(
        "--json", action="store_true", help="print them as JSON"
    )
    s = sub.add_parser("show", help="a model's config, weights before and after fusion, savings, recipes")
    s.add_argument("name", help="a zoo model, or the directory of a converted model")
    s.add_argument("--json", action="store_true", help="print the figures as JSON")
    t = sub.add_parser("table", help="every model side by side")
    t.add_argument("--json", action="store_true", help="print the rows as JSON")
    t.add_argument("--out", help="also write zoo-table.md and zoo-savings.svg into this directory")
    r = sub.add_parser("run", help="run a recipe's steps in a work directory")
    r.add_argument("recipe", help="a recipe that `zoo list` names")
    sizes = ", ".join(dict.fromkeys(size for recipe in recipes().values() for size in recipe.get("sizes", {})))
    r.add_argument(
        "--size",
        default="tiny",
        help=f"the recipe's size, one of those it has ({sizes}); tiny runs in minutes on a laptop "
        "CPU (default %(default)s)",
    )
    r.add_argument("--out", help="work directory (default: zoo-runs/RECIPE-SIZE)")
    r.add_argument(
        "--json", action="store_true", help="print only the output paths on stdout, as JSON (the log goes to stderr)"
    )
    again = r.add_mutually_exclusive_group()
    again.add_argument("--force", action="store_true", help="start over: remove an earlier run in --out")
    again.add_argument(
        "--resume", action="store_true", help="continue an earlier run's training in --out, then redo the later steps"
    )
    return p


@cli.command(build_parser)
def main(o):
    if o.command == "list":
        items = {
            "models": {n: e.get("title", n) for n, e in models().items()},
            "recipes": {n: r.get("summary", "") for n, r in recipes().items()},
        }
        if o.json:
            print(json.dumps(items, indent=2))
        else:
            print("models:\n" + "\n".join(f"  {n:<18} {t}" for n, t in items["models"].items()))
            print("recipes:\n" + "\n".join(f"  {n:<18} {t}" for n, t in items["recipes"].items()))
    elif o.command == "show" and (Path(o.name) / "config.json").exists():
        report = read_config(Path(o.name)).get("conversion")  # a regular file of JSON, or a one-line error
        if report is None:
            raise KeyError(f"{o.name} is not a model converted by mlx-skipless (no 'conversion' in its config.json)")
        print(json.dumps(report, indent=2) if o.json else converted(report))
    elif o.command == "show":
        entry = lookup(models(), o.name, "model")
        print(json.dumps(summary(o.name, entry), indent=2) if o.json else show(o.name))
    elif o.command == "table":
        rows = table_rows()
        if o.out:
            out = Path(o.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "zoo-table.md").write_text(markdown(rows))
            (out / "zoo-savings.svg").write_text(svg(rows))
        print(json.dumps(rows, indent=2) if o.json else markdown(rows), end="")
    else:
        out = Path(o.out or f"zoo-runs/{o.recipe}-{o.size}")
        # With --json, stdout carries the JSON alone: every step's log goes to stderr.
        with contextlib.redirect_stdout(sys.stderr) if o.json else contextlib.nullcontext():
            paths = run(o.recipe, o.size, out, force=o.force, resume=o.resume)
        if o.json:
            print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
