"""Run under `mlx.launch -n 2` with OUT_DIR MODEL_DIR...: load each converted model
with mlx-lm's sharded_load (tensor parallel, through the model file's shard()) and
save rank 0's logits as OUT_DIR/<i>.npy, of one full forward and of a 5-token
prompt then single tokens through mlx-lm's cache."""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import sharded_load

for i, model_dir in enumerate(sys.argv[2:]):
    model, _ = sharded_load(model_dir, trust_remote_code=True)
    tokens = mx.array(np.random.default_rng(0).integers(0, model.args.vocab_size, (2, 12)))
    full = model(tokens)
    cache = make_prompt_cache(model)
    cached = mx.concatenate(
        [model(tokens[:, :5], cache=cache)] + [model(tokens[:, t : t + 1], cache=cache) for t in range(5, 12)], axis=1
    )
    logits = np.stack([np.array(x.astype(mx.float32)) for x in (full, cached)])
    if mx.distributed.init().rank() == 0:
        np.save(Path(sys.argv[1]) / f"{i}.npy", logits)
