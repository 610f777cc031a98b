"""Reproduce the weight table of Graef (arXiv 2404.12362) from the model code.

python scripts/paper_table.py
"""

from mlx_skipless import counting, fusion, zoo

# the paper's models, from their zoo configs, in their skipless form (nothing between blocks)
MODELS = {
    label: zoo.skipless(zoo.model_args(name))
    for label, name in [("Mistral-7B", "mistral-7b"), ("Pythia-6.9B", "pythia-6.9b")]
}


def main():
    print(
        "| model | weights | without Q and P | removed | speedup (paper's count) | speedup (weights read per token) |"
    )
    print("|---|---|---|---|---|---|")
    for name, args in MODELS.items():
        r = counting.compare_plan(args, fusion.default_plan(args, "q"))
        print(
            f"| {name} | {r['vanilla']['total'] / 1e9:.2f}B | {r['reduced']['total'] / 1e9:.2f}B | "
            f"{100 * r['removed_fraction']:.1f}% | {r['speedup_paper']:.2f}x | {r['speedup_predicted']:.2f}x |"
        )
        if "claim" in r:
            c = r["claim"]
            print(
                f"| {name}, paper's claim (no Q *and* no P: not exact) | | | "
                f"{100 * c['removed_fraction']:.1f}% | {c['speedup_paper']:.2f}x | |"
            )


if __name__ == "__main__":
    main()
