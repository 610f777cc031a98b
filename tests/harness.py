"""Small shared helpers for the tests: tiny configs, MLX models from numpy weights, a local
`mlx_lm server`."""

import contextlib
import importlib
import inspect
import io
import json
import socket
import subprocess
import sys
import time
import urllib.request

import mlx.core as mx
import numpy as np

from mlx_skipless import fusion, layout, synthetic
from mlx_skipless.models.skipless import Model, ModelArgs


def tiny_args(**kw) -> ModelArgs:
    base = dict(
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=48,
        num_attention_heads=4,
        vocab_size=64,
        max_position_embeddings=64,
    )
    base.update(kw)
    return ModelArgs(**base)


def build(args: ModelArgs, flat: dict, dtype=mx.float32) -> Model:
    model = Model(args)
    model.load_weights([(k, mx.array(np.asarray(v, np.float32)).astype(dtype)) for k, v in flat.items()])
    mx.eval(model.parameters())
    return model


def logits(model, tokens) -> np.ndarray:
    return np.array(model(mx.array(tokens)[None]).astype(mx.float32), dtype=np.float64)[0]


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def fused_model(args, flat, plan):
    """(reduced model, reduced args, inverted matrices) for `plan`."""
    w, new_args, inverted = fusion.fuse(layout.weights_from_flat(flat, args), args, plan)
    return build(new_args, layout.weights_to_flat(w, new_args)), new_args, inverted


def tokens(n=8, vocab=64, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n)


__all__ = ["tiny_args", "build", "logits", "rel_err", "fused_model", "tokens", "synthetic"]


WORDS = [
    "def",
    "return",
    "self",
    "import",
    "class",
    "for",
    "in",
    "if",
    "else",
    "while",
    "print",
    "value",
    "items",
    "name",
    "data",
    "path",
    "(",
    ")",
    ":",
    "=",
    "+",
    "[",
    "]",
    "0",
    "1",
]


def write_corpus(directory, files: int = 4, lines: int = 1500):
    """Python-like text, a few files of it: enough for a tokenizer and a held-out split."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    for f in range(files):
        text = "\n".join(" ".join(rng.choice(WORDS, rng.integers(3, 9))) for _ in range(lines))
        (directory / f"part{f}.txt").write_text(text + "\n")
    return directory


def command(module: str, *argv) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGV...` (or `python scripts/NAME.py ARGV...` for MODULE "NAME.py")
    run in this process: the same parser and main, without the second or two a new
    interpreter spends importing mlx-lm. Its exit code, stdout and stderr come back as a
    subprocess's would. Mains that take no argv (mlx-lm's, some scripts') read sys.argv."""
    main = load_script(module[:-3]).main if module.endswith(".py") else importlib.import_module(module).main
    out, err, argv = io.StringIO(), io.StringIO(), [str(a) for a in argv]
    saved = sys.argv
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if inspect.signature(main).parameters:
                code = main(argv)
            else:
                sys.argv = [module, *argv]
                code = main()
        except SystemExit as e:  # argparse's errors, sys.exit(message)
            code = e.code if isinstance(e.code, int) or e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        finally:
            sys.argv = saved
    return subprocess.CompletedProcess([module, *argv], code or 0, out.getvalue(), err.getvalue())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, path, body):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def mlx_lm_server(model_dir):
    """`mlx_lm server` on a free local port, up within two minutes, always stopped."""
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "server",
            "--model",
            str(model_dir),
            "--trust-remote-code",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).close()
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "server did not start"
                time.sleep(0.5)
        yield port
    finally:
        server.kill()
        server.wait(timeout=30)


def greedy_completions_alone_and_together(model_dir, prompts, max_tokens=24):
    """Each prompt's greedy completion from `mlx_lm server`, sent alone and then all at once."""
    import concurrent.futures

    with mlx_lm_server(model_dir) as port:

        def complete(prompt):
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
            return post(port, "/v1/completions", body)["choices"][0]["text"]

        alone = [complete(p) for p in prompts]
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(complete, prompts))
    return alone, together


def on_screen(text: str) -> str:
    """What a terminal shows of `text`: whatever a carriage return wrote over (progress bars) is gone."""
    import re

    return re.sub(r"[^\n]*\r", "", text)


def load_script(name: str):
    """A script of scripts/ imported as a module, for its functions."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_checkout(root, dest):
    """The checkout's files that git would commit, as a user's copy of the repository."""
    import shutil

    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        if (root / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / f, dest / f)
