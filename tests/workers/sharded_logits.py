"""Run under `mlx.launch -n 2`: load a converted model with mlx-lm's sharded_load
(tensor parallel, through the model file's shard()) and save rank 0's logits."""

import sys

import mlx.core as mx
import numpy as np
from mlx_lm.utils import sharded_load

model, _ = sharded_load(sys.argv[1], trust_remote_code=True)
tokens = mx.array(np.random.default_rng(0).integers(0, model.args.vocab_size, (2, 12)))
logits = np.array(model(tokens).astype(mx.float32))
if mx.distributed.init().rank() == 0:
    np.save(sys.argv[2], logits)
