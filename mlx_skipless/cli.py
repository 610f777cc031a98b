"""`mlx-skipless COMMAND ...`: the same as `python -m mlx_skipless.COMMAND ...`."""

import importlib
import importlib.util
import sys

COMMANDS = {
    "convert": "fuse a skipless checkpoint into its reduced form (mlx-lm model directory)",
    "generate": "generate text with a skipless or converted model",
    "chat": "chat with a skipless or converted model",
    "zoo": "browse model configs, weight tables and recipes",
    "train": "train a skipless model",
    "normfree": "remove normalization from a skipless model by fine-tuning",
    "fidelity": "measure how a conversion survives low-precision dtypes",
    "corpus": "build a Python training corpus with whole packages held out",
    "evaluate": "bits per byte of a model on text, beside gzip, bz2 and xz",
}


def available():
    return {c: h for c, h in COMMANDS.items() if importlib.util.find_spec(f"mlx_skipless.{c}")}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = available()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: mlx-skipless COMMAND [ARGS...]\n\ncommands:")
        for c, h in commands.items():
            print(f"  {c:<10} {h}")
        bad = argv and argv[0] not in ("-h", "--help")
        if bad:
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
        return 2 if bad or not argv else 0
    sys.argv = [f"mlx-skipless {argv[0]}", *argv[1:]]
    return importlib.import_module(f"mlx_skipless.{argv[0]}").main()


if __name__ == "__main__":
    sys.exit(main())
