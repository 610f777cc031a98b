"""Issue 17: scripts/price_of_skiplessness.py puts a residual pre-norm model, a skipless one
and its conversion in one table of bits per byte (as mlx_skipless.evaluate scores them)
and decode tokens/s. Timings are not asserted."""

import json

import pytest
from harness import build, command, tiny_args

from mlx_skipless import comparisons, counting, data, evaluate, modeldir, synthetic
from mlx_skipless.convert import convert
from mlx_skipless.models.skipless import ModelArgs

TEXTS = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
]


def script(*argv):
    return command("price_of_skiplessness.py", *argv)


@pytest.mark.slow
def test_one_table_for_residual_skipless_and_converted(tmp_path):
    tok = data.train_tokenizer(TEXTS * 4, 280)
    runs = {}
    for label, kw in {
        "residual": dict(residual=True, block_norm="rmsnorm"),
        "skipless": dict(shaped_attention=True),
    }.items():
        args = tiny_args(vocab_size=tok.get_vocab_size(), max_position_embeddings=32, final_norm="rmsnorm", **kw)
        model = build(args, synthetic.random_flat(args, seed=1))
        (tmp_path / label).mkdir()
        modeldir.save(tmp_path / label, model, args, "train", tok)
        runs[label] = tmp_path / label
    quiet = dict(progress=False, log=lambda *_: None)
    convert(str(runs["skipless"]), str(tmp_path / "bf16"), dtype="bfloat16", **quiet)
    convert(str(runs["skipless"]), str(tmp_path / "q4"), quantize=True, q_group_size=32, allow_degraded=True, **quiet)
    runs.update(bf16=tmp_path / "bf16", q4=tmp_path / "q4")
    held = tmp_path / "held"
    held.mkdir()
    for i, t in enumerate(TEXTS):
        (held / f"f{i}.py").write_text(t)

    argv = [f"{k}={v}" for k, v in runs.items()] + [
        "--data",
        str(held),
        "--steps",
        "3",
        "--warmup",
        "1",
        "--json",
        "--markdown",
        str(tmp_path / "t.md"),
    ]
    run = script(*argv)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    rows = {r["label"]: r for r in result["rows"]}
    assert [r["form"] for r in result["rows"]] == [
        "residual, pre-norm",
        "skipless, norm-free",
        "converted, bfloat16",
        "converted, 4-bit",
    ]
    model, tok2, context = evaluate.load(str(runs["residual"]))
    expected = evaluate.bits_per_byte(model, tok2, data.read_texts(sorted(held.glob("*.py"))), context)
    assert rows["residual"]["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], rel=1e-6)
    assert rows["bf16"]["bits_per_byte"] == pytest.approx(rows["skipless"]["bits_per_byte"], rel=0.05)
    assert rows["q4"]["parameters"] == rows["bf16"]["parameters"] < rows["skipless"]["parameters"]  # no Q, P
    assert rows["q4"]["weight_bytes"] < rows["bf16"]["weight_bytes"]
    assert all(r["decode_tokens_per_s"]["median"] > 0 for r in rows.values())
    assert result["compressors"] == expected["compressors"]
    table = (tmp_path / "t.md").read_text()
    assert "| bf16 | converted, bfloat16 |" in table and "| xz -9e | compressor |" in table

    # the stored weights in float32 arithmetic: the same values, so nearly the same score
    fast = script(*argv[:-3], "--score-in", "float32", "--json")
    assert fast.returncode == 0, fast.stderr
    fast = json.loads(fast.stdout)
    assert fast["scored_in"] == "float32"
    for r in fast["rows"]:
        assert r["bits_per_byte"] == pytest.approx(rows[r["label"]]["bits_per_byte"], rel=0.01), r["label"]
        assert r["weight_bytes"] == rows[r["label"]]["weight_bytes"]  # timed as stored

    assert script("residual", "--data", held).returncode == 2  # argparse: LABEL=DIR expected
    assert script(f"x={tmp_path / 'missing'}", "--data", held).returncode == 1


def test_the_equal_cost_form_spends_the_saved_bytes_on_ffn_width():
    read = lambda cfg: counting.count(ModelArgs(**cfg))["read_per_token"]  # noqa: E731
    config = comparisons.form_config
    standard, wide = config("256x4", "standard", 2048), config("256x4", "figure-4-wide", 2048)
    assert wide["intermediate_size"] > standard["intermediate_size"] and wide["removed"] == "qp"
    assert read(wide) <= read(standard) < read({**wide, "intermediate_size": wide["intermediate_size"] + 32})
    assert config("256x4", "wq-identity", 2048)["attention_scale"] == 1 / 16  # 1 / (2 sqrt(64))
