"""Conversion cost: wall time and peak memory of converting generated checkpoints.

Writes skipless Llama-layout checkpoints (bfloat16, one safetensors shard per
block, mlx_skipless.synthetic) that share one block shape and differ only in
depth, converts each in a fresh process, and prints wall time and peak RSS beside
the sizes that should bound it: if the converter streams, peak memory follows the
largest block and the embeddings, not the model. In the same run it measures what
bounds the time from below: mlx_lm convert of a stock llama of the same shape
(reading, casting, writing), and the GEMM floor, the products that fusion must
form (P into gate and up, the next block's Q into down: 3·2·d²·f FLOPs a block)
at this machine's numpy float32 GEMM rate. The per-layer slope, from the two
depths, is what the floor bounds. Each is given in wall and in CPU seconds: where
other work shares the CPU, wall time follows the load, and the CPU-time ratio is the
one to compare between runs (OPENBLAS_NUM_THREADS=1 keeps idle BLAS threads from
spinning on a busy machine).

    python scripts/bench_convert.py --preset mistral-7b     # 2 and 6 layers; ~5 min on 2 cores
    python scripts/bench_convert.py                         # TinyLlama blocks: 2, 8, 20 layers
    python scripts/bench_convert.py --layers 2 4 --no-verify --json
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mlx_skipless import counting
from mlx_skipless.synthetic import PRESETS, preset_args, write_checkpoint
from mlx_skipless.verify import PROBE_TOKENS

VERIFIED_MODELS = 4  # original and converted, each in float32 and as stored

# Four layers apart, and both past the first two blocks, during which the process's heap grows
# to what a block needs (fresh pages cost most on a virtual machine): the steady cost per layer.
DEFAULT_LAYERS = {"mistral-7b": [2, 6]}
PEAK = "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024)"
# CPU seconds of every thread: on a CPU shared with other work, wall time says how busy the
# machine was; CPU time says what the conversion cost, and its ratio to the floor's keeps.
CPU = "sum(resource.getrusage(resource.RUSAGE_SELF)[:2])"
CHILD = f"""
import json, resource, sys, time
t = time.perf_counter()
from mlx_skipless.convert import convert
from mlx_skipless.memory import keep_freed_memory
keep_freed_memory()  # as the command line does
# The cost is measured whatever the verdict: random deep stacks may trip the degradation check.
report = convert(sys.argv[1], sys.argv[2], remove=sys.argv[4], verify_output=sys.argv[3] == "1", progress=False,
                 allow_degraded=True, log=lambda *a: None)
print(json.dumps({{"wall_s": time.perf_counter() - t, "cpu_s": {CPU}, "peak_rss_bytes": {PEAK},
                  "trials": len(report.get("plan", {{}}).get("trials", [])),
                  "verification": report.get("verification", {{}}).get("stored")}}))
"""
MLX_LM = f"""
import json, resource, sys, time
t = time.perf_counter()
from mlx_lm import convert
convert(sys.argv[1], sys.argv[2], dtype="bfloat16")
print(json.dumps({{"wall_s": time.perf_counter() - t, "cpu_s": {CPU}, "peak_rss_bytes": {PEAK}}}))
"""
BASELINE = f"""
import json, resource, sys
import mlx.core, mlx_lm, numpy, mlx_skipless.convert
print(json.dumps({{"peak_rss_bytes": {PEAK}}}))
"""


def child(code: str, *argv) -> dict:
    run = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"{argv} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def gemm_rate(d: int, f: int, repeats: int = 2, dtype=np.float32) -> tuple:
    """numpy's GEMM rate on the (d x d) @ (d x f) product fusion forms, best of
    `repeats`: (FLOP per wall second, FLOP per CPU second of all its threads)."""
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((d, d), dtype=dtype), rng.standard_normal((d, f), dtype=dtype)
    wall = cpu = float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        A @ B
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return 2 * d * d * f / wall, 2 * d * d * f / cpu


def measure(preset: str, layers: int, verify: bool, remove: str, mlx_lm: bool, work: Path, drawn: dict) -> dict:
    args = preset_args(preset, layers)
    counts = counting.count(args)
    src, out = work / f"src-{layers}", work / f"out-{layers}"
    write_checkpoint(src, args, distinct=1, drawn=drawn)  # one block drawn: the converter does not care
    os.sync()  # the checkpoint just written goes to disk now, not while the conversion is timed
    row = child(CHILD, src, out, int(verify), remove)
    shutil.rmtree(src), shutil.rmtree(out)
    if mlx_lm:
        std, std_out = work / f"std-{layers}", work / f"std-out-{layers}"
        write_checkpoint(std, args, standard=True, distinct=1, drawn=drawn)
        os.sync()
        row["mlx_lm"] = child(MLX_LM, std, std_out)
        shutil.rmtree(std), shutil.rmtree(std_out)
    comp = counts["components"]
    block = (counts["total"] - comp["embed_tokens"] - comp.get("lm_head", 0) - comp.get("norms", 0)) // layers
    return {
        "layers": layers,
        "parameters": counts["total"],
        "block_parameters": block,
        "embedding_parameters": comp["embed_tokens"] + comp.get("lm_head", 0),
        "model_bytes_float32": 4 * counts["total"],
        **row,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="tinyllama", help="the block shape")
    p.add_argument("--layers", type=int, nargs="+", help="depths to convert (default: 2 6 for mistral-7b, else 2 8 20)")
    p.add_argument("--remove", default="auto", choices=["auto", "q", "k", "v"])
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--mlx-lm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time mlx_lm convert of a stock llama of each shape",
    )
    p.add_argument("--workdir", help="where the checkpoints go (default: a temporary directory)")
    p.add_argument("--json", action="store_true")
    opts = p.parse_args()
    layers = opts.layers or DEFAULT_LAYERS.get(opts.preset, [2, 8, 20])
    a = preset_args(opts.preset, 1)
    d, f = a.hidden_size, a.intermediate_size
    baseline = child(BASELINE)
    rates, rows, drawn = [gemm_rate(d, f)], [], {}
    if opts.workdir:
        Path(opts.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-convert-", dir=opts.workdir) as work:
        for n in layers:
            # each depth takes minutes at 7B shapes: say what is under way (stderr: --json stays clean)
            print(f"[bench] {opts.preset}: writing and converting {n} layers", file=sys.stderr, flush=True)
            rows.append(measure(opts.preset, n, opts.verify, opts.remove, opts.mlx_lm, Path(work), drawn))
            if not opts.json:
                r, gb = rows[-1], 1e9
                lm = (
                    f"; mlx_lm convert {r['mlx_lm']['wall_s']:.1f} s, {r['mlx_lm']['peak_rss_bytes'] / gb:.2f} GB"
                    if "mlx_lm" in r
                    else ""
                )
                print(
                    f"{r['parameters'] / 1e9:5.2f}B params ({n:3d} layers, {r['model_bytes_float32'] / gb:5.2f} GB "
                    f"in float32): {r['wall_s']:7.1f} s ({r['cpu_s']:.1f} CPU s), "
                    f"peak RSS {r['peak_rss_bytes'] / gb:5.2f} GB "
                    f"= imports {baseline['peak_rss_bytes'] / gb:.2f} + "
                    f"{(r['peak_rss_bytes'] - baseline['peak_rss_bytes']) / gb:.2f} GB; one block "
                    f"{4 * r['block_parameters'] / gb:.2f} GB, embeddings {4 * r['embedding_parameters'] / gb:.2f} GB "
                    f"(float32){lm}",
                    flush=True,
                )
    rates.append(gemm_rate(d, f))  # before and after: the machine may be shared
    rate, cpu_rate = (float(np.mean(r)) for r in zip(*rates))
    floor, cpu_floor = 3 * 2 * d * d * f / rate, 3 * 2 * d * d * f / cpu_rate
    # What else the converter must compute, at least: Q factored and K, V solved with it in
    # float64, and the probe pushed through the four models compared.
    rate64 = gemm_rate(d, f, dtype=np.float64)[0]
    kv = 2 * a.num_key_value_heads * a.head_dim
    solve_s = (2 / 3 * d**3 + 2 * d * d * kv) / rate64
    verify_s = VERIFIED_MODELS * 2 * PROBE_TOKENS * rows[0]["block_parameters"] / rate if opts.verify else 0.0
    summary = {
        "preset": opts.preset,
        "remove": opts.remove,
        "verify": opts.verify,
        "gemm_float32_flops": [r[0] for r in rates],
        "gemm_float32_flops_per_cpu_s": [r[1] for r in rates],
        "floor_s_per_layer": floor,
        "floor_cpu_s_per_layer": cpu_floor,
        "gemm_float64_flops": rate64,
        "float64_solve_s_per_layer": solve_s,
        "verification_s_per_layer": verify_s,
    }
    if len(rows) > 1:
        lo, hi = rows[0], rows[-1]
        summary["slope_s_per_layer"] = (hi["wall_s"] - lo["wall_s"]) / (hi["layers"] - lo["layers"])
        summary["slope_over_floor"] = summary["slope_s_per_layer"] / floor
        summary["slope_cpu_s_per_layer"] = (hi["cpu_s"] - lo["cpu_s"]) / (hi["layers"] - lo["layers"])
        summary["cpu_slope_over_floor"] = summary["slope_cpu_s_per_layer"] / cpu_floor
        if "mlx_lm" in lo:
            summary["mlx_lm_slope_s_per_layer"] = (hi["mlx_lm"]["wall_s"] - lo["mlx_lm"]["wall_s"]) / (
                hi["layers"] - lo["layers"]
            )
            # The floor as the issue of record defines it: the products plus the reading and
            # writing that mlx_lm convert also does.
            summary["floor_with_io_s_per_layer"] = floor + max(summary["mlx_lm_slope_s_per_layer"], 0.0)
            summary["slope_over_floor_with_io"] = summary["slope_s_per_layer"] / summary["floor_with_io_s_per_layer"]
    if opts.json:
        print(json.dumps({"baseline_rss_bytes": baseline["peak_rss_bytes"], **summary, "runs": rows}, indent=2))
        return
    print(
        f"GEMM floor: 3·2·d²·f = {6 * d * d * f / 1e12:.2f} TFLOP a layer at numpy float32 "
        f"{rate / 1e9:.1f} GFLOP/s (measured {', '.join(f'{r[0] / 1e9:.1f}' for r in rates)}) = {floor:.1f} s "
        f"a layer; {cpu_rate / 1e9:.1f} GFLOP per CPU second = {cpu_floor:.1f} CPU s a layer"
    )
    if "slope_s_per_layer" in summary:
        print(
            f"per-layer slope: {summary['slope_s_per_layer']:.1f} s = {summary['slope_over_floor']:.2f}x the floor"
            f" ({summary['slope_cpu_s_per_layer']:.1f} CPU s = {summary['cpu_slope_over_floor']:.2f}x in CPU time)"
            + (
                f"; mlx_lm convert's slope {summary['mlx_lm_slope_s_per_layer']:.1f} s, and with it added to the "
                f"floor {summary['slope_over_floor_with_io']:.2f}x"
                if "mlx_lm_slope_s_per_layer" in summary
                else ""
            )
        )
    print(
        f"also computed a layer, at the least: Q's float64 factorization and K, V's solve (2/3·d³ + 2·d²·{kv} "
        f"FLOP at numpy float64 {rate64 / 1e9:.1f} GFLOP/s) {solve_s:.1f} s"
        + (
            f", the probe ({PROBE_TOKENS} tokens) through {VERIFIED_MODELS} models' blocks {verify_s:.1f} s"
            if opts.verify
            else ""
        )
        + f": floor and these alone {(floor + solve_s + verify_s) / floor:.2f}x the floor"
    )


if __name__ == "__main__":
    main()
