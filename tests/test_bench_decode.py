"""The decode benchmark (issue 8) runs end to end: what it reports is consistent with the
fusion it measures. Timings are not asserted here; they live in docs/bench-decode.md."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from harness import command

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_decode.py"


def bench(*args, cwd):
    run = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd)
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.mark.slow
def test_bench_decode_reports_the_removed_weights_and_renders_saved_runs(tmp_path):
    out = json.loads(
        bench(
            "--preset",
            "tiny",
            "--dtypes",
            "float32",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--prompt",
            "4",
            "--json",
            cwd=tmp_path,
        )
    )
    (r,) = out["results"]
    d, layers = 256, 2  # preset tiny
    wb, br = r["weight_bytes"], r["bytes_read_per_token"]
    # Q and P of every block are gone; the embedding, having absorbed Q, keeps its size.
    assert wb["vanilla"] - wb["reduced"] == layers * 2 * d * d * 4
    # The same shape as mlx-lm's llama, less its norms: two per block and a final one.
    assert wb["mlx_lm_llama"] - wb["vanilla"] == (2 * layers + 1) * d * 4
    assert r["predicted_speedup"] == br["vanilla"] / br["reduced"] > 1
    assert set(r["decode_tokens_per_s"]) == {"vanilla", "reduced", "mlx_lm_llama"}
    assert len(r["decode_tokens_per_s"]["vanilla"]) == 3 and r["measured_speedup"] > 0

    (tmp_path / "a.json").write_text(json.dumps(out))
    q = dict(out, results=[dict(r, dtype="4bit")])
    (tmp_path / "b.json").write_text(json.dumps(q))
    rendered = command(
        "bench_decode.py", "--load", tmp_path / "a.json", tmp_path / "b.json", "--markdown", tmp_path / "t.md"
    )
    assert rendered.returncode == 0, rendered.stderr
    rows = [line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| tiny")]
    assert [row.split("|")[2].strip() for row in rows] == ["float32", "4bit"]

    (tmp_path / "c.json").write_text(json.dumps(dict(out, machine="elsewhere")))
    run = command("bench_decode.py", "--load", tmp_path / "a.json", tmp_path / "c.json")
    assert run.returncode != 0 and "different machines" in run.stderr


@pytest.mark.slow
def test_bench_convert_reports_the_slope_against_the_gemm_floor(tmp_path):
    script = SCRIPT.parent / "bench_convert.py"
    run = subprocess.run(
        [
            sys.executable,
            str(script),
            "--preset",
            "tiny",
            "--layers",
            "1",
            "2",
            "--no-mlx-lm",
            "--json",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert [r["layers"] for r in out["runs"]] == [1, 2] and all(r["trials"] == 1 for r in out["runs"])
    assert (
        out["floor_s_per_layer"] > 0 and out["slope_s_per_layer"] == out["runs"][1]["wall_s"] - out["runs"][0]["wall_s"]
    )
    # CPU time too: on a shared machine it is what stays comparable
    assert (
        out["floor_cpu_s_per_layer"] > 0
        and out["slope_cpu_s_per_layer"] == out["runs"][1]["cpu_s"] - out["runs"][0]["cpu_s"]
    )
    # and what else the converter must compute, at the least: float64 solves and verification
    assert out["float64_solve_s_per_layer"] > 0 and out["verification_s_per_layer"] > 0
    assert not list(tmp_path.iterdir())  # the checkpoints are removed


def test_make_checkpoint_gives_one_layer_an_ill_conditioned_q(tmp_path):
    import pytest

    from mlx_skipless.safetensors_reader import TensorSource
    from mlx_skipless.synthetic import preset_args, write_checkpoint

    with pytest.raises(ValueError, match="ill-conditioned 2: the model has layers 0 to 1"):
        write_checkpoint(tmp_path / "bad", preset_args("tiny"), ill_conditioned=2)
    assert not (tmp_path / "bad").exists()
    write_checkpoint(tmp_path / "ic", preset_args("tiny"), ill_conditioned=1)
    source = TensorSource(tmp_path / "ic")
    conds = [np.linalg.cond(source.float32(f"model.layers.{i}.self_attn.q_proj.weight")) for i in range(2)]
    assert conds[0] < 10 and conds[1] > 1e3  # 1e4 as drawn; bfloat16 storage moves it


def test_bench_linalg_times_the_factorization_beside_the_inverse():
    run = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "bench_linalg.py"), "--d", "64", "--kv", "16", "--repeats", "1"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("LU: factor") and "before: inverse" in run.stdout
