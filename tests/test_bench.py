"""The decode benchmark (issue 8) runs end to end: what it reports is consistent with the
fusion it measures. Timings are not asserted here; they live in docs/bench-decode.md."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_decode.py"


def bench(*args, cwd):
    run = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_bench_decode_reports_the_removed_weights_and_renders_saved_runs(tmp_path):
    out = json.loads(bench("--preset", "tiny", "--dtypes", "float32", "--steps", "2", "--warmup", "1",
                           "--prompt", "4", "--json", cwd=tmp_path))
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
    bench("--load", "a.json", "b.json", "--markdown", "t.md", cwd=tmp_path)
    rows = [line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| tiny")]
    assert [row.split("|")[2].strip() for row in rows] == ["float32", "4bit"]

    (tmp_path / "c.json").write_text(json.dumps(dict(out, machine="elsewhere")))
    run = subprocess.run([sys.executable, str(SCRIPT), "--load", "a.json", "c.json"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert run.returncode != 0 and "different machines" in run.stderr
