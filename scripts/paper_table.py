"""Reproduce the weight table of Graef (arXiv 2404.12362) from the model code.

python scripts/paper_table.py
"""

from mlx_skipless import counting, fusion
from mlx_skipless.models.skipless import ModelArgs

MODELS = {
    "Mistral-7B": ModelArgs(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        final_norm="rmsnorm",
    ),
    "Pythia-6.9B": ModelArgs(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=16384,
        num_attention_heads=32,
        vocab_size=50432,
        parallel_block=True,
        mlp_type="mlp",
        hidden_act="gelu",
        partial_rotary_factor=0.25,
        attention_bias=True,
        mlp_bias=True,
        final_norm="layernorm",
    ),
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
