"""Convert a checkpoint larger than RAM and show that memory stays flat while it streams.

Runs `python -m mlx_skipless.convert` on SRC in a child process, samples the child's
resident set (Linux: /proc/PID/status) as it goes, and prints the wall time, the peak RSS
(the kernel's own high-water mark, from wait4), the largest sample in each tenth of the run, the
machine's RAM and the sizes on disk of input and output. Arguments after `--` go to convert.

    python scripts/make_checkpoint.py /work/big/src --preset over-ram --distinct 1
    python scripts/bench_over_ram.py /work/big/src /work/big/out -- --dtype bfloat16 --no-verify
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GB = 1e9


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def rss_bytes(pid: int):
    """The process's resident set now (Linux), or None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(line for line in f if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def run(src: Path, out: Path, convert_args, every: float, log: Path) -> dict:
    cmd = [sys.executable, "-m", "mlx_skipless.convert", "--hf-path", str(src), "--mlx-path", str(out), *convert_args]
    start, samples = time.perf_counter(), []
    with open(log, "w") as err:
        child = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT)
        while True:
            # wait4, not poll: it reaps the child with its rusage, whose ru_maxrss is the true peak
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            rss = rss_bytes(child.pid)
            if rss is not None:
                samples.append((time.perf_counter() - start, rss))
            time.sleep(every)
    child.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait for it again
    wall = time.perf_counter() - start
    if child.returncode:
        raise SystemExit(f"convert failed ({child.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    tenths = [max((r for t, r in samples if k - 1 <= 10 * t / wall < k), default=None) for k in range(1, 11)]
    return {
        "command": " ".join(cmd),
        "wall_s": wall,
        "peak_rss_bytes": peak,
        "rss_by_tenth_bytes": tenths,
        "samples": len(samples),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "input_bytes": disk_bytes(src),
        "output_bytes": disk_bytes(out),
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, convert_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="the checkpoint (e.g. from make_checkpoint.py --preset over-ram)")
    p.add_argument("out", type=Path, help="output directory (must not exist)")
    p.add_argument("--every", type=float, default=1.0, help="seconds between RSS samples (default 1)")
    p.add_argument("--log", type=Path, help="convert's output (default: OUT.log beside OUT)")
    p.add_argument("--json", action="store_true")
    opts = p.parse_args(ours)
    r = run(opts.src, opts.out, convert_args, opts.every, opts.log or opts.out.with_name(opts.out.name + ".log"))
    if opts.json:
        print(json.dumps(r, indent=2))
        return 0
    print(
        f"{r['command']}\n"
        f"input {r['input_bytes'] / GB:.2f} GB ({r['input_bytes'] / 2**30:.2f} GiB), output "
        f"{r['output_bytes'] / GB:.2f} GB, RAM {r['ram_bytes'] / 2**30:.2f} GiB\n"
        f"wall {r['wall_s']:.0f} s, peak RSS {r['peak_rss_bytes'] / GB:.2f} GB (wait4 ru_maxrss)\n"
        "largest sampled RSS in each tenth of the run (GB): "
        + " ".join("-" if x is None else f"{x / GB:.2f}" for x in r["rss_by_tenth_bytes"])
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
