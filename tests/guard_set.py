"""The conversion guard set: digests of every file the converter writes, for a redesign to keep.

A refactor that should not change behaviour must leave every conversion output bit for bit as
it was. This converts tiny checkpoints of every family, in every dtype, quantized, and with
each `--remove` choice, and records the SHA-256 of every file written (the report's timings
excepted). Digests depend on the platform's BLAS and MLX version, so compare on one machine:

    python tests/guard_set.py record before.json     # on the old code
    python tests/guard_set.py check before.json      # on the new code: lists what changed
"""

import hashlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import hf_checkpoints  # noqa: E402
import mlx.core as mx  # noqa: E402

from mlx_skipless.convert import convert  # noqa: E402

# (name, family, case overrides, convert options)
CASES = [
    ("llama-f32-auto", "llama", {}, dict(dtype="float32")),
    ("llama-bf16-auto", "llama", {}, dict(dtype="bfloat16")),
    ("llama-f16-q", "llama", {}, dict(dtype="float16", remove="q")),
    ("llama-q4-g32", "llama", {}, dict(quantize=True, q_group_size=32)),
    ("llama-q8-g32", "llama", {}, dict(quantize=True, q_bits=8, q_group_size=32, dtype="bfloat16")),
    ("mistral-mha-v", "mistral", {}, dict(remove="v", dtype="float32")),
    ("mistral-mha-k", "mistral", {}, dict(remove="k", dtype="bfloat16")),
    ("mixtral-moe", "mixtral", {}, dict(dtype="float32")),
    ("neox-parallel", "gpt_neox", {}, dict(dtype="float32")),
    ("neox-serial-bf16", "gpt_neox_serial", {}, dict(dtype="bfloat16")),
    ("gpt2-tied", "gpt2", {}, dict(dtype="float32")),
    ("skipless-mqa-parallel", "skipless", {}, dict(dtype="float32")),
    ("skipless-shaped", "skipless_shaped", {}, dict(dtype="bfloat16")),
]

UNSTABLE = {"report.json"}  # holds timings


def digests(root: Path) -> dict:
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        if path.name in UNSTABLE or path.name.startswith("."):
            continue
        data = path.read_bytes()
        if path.name == "README.md":  # the card names the temporary source path
            data = data.replace(str(root.parent).encode(), b"TMP")
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def run_cases() -> dict:
    mx.random.seed(0)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, family, overrides, options in CASES:
            args, flat = hf_checkpoints.case(family, seed=1, **overrides)
            src = hf_checkpoints.write(tmp / "src" / name, family, args, flat)
            out = tmp / "out" / name
            convert(str(src), mlx_path=str(out), **options)
            result[name] = digests(out)
            print(f"{name}: {len(result[name])} files", flush=True)
    return result


def main(argv):
    if len(argv) != 2 or argv[0] not in ("record", "check"):
        sys.exit(__doc__)
    result = run_cases()
    path = Path(argv[1])
    if argv[0] == "record":
        path.write_text(json.dumps(result, indent=1, sort_keys=True))
        return
    before = json.loads(path.read_text())
    changed = [
        f"{case}/{f}"
        for case in sorted(set(before) | set(result))
        for f in sorted(set(before.get(case, {})) | set(result.get(case, {})))
        if before.get(case, {}).get(f) != result.get(case, {}).get(f)
    ]
    print("\n".join(changed) or "every conversion output bit for bit as recorded")
    sys.exit(1 if changed else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
