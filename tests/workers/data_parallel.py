"""Run under `mlx.launch -n 2` with OUT TEXT_DIR TOKENIZER: train the tiny model of
tests/test_train.py::test_data_parallel_equals_one_process 6 steps on a global batch of 8,
each process taking half of it (rank 0 writes OUT)."""

import sys
from pathlib import Path

import mlx.core as mx

from mlx_skipless import data, train
from mlx_skipless.models.skipless import Model, ModelArgs

out, text, tokenizer = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
tok = data.read_tokenizer_json(tokenizer)
corpus = data.TokenStreams.build([text], tok, log=lambda *_: None)
args = ModelArgs(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=64,
    num_attention_heads=4,
    block_norm="rmsnorm",
    final_norm="rmsnorm",
    vocab_size=tok.get_vocab_size(),
    max_position_embeddings=32,
)
model = Model(args)
train.initialize(model, seed=0)
options = train.TrainOptions(
    steps=6,
    batch_size=8,
    context=32,
    lr=3e-3,
    orthogonality=0.0,
    eval_every=6,
    eval_batches=2,
    save_every=6,
    optimizer="muon",
    schedule="wsd",
)
train.train(model, args, tok, corpus, out, options, progress=False, log=lambda *_: None)
group = mx.distributed.init()
if group.rank() == 0:
    out.with_suffix(".world").write_text(str(group.size()))
