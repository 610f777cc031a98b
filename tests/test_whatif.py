"""The skipless what-if of a llama GGUF (issue 7's real-matrices check), on a tiny GGUF written here."""

import json

import hf_checkpoints
import mlx.core as mx
import numpy as np
import pytest

from mlx_skipless import whatif
from mlx_skipless.convert import convert
from mlx_skipless.loading import load_model
from mlx_skipless.output_dir import OutputDir

D, HEADS, KV, HD, FFN, VOCAB, LAYERS = 64, 4, 2, 16, 96, 100, 2


def llama_cpp_permute(w, heads):
    """convert_hf_to_gguf.py's row order for Q and K."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, rng):
    hf = {
        "token_embd.weight": rng.standard_normal((VOCAB, D)) * 0.02,
        "output_norm.weight": 1 + 0.1 * rng.standard_normal(D),
    }
    shapes = {
        "attn_q": (HEADS * HD, D),
        "attn_k": (KV * HD, D),
        "attn_v": (KV * HD, D),
        "attn_output": (D, HEADS * HD),
        "ffn_gate": (FFN, D),
        "ffn_up": (FFN, D),
        "ffn_down": (D, FFN),
    }
    for i in range(LAYERS):
        for name, shape in shapes.items():
            hf[f"blk.{i}.{name}.weight"] = rng.standard_normal(shape) / np.sqrt(shape[1])
        for norm in ("attn_norm", "ffn_norm"):
            hf[f"blk.{i}.{norm}.weight"] = 1 + 0.3 * rng.standard_normal(D)
    stored = dict(hf)
    for i in range(LAYERS):
        stored[f"blk.{i}.attn_q.weight"] = llama_cpp_permute(hf[f"blk.{i}.attn_q.weight"], HEADS)
        stored[f"blk.{i}.attn_k.weight"] = llama_cpp_permute(hf[f"blk.{i}.attn_k.weight"], KV)
    # mx.save_gguf writes no quantized tensors: the dequantizing path runs on the real GGUF only
    arrays = {k: mx.array(v.astype(np.float32)) for k, v in stored.items()}
    meta = {
        "general.architecture": "llama",
        "llama.block_count": mx.array(LAYERS, mx.uint32),
        "llama.embedding_length": mx.array(D, mx.uint32),
        "llama.feed_forward_length": mx.array(FFN, mx.uint32),
        "llama.attention.head_count": mx.array(HEADS, mx.uint32),
        "llama.attention.head_count_kv": mx.array(KV, mx.uint32),
        "llama.rope.freq_base": mx.array(10000.0, mx.float32),
    }
    mx.save_gguf(str(path), arrays, meta)
    return hf


def test_whatif_folds_gains_restores_rope_order_and_keeps_activations_o1(tmp_path):
    hf = write_gguf(tmp_path / "tiny.gguf", np.random.default_rng(0))
    args, flat = whatif.from_llama_gguf(tmp_path / "tiny.gguf", LAYERS)
    assert (args.hidden_size, args.num_key_value_heads, args.intermediate_size) == (D, KV, FFN)
    gain = hf["blk.1.attn_norm.weight"]
    assert np.allclose(flat["model.layers.1.self_attn.q_proj.weight"], hf["blk.1.attn_q.weight"] * gain, atol=1e-6)
    assert np.allclose(flat["model.layers.1.self_attn.k_proj.weight"], hf["blk.1.attn_k.weight"] * gain, atol=1e-6)
    assert np.allclose(
        flat["model.layers.0.mlp.up_proj.weight"], hf["blk.0.ffn_up.weight"] * hf["blk.0.ffn_norm.weight"], atol=1e-6
    )
    assert np.allclose(flat["lm_head.weight"], hf["token_embd.weight"] * hf["output_norm.weight"], atol=1e-6)

    whatif.rms_calibrate(args, flat)
    out = tmp_path / "whatif"
    whatif.write(OutputDir(out), args, flat, "tiny.gguf")
    assert json.loads((out / "config.json").read_text())["skipless"] is True
    model, _ = load_model(str(out))
    tokens = mx.array(np.random.default_rng(whatif.PROBE_SEED).integers(0, VOCAB, (4, 64)))
    h = model.model.embed(tokens)
    for layer in model.model.layers:
        h = layer(h, "causal")
        assert abs(float(mx.sqrt(mx.mean(h * h))) - 1) < 1e-3  # each block's output at RMS 1

    (tmp_path / "tokenizer").mkdir()
    hf_checkpoints.write_tokenizer(tmp_path / "tokenizer", VOCAB)  # a GGUF's tokenizer is not carried over
    report = convert(
        str(out),
        str(tmp_path / "reduced"),
        dtype="float32",
        tokenizer=str(tmp_path / "tokenizer"),
        progress=False,
        log=lambda *_: None,
    )
    assert report["verification"]["float32"]["max_rel_error"] < 1e-4


def test_whatif_cli_errors_are_one_line(tmp_path, capsys):
    write_gguf(tmp_path / "tiny.gguf", np.random.default_rng(1))
    assert (
        whatif.main(["--model", str(tmp_path / "tiny.gguf"), "--mlx-path", str(tmp_path / "o"), "--layers", "9"]) == 1
    )
    assert "between 1 and 2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["truncated", "header", "counts", "nan"])
def test_a_malformed_or_non_finite_gguf_is_one_line_before_mlx_reads_it(tmp_path, capsys, damage):
    """MLX's GGUF reader trusts the file's lengths (a malformed one crashed the process):
    whatif walks the header and the tensor table first."""
    path = tmp_path / "tiny.gguf"
    write_gguf(path, np.random.default_rng(2))
    raw = bytearray(path.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) - 4096]
    elif damage == "header":
        raw[30:60] = b"\xff" * 30  # a string length past the end of the file
    elif damage == "counts":
        raw[8:16] = (1 << 40).to_bytes(8, "little")  # a tensor count larger than the file
    else:
        arrays, meta = mx.load(str(path), return_metadata=True)
        arrays["blk.0.attn_q.weight"] = arrays["blk.0.attn_q.weight"] * float("nan")
        mx.save_gguf(str(path), arrays, meta)
        raw = path.read_bytes()
    path.write_bytes(bytes(raw))
    assert whatif.main(["--model", str(path), "--mlx-path", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and ("non-finite" if damage == "nan" else "GGUF" if damage != "truncated" else "truncated") in err
    )
    assert not (tmp_path / "o").exists()
