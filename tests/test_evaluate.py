"""Issue 17: bits per byte, the way code models are compared. The summed token NLL over
sliding windows equals a float64 reference; the compressors' figures are their output
sizes; the command scores vanilla, converted, bfloat16 and 4-bit models alike."""

import bz2
import gzip
import json
import lzma
import math
from dataclasses import replace

import numpy as np
import pytest
import reference
from harness import build, tiny_args

from mlx_skipless import data, evaluate, layout, modeldir, synthetic

TEXTS = [
    "def f(x):\n    return x + 1  # café\n",
    "class Stack:\n    def push(self, v):\n        self.items.append(v)\n",
    "import json\nprint(json.dumps({'ü': [1, 2, 3]}))\n",
]


@pytest.fixture(scope="module")
def setup():
    tok = data.train_tokenizer(TEXTS * 4, 300)
    args = tiny_args(vocab_size=tok.get_vocab_size(), max_position_embeddings=16, shaped_attention=True)
    flat = synthetic.random_flat(args, seed=3)
    return tok, args, flat


@pytest.mark.parametrize("n,context,stride", [(5, 16, 8), (40, 16, 16), (41, 16, 5), (100, 8, 3), (17, 16, 1)])
def test_windows_score_every_target_once_with_enough_past(n, context, stride):
    seen = []
    for s, first in evaluate.windows(n, context, stride):
        targets = range(first, min(s + context, n - 1) + 1)
        seen += targets
        assert all(t - s >= min(t, context - stride + 1) for t in targets)  # inputs s..t-1
    assert sorted(seen) == list(range(1, n))


def test_bits_per_byte_equals_float64_reference(setup):
    tok, args, flat = setup
    model = build(args, flat)
    context, stride = 16, 5
    r = evaluate.bits_per_byte(model, tok, TEXTS, context, stride, batch_size=3)
    eos = tok.token_to_id(data.EOS)
    ids = [eos] + [i for t in TEXTS for i in tok.encode(t).ids + [eos]]
    assert r["tokens"] == len(ids) - 1 > 2 * context
    # Independently: windows start every `stride` tokens, the last ends at the stream's end;
    # each target is predicted from the first window that holds it.
    starts = list(range(0, len(ids) - 1 - context, stride)) + [len(ids) - 1 - context]
    weights = layout.weights_from_flat(flat, args)
    nats = 0.0
    for t in range(1, len(ids)):
        s = next(s for s in starts if s < t <= s + context)
        logits = reference.forward(weights, args, np.array(ids[s:t]))[-1]
        m = logits.max()
        nats += m + math.log(np.exp(logits - m).sum()) - logits[ids[t]]
    n_bytes = len("".join(TEXTS).encode())
    assert n_bytes > len("".join(TEXTS)) and r["bytes"] == n_bytes
    assert r["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert r["nats_per_token"] == pytest.approx(nats / (len(ids) - 1), rel=1e-5)


def test_compressors_report_their_compressed_sizes():
    text = "".join(TEXTS * 20).encode()
    r = evaluate.compressed_bits_per_byte(text)
    assert r == {
        "gzip -9": 8 * len(gzip.compress(text, 9)) / len(text),
        "bz2 -9": 8 * len(bz2.compress(text, 9)) / len(text),
        "xz -9e": 8 * len(lzma.compress(text, preset=9 | lzma.PRESET_EXTREME)) / len(text),
    }
    assert all(0 < v < 8 for v in r.values())


def test_command_scores_vanilla_converted_and_quantized_models(setup, tmp_path, capsys):
    from mlx_skipless.convert import convert

    tok, args, flat = setup
    args = replace(args, max_position_embeddings=16)
    model = build(args, flat)
    vanilla = tmp_path / "vanilla"
    vanilla.mkdir()
    modeldir.save(vanilla, model, args, "train", tok)
    files = tmp_path / "heldout"
    files.mkdir()
    for i, t in enumerate(TEXTS):
        (files / f"m{i}.py").write_text(t)
    expected = evaluate.bits_per_byte(model, tok, data.read_texts(sorted(files.glob("*.py"))), 16)["bits_per_byte"]

    def score(path):
        assert evaluate.main(["--model", str(path), "--data", str(files), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    r = score(vanilla)
    assert r["bits_per_byte"] == pytest.approx(expected, rel=1e-6) and r["files"] == 3 and r["stride"] == 8
    quiet = dict(progress=False, log=lambda *_: None, force=True)
    convert(str(vanilla), str(tmp_path / "f32"), dtype="float32", **quiet)
    convert(str(vanilla), str(tmp_path / "bf16"), dtype="bfloat16", **quiet)
    convert(
        str(vanilla),
        str(tmp_path / "q4"),
        dtype="bfloat16",
        quantize=True,
        q_group_size=32,
        allow_degraded=True,
        **quiet,
    )
    assert score(tmp_path / "f32")["bits_per_byte"] == pytest.approx(expected, rel=1e-4)
    assert score(tmp_path / "bf16")["bits_per_byte"] == pytest.approx(expected, rel=0.05)
    q4 = score(tmp_path / "q4")
    assert 0 < q4["bits_per_byte"] < 40 and q4["compressors"] == r["compressors"]

    assert evaluate.main(["--model", str(vanilla), "--data", str(tmp_path / "nowhere")]) == 1
    assert "no such file or directory" in capsys.readouterr().err
