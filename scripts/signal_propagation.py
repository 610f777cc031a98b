"""Per-layer signal propagation of a model while it trains (mlx_skipless.diagnostics).

Trains a fresh model from a config with the trainer's defaults for a few steps and prints,
at initialisation and at every evaluation, each layer's output RMS, the mean cosine
between positions (1 = rank collapse), and the attention entropy and shaped-attention
coefficients. `--block-lr-scale 1` trains every matrix at the full rate (the recipe
before issue 19) to show the collapse the default scaling prevents.

    python scripts/signal_propagation.py --size 512x8 --steps 20 --eval-every 10
    python scripts/signal_propagation.py --size 512x8 --steps 20 --block-lr-scale 1 --json flat.json
    python scripts/signal_propagation.py --config zoo/skipless-python.toml
"""

import argparse
import json
import tempfile
from pathlib import Path

import mlx.core as mx

from mlx_skipless import data, diagnostics, train
from mlx_skipless.comparisons import kind_config
from mlx_skipless.models.skipless import Model, ModelArgs


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", help="model config (JSON or TOML, ModelArgs names)")
    g.add_argument("--size", help="d x layers of the skipless shape scripts/skipless_vs_standard.py trains")
    p.add_argument("--data", nargs="+", default=["stdlib"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--block-lr-scale", type=float, help="default: the trainer's width/depth scaling")
    p.add_argument("--q-init-scale", type=float, default=0.1)
    p.add_argument("--orthogonality", type=float, default=1.0)
    p.add_argument("--json", help="write the per-layer rows of every evaluation here")
    o = p.parse_args()
    # the trainer's default tokenizer for the data (1,024-token BPE, deterministic and cached),
    # so these figures and scripts/skipless_vs_standard.py's see the same tokens
    tok = data.cached_tokenizer(data.find_files(o.data), 1024)
    fields = train.read_model_config(o.config) if o.config else kind_config(o.size, "skipless")
    fields.update(vocab_size=tok.get_vocab_size(), max_position_embeddings=128)
    args = ModelArgs(**fields)
    model = Model(args)
    train.initialize(model, 0, o.q_init_scale)
    corpus = data.TokenStreams.build(o.data, tok)
    batch = mx.array(next(corpus.validation(1, 8, 128))[0])

    def probe(m):
        rows = diagnostics.signal_propagation(m, batch)
        print(diagnostics.table(rows), flush=True)
        return {"layers": rows}

    print(f"[step 0] val loss {train.validation_loss(model, corpus, 128):.4f}")
    history = [{"step": 0, **probe(model)}]
    with tempfile.TemporaryDirectory() as tmp:
        options = train.TrainOptions(
            steps=o.steps,
            lr=o.lr,
            orthogonality=o.orthogonality,
            eval_every=o.eval_every,
            save_every=10**9,
            block_lr_scale=o.block_lr_scale,
        )
        state = train.train(model, args, tok, corpus, Path(tmp) / "run", options, progress=False, probe=probe)
    if o.json:
        Path(o.json).write_text(
            json.dumps({"config": fields, "options": state["options"], "history": history + state["history"]}, indent=1)
        )


if __name__ == "__main__":
    main()
