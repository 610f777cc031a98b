"""Issue 15: the converter's input side under hostile input.

Every bad input is refused with a CheckpointError that names what to fix (one
line from the command line, nothing written), and nothing is read from outside
the checkpoint, read from the wrong shard, or waited on forever.
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hf_checkpoints as hf
import mlx.core as mx
import numpy as np
import pytest
import reference
from harness import logits, on_screen, rel_err, tokens
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_skipless import convert as convert_module
from mlx_skipless import layout, safetensors_reader, verify
from mlx_skipless.convert import convert
from mlx_skipless.errors import CheckpointError
from mlx_skipless.loading import load_model
from mlx_skipless.safetensors_reader import TensorSource


def quiet(**kw):
    return dict(progress=False, log=lambda *_: None, **kw)


def write(tmp_path, family="llama", **kw):
    args, flat = hf.case(family)
    return hf.write(tmp_path / "src", family, args, flat, **kw), args, flat


def edit_config(src, **changes):
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **changes}))


def refused(tmp_path, src, match, capsys=None, **kw):
    """The library raises a CheckpointError matching `match`; the command line
    prints it as one line, exits 1 and writes nothing."""
    out = tmp_path / "refused"
    with pytest.raises(CheckpointError, match=match):
        convert(str(src), str(out), **quiet(**kw))
    if capsys is not None:
        capsys.readouterr()
        flags = [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
        assert convert_module.main(["--hf-path", str(src), "--mlx-path", str(out), *flags]) in (1, 2)  # 2: a flag
        err = on_screen(capsys.readouterr().err)
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def matches_reference(out, args, flat):
    model, _ = load_model(str(out))
    t = tokens(16)
    ref = reference.forward(layout.weights_from_flat(flat, args), args, t)
    return rel_err(logits(model, t), ref) <= 1e-5


# -- 2: booleans given as strings ---------------------------------------------------------------


@pytest.mark.parametrize(
    "family,field,value",
    [
        ("skipless", "parallel_block", "false"),
        ("llama", "tie_word_embeddings", "no"),
        ("gpt_neox", "use_parallel_residual", "false"),
    ],
)
def test_string_booleans_are_refused_naming_the_field(tmp_path, capsys, family, field, value):
    src, _, _ = write(tmp_path, family)
    edit_config(src, **{field: value})
    refused(tmp_path, src, f"'{field}' must be true or false", capsys)


def test_a_config_entry_given_twice_is_refused(tmp_path, capsys):
    src, _, _ = write(tmp_path, "llama")
    text = (src / "config.json").read_text()
    (src / "config.json").write_text(text.replace("{", '{"tie_word_embeddings": true, ', 1))
    refused(tmp_path, src, "config.json is not valid JSON: the key 'tie_word_embeddings' appears twice", capsys)


# -- 3: the index decides the shard; a NaN figure fails ---------------------------------------


def test_a_tensor_in_two_shards_is_read_from_the_one_the_index_names(tmp_path):
    src, args, flat = write(tmp_path, "llama", shards=2)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    named = index["lm_head.weight"]
    other = next(n for n in sorted(set(index.values())) if n != named)
    tensors = dict(mx.load(str(src / other)))
    tensors["lm_head.weight"] = mx.zeros(flat["lm_head.weight"].shape)  # a stale copy
    mx.save_safetensors(str(src / other), tensors)
    report = convert(str(src), str(tmp_path / "out"), **quiet())
    assert matches_reference(tmp_path / "out", args, flat)
    assert report["verification"]["float32"]["top1_agreement"] == 1.0

    # without an index nothing says which copy is meant
    (src / "model.safetensors.index.json").unlink()
    refused(tmp_path, src, "lm_head.weight is stored in both")


def test_a_nan_figure_is_a_failure():
    nan = {"max_rel_error": float("nan"), "top1_agreement": 1.0, "kl": 0.0, "tokens": 128}
    assert verify.is_degraded(nan, verify.EXACT)
    assert not verify.Budget().admits(nan, nan)
    assert not verify.Budget().admits(dict(nan, max_rel_error=0.0, kl=float("inf")), verify.EXACT)


# -- 4: non-finite weights, named -----------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value",
    [
        ("model.embed_tokens.weight", np.nan),
        ("model.layers.1.self_attn.q_proj.weight", np.inf),
        ("lm_head.weight", -np.inf),
    ],
)
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, capsys, key, value):
    args, flat = hf.case("llama")
    flat[key] = flat[key].copy()
    flat[key][-1, -1] = value  # the last embedding row: a token the probe may never use
    src = hf.write(tmp_path / "src", "llama", args, flat, dtype=mx.bfloat16)
    refused(tmp_path, src, f"{key.replace('.', '[.]')} in .* holds NaN or infinite values", capsys)


# -- 5: quantization flags ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "group,bits,match",
    [
        (7, 4, "divides none of this model's matrix input widths"),
        (0, 4, "--q-group-size must be a positive integer"),
        (16, 4, "group size 16 is not supported"),
        (32, 7, "bits 7 is not supported"),
    ],
)
def test_quantization_flags_mlx_cannot_honour_are_refused(tmp_path, capsys, group, bits, match):
    src, _, _ = write(tmp_path, "llama")
    refused(tmp_path, src, match, capsys, quantize=True, q_group_size=group, q_bits=bits)


# -- 6: the tokenizer loads before anything is converted --------------------------------------


@pytest.mark.parametrize("damage", ["corrupt", "missing", "none"])
def test_a_broken_tokenizer_is_refused_naming_the_file(tmp_path, capsys, damage):
    src, _, _ = write(tmp_path, "llama")
    tok = src / "tokenizer.json"
    if damage == "corrupt":
        tok.write_text(tok.read_text()[:100])
        refused(tmp_path, src, "tokenizer.json is not valid JSON", capsys)
    elif damage == "missing":
        tok.unlink()  # tokenizer_config.json alone does not make a tokenizer
        refused(tmp_path, src, r"the tokenizer \(tokenizer_config.json\) does not load", capsys)
    else:  # without a tokenizer the output could not generate; --tokenizer names one to ship
        tok.unlink()
        (src / "tokenizer_config.json").unlink()
        refused(tmp_path, src, "has no tokenizer files .* pass --tokenizer DIR", capsys)
        donor, _, _ = write(tmp_path / "donor", "llama")
        convert(str(src), str(tmp_path / "out"), tokenizer=str(donor), progress=False, log=lambda *_: None)
        assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (donor / "tokenizer.json").read_bytes()


# -- 7: shard paths stay inside the checkpoint ------------------------------------------------------


@pytest.mark.parametrize("name", ["../outside/evil.safetensors", "/tmp/evil.safetensors"])
def test_shards_outside_the_checkpoint_are_not_read(tmp_path, capsys, name):
    src, _, _ = write(tmp_path, "llama", shards=2)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    moved = index["weight_map"]["lm_head.weight"]
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(src / moved, outside / "evil.safetensors")
    index["weight_map"] = {k: (name if v == moved else v) for k, v in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(tmp_path, src, "names the shard .*evil.safetensors', which is not a file inside", capsys)


# -- 8: wrong types and shapes of input: one-line errors, not tracebacks ------------------------


CONFIGS = {
    "hidden_size": ({"hidden_size": "abc"}, "'hidden_size' must be a positive integer, not \"abc\""),
    "heads": ({"num_attention_heads": 0}, "'num_attention_heads' must be a positive integer, not 0"),
    "rope_theta": ({"rope_theta": "abc"}, "'rope_theta' must be a finite number"),
    "layers_float": ({"num_hidden_layers": 1e6}, "'num_hidden_layers' must be a positive integer"),
    "model_type": ({"model_type": ["llama"]}, "'model_type' must be a string"),
    "rope_scaling": ({"rope_scaling": {"rope_type": "bogus"}}, "does not describe a model: Unsupported RoPE type"),
    "rope_factor": (
        {"rope_parameters": {"rope_type": "linear", "factor": "abc"}},
        "config.json's 'rope_parameters.factor' must be a positive finite number, not \"abc\"$",
    ),
    "rope_beta": (
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": None}},
        "config.json's 'rope_scaling.beta_fast' must be a finite number, not null$",
    ),
    "rope_no_factor": (
        {"rope_scaling": {"type": "linear"}},
        "config.json's 'rope_scaling.factor' is missing: RoPE type 'linear' needs it$",
    ),
    "too_wide": ({"vocab_size": 10**12}, "does not describe a model: .*outside the supported"),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_config_values_of_the_wrong_type_are_named(tmp_path, capsys, case):
    changes, match = CONFIGS[case]
    src, _, _ = write(tmp_path, "skipless" if case == "too_wide" else "llama")  # skipless: MLX builds it
    edit_config(src, **changes)
    refused(tmp_path, src, match, capsys)


@pytest.mark.parametrize(
    "content,match",
    [
        ("[1, 2]", "must hold a JSON object, not a list"),
        ("[" * 100000 + "]" * 100000, "nested too deeply"),
        (None, "config.json is not a regular file"),
    ],
    ids=["list", "nested", "directory"],
)
def test_a_config_that_is_not_an_object_is_refused(tmp_path, capsys, content, match):
    src, _, _ = write(tmp_path, "llama")
    (src / "config.json").unlink()
    if content is None:
        (src / "config.json").mkdir()
    else:
        (src / "config.json").write_text(content)
    refused(tmp_path, src, match, capsys)


def test_an_index_without_weight_map_is_refused(tmp_path, capsys):
    src, _, _ = write(tmp_path, "llama", shards=2)
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    refused(tmp_path, src, "index.json has no weight_map", capsys)


def test_converting_a_converted_model_is_refused(tmp_path, capsys):
    src, _, _ = write(tmp_path, "llama")
    convert(str(src), str(tmp_path / "once"), **quiet())
    refused(tmp_path, tmp_path / "once", "is already reduced.*pass that instead", capsys)
    refused(tmp_path, tmp_path / "once", "is already reduced", remove="q")


# -- 9: bounded work ---------------------------------------------------------------------------


def test_a_layer_count_past_the_tensors_fails_fast(tmp_path, capsys):
    src, _, _ = write(tmp_path, "skipless")
    edit_config(src, num_hidden_layers=10**6)
    start = time.perf_counter()
    refused(tmp_path, src, "declares 1000000 layers, but the checkpoint holds only", capsys)
    assert time.perf_counter() - start < 10  # it took 38 s and 3.8 GB


def test_a_fifo_is_not_read(tmp_path):
    src, _, _ = write(tmp_path, "llama")
    (src / "model.safetensors").unlink()
    os.mkfifo(src / "model.safetensors")
    out = tmp_path / "out"
    # A child process: a reader blocked opening the FIFO holds the GIL, so only a
    # timeout from outside ends it.
    run = subprocess.run(
        [sys.executable, "-m", "mlx_skipless.convert", "--hf-path", str(src), "--mlx-path", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert run.stderr.startswith("error: ") and "model.safetensors is not a regular file" in run.stderr
    assert not out.exists()


# -- 11: each header parsed once -----------------------------------------------------------------


def test_each_header_is_parsed_once(tmp_path, monkeypatch):
    src, _, flat = write(tmp_path, "llama", shards=3)
    parsed = []
    real = safetensors_reader.read_header
    monkeypatch.setattr(safetensors_reader, "read_header", lambda f: parsed.append(f.name) or real(f))
    source = TensorSource(src)
    for key in source.keys():
        source.numpy(key)
    np.testing.assert_array_equal(source.numpy("lm_head.weight"), np.float32(flat["lm_head.weight"]))
    assert sorted(parsed) == sorted(p.name for p in src.glob("*.safetensors"))


# -- the property: any corruption converts correctly, or is refused cleanly ------------------------

BASE = {}


def base_checkpoint() -> Path:
    """One valid tiny checkpoint, written once per session, copied per example."""
    if "dir" not in BASE:
        BASE["tmp"] = tempfile.TemporaryDirectory()
        args, flat = hf.case("llama", num_hidden_layers=1)
        BASE["dir"] = hf.write(Path(BASE["tmp"].name) / "src", "llama", args, flat)
    return BASE["dir"]


def header_length(f: Path) -> int:
    return 8 + int.from_bytes(f.read_bytes()[:8], "little")


def corrupt(src: Path, data) -> str:
    f = src / "model.safetensors"
    how = data.draw(st.sampled_from(["truncate", "flip", "dtype", "nonfinite", "rename", "duplicate"]))
    tensors = dict(mx.load(str(f)))
    key = data.draw(st.sampled_from(sorted(tensors)))
    if how == "truncate":
        raw = f.read_bytes()
        f.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    elif how == "flip":
        raw = bytearray(f.read_bytes())
        i = data.draw(st.integers(0, header_length(f) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
        f.write_bytes(bytes(raw))
    elif how == "dtype":
        tensors[key] = tensors[key].astype(data.draw(st.sampled_from([mx.float16, mx.bfloat16, mx.int32, mx.uint8])))
        mx.save_safetensors(str(f), tensors)
    elif how == "nonfinite":
        v = np.array(tensors[key])
        v.flat[data.draw(st.integers(0, v.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        tensors[key] = mx.array(v)
        mx.save_safetensors(str(f), tensors)
    elif how == "rename":
        tensors[key + data.draw(st.sampled_from(["_", ".x", "s"]))] = tensors.pop(key)
        mx.save_safetensors(str(f), tensors)
    elif data.draw(st.booleans()):  # the same name in a second file, the same values or not
        copy = tensors[key] * data.draw(st.sampled_from([1.0, 0.0]))
        mx.save_safetensors(str(src / "extra.safetensors"), {key: copy})
    else:  # the same name twice in the header, pointing at the same bytes
        raw, n = f.read_bytes(), header_length(f)
        entry = json.dumps({key: json.loads(raw[8:n])[key]})[1:-1].encode()
        header = b"{" + entry + b"," + raw[9:n]
        f.write_bytes(len(header).to_bytes(8, "little") + header + raw[n:])
    return how


@settings(max_examples=12, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_any_corruption_converts_correctly_or_is_refused_cleanly(data):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = shutil.copytree(base_checkpoint(), tmp / "src")
        how = corrupt(src, data)
        out = tmp / "out"
        before = sorted(p.name for p in tmp.iterdir())
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = convert_module.main(["--hf-path", str(src), "--mlx-path", str(out)])
        if code == 0:
            v = json.loads((out / "config.json").read_text())["conversion"]["verification"]
            figures = [x for m in (v["float32"], *v["stored"].values()) for x in m.values()]
            assert not v["degraded"] and np.isfinite(figures).all(), how
            assert v["float32"]["top1_agreement"] == 1.0, how
        else:
            err = on_screen(stderr.getvalue())
            assert err.startswith("error: ") and err.count("\n") == 1, (how, err)
            assert sorted(p.name for p in tmp.iterdir()) == before, how
