"""Acceptance (issue 3): the converter, on checkpoints written as Hugging Face writes them."""

import json

import hf_checkpoints as hf
import mlx.core as mx
import numpy as np
import pytest
import reference
from harness import command, logits, rel_err, tokens

from mlx_skipless import convert as convert_module
from mlx_skipless import layout
from mlx_skipless.convert import DegradedError, convert
from mlx_skipless.errors import CheckpointError
from mlx_skipless.families import BUFFERS
from mlx_skipless.fusion import FusionError
from mlx_skipless.loading import load, load_model
from mlx_skipless.products import products_for
from mlx_skipless.safetensors_reader import TensorSource
from mlx_skipless.streaming import Passes

FAMILIES = [
    "llama",
    "mistral",
    "mixtral",
    "gpt_neox",
    "gpt_neox_serial",
    "gpt2",
    "gpt2_bare",
    "skipless",
    "skipless_shaped",
]


def quiet(**kw):
    return dict(progress=False, log=lambda *_: None, **kw)


def write(tmp_path, family="llama", seed=0, **kw):
    args, flat = hf.case(family.removesuffix("_bare"), seed)
    return hf.write(tmp_path / "src", family, args, flat, **kw), args, flat


def reference_logits(args, flat, t):
    return reference.forward(layout.weights_from_flat(flat, args), args, t)


def layer_matrix_sizes(directory):
    """Elements of every matrix inside the blocks, as stored in a checkpoint."""
    source = TensorSource(directory)
    return sum(
        int(np.prod(s))
        for k, s in source.shapes.items()
        if len(s) >= 2 and not BUFFERS.search(k) and ("layers." in k or ".h." in k or k.startswith("h."))
    )


def nothing_written(tmp_path, out):
    return not out.exists() and not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_converts_exactly(tmp_path, family):
    src, args, flat = write(tmp_path, family)
    out = tmp_path / "out"
    report = convert(str(src), str(out), **quiet())
    t = tokens(16)
    model, tokenizer = load(str(out))
    assert rel_err(logits(model, t), reference_logits(args, flat, t)) <= 1e-5
    assert tokenizer.encode("def x") == [3, 13]

    # Matrices in the blocks drop by 2 d² per serial block and d² per parallel one.
    d, L = args.hidden_size, args.num_hidden_layers
    per_block = d * d if args.parallel_block else 2 * d * d
    dropped = layer_matrix_sizes(src) - layer_matrix_sizes(out)
    assert dropped == L * per_block
    # A tied head must be untied: the embedding absorbed the first block's matrix.
    untied = report["weights"]["untied_head"]
    assert untied == (args.vocab_size * d if args.tie_word_embeddings else 0)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "skipless" and config["model_file"] == "skipless.py"
    assert (out / "skipless.py").exists() and (out / "README.md").exists()
    assert (out / "tokenizer.json").exists()
    conversion = config["conversion"]
    assert len(conversion["layers"]) == L and all("cond" in e for e in conversion["layers"])
    assert conversion["weights"]["after"] < conversion["weights"]["before"]
    assert conversion["verification"]["float32"]["top1_agreement"] == 1.0


def test_vanilla_checkpoint_loads_directly(tmp_path):
    src, args, flat = write(tmp_path, "gpt_neox", shards=3)
    model, _ = load_model(str(src))
    t = tokens(16)
    assert rel_err(logits(model, t), reference_logits(args, flat, t)) <= 1e-5


def test_dtype_and_quantization_follow_mlx_lm(tmp_path):
    src, args, flat = write(tmp_path, "llama", dtype=mx.bfloat16)
    report = convert(str(src), str(tmp_path / "bf16"), **quiet())
    assert report["dtype"] == "bfloat16"  # the checkpoint's own dtype by default
    model, _ = load_model(str(tmp_path / "bf16"))
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16

    convert(str(src), str(tmp_path / "q4"), dtype="float16", quantize=True, q_group_size=32, **quiet())
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    model, _ = load_model(str(tmp_path / "q4"))
    assert "scales" in model.layers[0].mlp.gate_proj
    assert logits(model, tokens()).shape == (8, args.vocab_size)


def test_output_runs_under_stock_mlx_lm(tmp_path):
    src, _, _ = write(tmp_path, "gpt2")
    out = tmp_path / "out"
    convert(str(src), str(out), **quiet())
    run = command(
        "mlx_lm.generate",
        *("--model", out, "--trust-remote-code", "--prompt", "def x", "--max-tokens", 4, "--ignore-chat-template"),
    )
    assert run.returncode == 0, run.stderr
    assert "Generation: 4 tokens" in run.stdout


def test_auto_removes_best_conditioned_and_keeps_unusable_layers(tmp_path):
    args, flat = hf.case("llama")  # GQA: only Q is square
    flat["model.layers.1.self_attn.q_proj.weight"][:, 0] = 0.0  # singular
    src = hf.write(tmp_path / "src", "llama", args, flat)
    logs = []
    report = convert(str(src), str(tmp_path / "out"), progress=False, log=logs.append)
    assert [e["removed"] for e in report["layers"]] == ["qp", "p"]
    assert "kept" in report["layers"][1]["note"] and any("[layer 1] kept" in m for m in logs)
    model, _ = load_model(str(tmp_path / "out"))
    t = tokens()
    assert rel_err(logits(model, t), reference_logits(args, flat, t)) <= 1e-5

    with pytest.raises(FusionError, match=r"layer 1: self_attn.q_proj is singular"):
        convert(str(src), str(tmp_path / "forced"), remove="q", **quiet())
    assert nothing_written(tmp_path, tmp_path / "forced")


def test_mha_auto_picks_the_best_conditioned_of_q_k_v(tmp_path):
    args, flat = hf.case("mistral")  # MHA
    rng = np.random.default_rng(3)
    for i, best in enumerate("kv"):
        for m in "qkv":
            w = np.eye(32) + (0.05 if m == best else 0.6) * rng.standard_normal((32, 32)) / 32**0.5
            flat[f"model.layers.{i}.self_attn.{m}_proj.weight"] = w
    src = hf.write(tmp_path / "src", "mistral", args, flat)
    report = convert(str(src), str(tmp_path / "out"), **quiet())
    assert [e["removed"] for e in report["layers"]] == ["kp", "vp"]


def ill_conditioned(tmp_path, cond, dtype):
    args, flat = hf.case("llama", num_hidden_layers=3)
    rng = np.random.default_rng(1)
    U, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    V, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    flat["model.layers.1.self_attn.q_proj.weight"] = 2 * U @ np.diag(np.geomspace(1, 1 / cond, 32)) @ V.T
    return hf.write(tmp_path / "src", "llama", args, flat, dtype=dtype)


def test_fusion_that_rounding_destroys_is_refused_loudly(tmp_path, capsys):
    # Exact on paper, but bf16 rounding of Q^-1-scaled weights (cond(Q) 1e4) destroys it.
    src = ill_conditioned(tmp_path, 1e4, mx.bfloat16)
    out = tmp_path / "out"
    with pytest.raises(DegradedError, match="clearly worse"):
        convert(str(src), str(out), remove="q", progress=False)
    assert "FUSION MADE THIS MODEL CLEARLY WORSE" in capsys.readouterr().out
    assert nothing_written(tmp_path, out)
    assert convert_module.main(["--hf-path", str(src), "--mlx-path", str(out), "--remove", "q"]) == 3

    report = convert(str(src), str(out), remove="q", allow_degraded=True, **quiet())
    v = report["verification"]
    assert v["degraded"] and v["stored"]["converted"]["kl"] > 100 * v["stored"]["original"]["kl"]
    # auto keeps the ill-conditioned layer's Q and is as good as plain rounding
    report = convert(str(src), str(out), force=True, **quiet())
    assert [e["removed"] for e in report["layers"]] == ["qp", "p", "qp"]
    assert not report["verification"]["degraded"]


def test_a_model_whose_logits_vanish_is_not_called_worse(tmp_path, capsys):
    """All-zero logits on the probe (a zero head here; a deep random stack underflows the
    same way) make every relative error 0/0: the converter says the figures compare
    nothing, instead of calling fusion clearly worse and searching for another plan."""
    args, flat = hf.case("llama", 0)
    flat = {**flat, "lm_head.weight": np.zeros_like(flat["lm_head.weight"])}
    src = hf.write(tmp_path / "src", "llama", args, flat, dtype=mx.bfloat16)
    report = convert(str(src), str(tmp_path / "out"), dtype="bfloat16", progress=False)
    v = report["verification"]
    assert v["reference_max_abs_logit"] == 0 and not v["degraded"] and "plan" in report
    assert [t["rung"] for t in report["plan"]["trials"]] == [0]
    assert v["stored"]["converted"]["max_rel_error"] == 0
    assert "the figures above compare nothing" in capsys.readouterr().out


def corrupt(tmp_path, how):
    src, args, flat = write(tmp_path, "llama")
    if how == "not_skipless":
        hf.write(src, "llama", args, flat, skipless_flag=False)
    elif how == "norms":
        extra = dict(flat, **{f"model.layers.{i}.input_layernorm.weight": np.ones(32) for i in range(2)})
        hf.write(src, "skipless", args, extra)  # same names as llama; add the norms
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    elif how == "final_norm_renamed":  # a norm-like name outside the blocks is no block norm
        hf.write(
            src, "llama", args, {("model.norm_x.weight" if k == "model.norm.weight" else k): v for k, v in flat.items()}
        )
    elif how == "unsupported":
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps(dict(config, model_type="bert")))
    elif how == "missing":
        (src / "model.safetensors").unlink()
    elif how == "truncated":
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "shape":
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps(dict(config, intermediate_size=40)))
    return src


ERRORS = {
    "not_skipless": r"not declared skipless.*residual.*would change what it computes.*--assume-skipless",
    "norms": r"normalization inside its block chain: model\.layers\.0\.input_layernorm\.weight.*normfree",
    "final_norm_renamed": r"has tensors that are not weights a skipless llama model has: model\.norm_x\.weight "
    r"\(a skipless llama model's final norm is model\.norm\.weight\)$",
    "unsupported": r"'bert' is not supported; supported: llama, mistral, mixtral, gpt_neox, gpt2, skipless",
    "missing": r"no \*\.safetensors weight files",
    "truncated": r"unreadable or truncated",
    "shape": r"shape mismatch.*mlp\.gate_proj\.weight is \(48, 32\), expected \(40, 32\)",
}


@pytest.mark.parametrize("how", ERRORS)
def test_bad_input_is_refused_and_nothing_written(tmp_path, capsys, how):
    src = corrupt(tmp_path, how)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=ERRORS[how]):
        convert(str(src), str(out), **quiet())
    assert convert_module.main(["--hf-path", str(src), "--mlx-path", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert nothing_written(tmp_path, out)


def test_assume_skipless_accepts_an_undeclared_checkpoint(tmp_path):
    src = corrupt(tmp_path, "not_skipless")
    convert(str(src), str(tmp_path / "out"), assume_skipless=True, **quiet())
    assert (tmp_path / "out" / "config.json").exists()


def test_existing_output_needs_force(tmp_path):
    src, _, _ = write(tmp_path, "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists; pass --force"):
        convert(str(src), str(out), **quiet())
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(CheckpointError, match="not a model mlx-skipless wrote"):
        convert(str(src), str(out), force=True, **quiet())  # --force replaces only our own models
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    convert(str(src), str(out), force=True, **quiet())  # an empty directory
    convert(str(src), str(out), force=True, **quiet())  # a model this tool wrote
    assert (out / "config.json").exists()


def test_a_failure_midway_leaves_no_partial_output(tmp_path):
    src, _, _ = write(tmp_path, "llama")
    out = tmp_path / "out"

    def interrupt(message):
        if message.startswith("[INFO] weights"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(str(src), str(out), progress=False, log=interrupt)
    assert nothing_written(tmp_path, out)


def test_main_job_runs_on_the_embedded_default_with_no_arguments(tmp_path, monkeypatch, capsys):
    """The README's main command: convert the packaged demo, verify, report, generate."""
    from mlx_skipless import generate as generate_cli

    monkeypatch.chdir(tmp_path)
    assert convert_module.main([]) == 0
    out = capsys.readouterr().out
    assert "[VERIFY] converted, float32" in out and "removed), predicted batch-1 speedup" in out
    config = json.loads((tmp_path / "mlx_model" / "config.json").read_text())
    assert not config["conversion"]["verification"]["degraded"]
    assert generate_cli.main(["--max-tokens", "12"]) == 0
    assert "Generation:" in capsys.readouterr().out


@pytest.mark.parametrize("remove", ["q", "auto"])
def test_each_block_is_read_once(tmp_path, monkeypatch, remove):
    from collections import Counter

    from mlx_skipless.loading import SkiplessCheckpoint

    src, args, _ = write(tmp_path, "llama")
    reads, read = Counter(), SkiplessCheckpoint.layer

    def counted(self, i, *a, **kw):
        reads[i] += 1
        return read(self, i, *a, **kw)

    monkeypatch.setattr(SkiplessCheckpoint, "layer", counted)
    report = convert(str(src), str(tmp_path / "out"), remove=remove, **quiet())
    assert len(report["plan"]["trials"]) == 1 if remove == "auto" else "plan" not in report
    assert reads == {i: 1 for i in range(args.num_hidden_layers)}


@pytest.mark.parametrize("family,quantize", [("llama", False), ("gpt_neox", False), ("llama", True)])
def test_trials_reuse_the_written_plan_and_match_a_full_pass(tmp_path, family, quantize):
    # --remove auto measures other rungs from what the top rung wrote, refusing nothing:
    # the figures must be those of fusing each rung from scratch.
    from mlx_skipless import planner, verify
    from mlx_skipless.loading import SkiplessCheckpoint

    args, flat = hf.case(family, num_hidden_layers=4, tie_word_embeddings=False)
    src = hf.write(tmp_path / "src", family, args, flat, dtype=mx.bfloat16)
    ckpt = SkiplessCheckpoint(str(src))
    quant = {"group_size": 32, "bits": 4, "mode": "affine"} if quantize else None
    passes = Passes(
        ckpt,
        mx.bfloat16,
        quant,
        "bfloat16",
        verify.probe_tokens(args.vocab_size),
        False,
        products_for("bfloat16", quant is not None),
    )
    merge_p = "p" if not args.parallel_block else ""
    (tmp_path / "stage").mkdir()
    passes.write(tmp_path / "stage", lambda row: planner.ladder([row], merge_p)[0][0])
    rungs = planner.ladder(passes.conds, merge_p)
    for forms in rungs[1:-1]:
        reused = passes._reuse(forms)
        assert reused is not None
        _, _, _, full = passes._run(forms, ("converted_stored",), None)
        assert rel_err(reused, full["converted_stored"]) <= 1e-6


@pytest.mark.parametrize("layer,quantize", [(1, False), (0, False), (1, True)])
def test_auto_writes_its_chosen_plan_from_the_first_without_fusing_again(tmp_path, monkeypatch, layer, quantize):
    # The first plan (every Q removed) is over the budget, as layer `layer`'s Q is ill-conditioned;
    # the plan chosen instead is written from the first one's blocks: one fusion pass in all,
    # and the weights and stored figures of fusing the chosen plan from scratch.
    from mlx_skipless import verify
    from mlx_skipless.loading import SkiplessCheckpoint

    args, flat = hf.case("llama", num_hidden_layers=3, tie_word_embeddings=False)
    rng = np.random.default_rng(1)
    U, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    V, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    flat[f"model.layers.{layer}.self_attn.q_proj.weight"] = 2 * U @ np.diag(np.geomspace(1, 1e-4, 32)) @ V.T
    src = hf.write(tmp_path / "src", "llama", args, flat, dtype=mx.bfloat16)
    q = dict(quantize=True, q_bits=8, q_group_size=32) if quantize else {}
    runs, run = [], Passes._run
    monkeypatch.setattr(Passes, "_run", lambda self, *a: runs.append(a[0]) or run(self, *a))
    report = convert(str(src), str(tmp_path / "auto"), **q, **quiet())
    forms = [e["removed"] for e in report["layers"]]
    assert forms[layer] == "p" and len(runs) == 1 and len(report["plan"]["trials"]) > 1

    quant = {"group_size": 32, "bits": 8, "mode": "affine"} if quantize else None
    stored_as = "bfloat16" + (", 8-bit (group 32)" if quantize else "")
    full = Passes(
        SkiplessCheckpoint(str(src)),
        mx.bfloat16,
        quant,
        stored_as,
        verify.probe_tokens(args.vocab_size),
        False,
        products_for("bfloat16", quant is not None),
    )
    (tmp_path / "full").mkdir()
    written = full.write(tmp_path / "full", forms)
    written.writer.close(0)
    auto, scratch = mx.load(str(tmp_path / "auto/model.safetensors")), mx.load(str(tmp_path / "full/model.safetensors"))
    assert auto.keys() == scratch.keys()
    assert all(np.array_equal(np.array(auto[k].view(mx.uint8)), np.array(scratch[k].view(mx.uint8))) for k in auto)
    v = report["verification"]
    assert v["stored"]["converted"] == pytest.approx(written.verification["stored"]["converted"], rel=1e-6)
    assert v["float32_plan"] == "first" and not v["degraded"]
    assert [e.get("inverted") for e in report["layers"]] == [inv and inv.matrix for inv in written.inverted]


def test_auto_plan_decided_block_by_block_settles_the_config(tmp_path):
    # Decided as blocks are read, a plan's config is provisional: parallel blocks with attention
    # biases gain FFN biases only if some layer loses Q. Here none can (every Q singular).
    args, flat = hf.case("skipless", attention_bias=True, mlp_bias=False)
    for i in range(args.num_hidden_layers):
        flat[f"model.layers.{i}.self_attn.q_proj.weight"][:, 0] = 0.0
    src = hf.write(tmp_path / "src", "skipless", args, flat)
    report = convert(str(src), str(tmp_path / "out"), **quiet())
    assert [e["removed"] for e in report["layers"]] == ["", ""]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["mlp_bias"] is False and not list(tmp_path.glob("out/*.partial"))
    model, _ = load_model(str(tmp_path / "out"))
    t = tokens()
    assert rel_err(logits(model, t), reference_logits(args, flat, t)) <= 1e-5
