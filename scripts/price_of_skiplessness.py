"""The price of skiplessness: one table of bits per byte on held-out Python and decode speed.

Give it the trained model directories to compare, each under a label, e.g. the
same trainer, data, tokenizer, size and steps as

  - a standard pre-norm transformer with residuals (train with `residual = true`),
  - the skipless model with its block norms, and after `normfree`,
  - the norm-free model converted in bfloat16 and in 4-bit.

Each is scored by `mlx_skipless.evaluate` on the same files (bits per byte,
tokenizers aside) and timed with interleaved decode steps (batch 1, after a
prompt), all models in one loop so that drift on a shared machine hits them
alike (mlx_skipless.pricing). The compressors' figures on the same bytes close
the table.

    python scripts/price_of_skiplessness.py residual=RUNS/residual skipless=RUNS/with-norms \\
        norm-free=RUNS/norm-free bf16=RUNS/bf16 4-bit=RUNS/q4 --data corpus
"""

import argparse
import json
import sys
from pathlib import Path

from mlx_skipless import evaluate, pricing


def parse_run(text: str):
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=DIR")
    return label, path


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("runs", nargs="+", type=parse_run, metavar="LABEL=DIR", help="model directories to compare")
    p.add_argument(
        "--data",
        nargs="+",
        default=["corpus"],
        help="held-out Python files or folders, or a built corpus (its held-out packages; "
        "default: 'corpus', the one built by python -m mlx_skipless.corpus)",
    )
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens before the timed decode steps")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--stride", type=int, help="evaluation window stride (default: half the context)")
    p.add_argument(
        "--score-in",
        choices=["stored", "float32"],
        default="stored",
        help="score each model as stored (default), or its stored weights in float32 arithmetic: "
        "the same weights, much faster where bfloat16 and quantized products are slow (CPU)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--markdown", help="also write the table to this file")
    o = p.parse_args(argv)
    command = "python scripts/price_of_skiplessness.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        files = evaluate.read_files(o.data)
        result = pricing.price(
            o.runs,
            files,
            o.prompt,
            o.steps,
            o.warmup,
            o.stride,
            log=(lambda *_: None) if o.json else print,
            score_in=o.score_in,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    table = pricing.markdown(result, command)
    print(json.dumps(result, indent=2) if o.json else table)
    if o.markdown:
        Path(o.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
