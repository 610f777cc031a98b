"""python -m mlx_skipless.corpus: a Python corpus with whole packages held out.

The standard library plus a fixed list of permissively licensed, pure-Python
packages from PyPI, each pinned, fetched as a wheel (a zip of the package's own
source, no build step) with pip, and unpacked to a directory outside the
repository:

    DIR/train/NAME-VERSION/...     the training corpus (and the tokenizer's)
    DIR/heldout/NAME-VERSION/...   whole packages kept out, for evaluation
    DIR/manifest.json              package, version, licence, files, bytes, sha256

`python -m mlx_skipless.train --data DIR` trains on DIR/train and
`python -m mlx_skipless.evaluate --data DIR` scores DIR/heldout: held-out text is
chosen by package, so no file of a held-out package, and no copy of one vendored
elsewhere (dropped by content hash), reaches training or the tokenizer.

    python -m mlx_skipless.corpus                       # ~/.cache/mlx-skipless/python-corpus
                                                        # (or $MLX_SKIPLESS_CACHE/python-corpus)
    python -m mlx_skipless.corpus --out DIR --wheels W  # W: where wheels are cached (offline if present)
"""

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import sysconfig
import zipfile
from email import message_from_bytes
from email.message import Message
from pathlib import Path, PurePosixPath
from typing import Dict, Optional, Sequence, Tuple

from . import cli
from .manifest import written_by_us
from .output_dir import OutputDir

MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")
CACHE_ENV = "MLX_SKIPLESS_CACHE"


def cache_home() -> Path:
    """Where mlx-skipless keeps what it can rebuild (the corpus, its wheels, token streams):
    $MLX_SKIPLESS_CACHE, else $XDG_CACHE_HOME/mlx-skipless, else ~/.cache/mlx-skipless."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mlx-skipless"


DEFAULT_OUT = cache_home() / "python-corpus"
# Well-known pure-Python packages (py3-none-any wheels), pinned so a corpus is the same
# wherever it is built. Each licence is checked against PERMISSIVE when it is read.
PACKAGES = {
    "anyio": "4.16.0",
    "attrs": "26.1.0",
    "boltons": "26.2.0",
    "click": "8.5.1",
    "flask": "3.1.3",
    "fsspec": "2026.9.0",
    "httpcore": "1.0.9",
    "httpx": "0.28.1",
    "idna": "3.20",
    "iniconfig": "2.3.1",
    "itsdangerous": "2.2.0",
    "jinja2": "3.1.6",
    "jsonschema": "4.26.0",
    "marshmallow": "4.4.0",
    "networkx": "3.6.1",
    "packaging": "26.4",
    "platformdirs": "4.14.8",
    "pluggy": "1.7.0",
    "pygments": "2.21.0",
    "pyparsing": "3.3.3",
    "pytest": "9.2.0",
    "python-dateutil": "4.0.0",
    "requests": "2.34.2",
    "rich": "15.0.0",
    "six": "1.17.0",
    "starlette": "1.10.0",
    "typing-extensions": "4.16.0",
    "urllib3": "2.8.0",
    "werkzeug": "3.1.9",
    # held out (HELD_OUT): never in training or the tokenizer
    "bottle": "0.13.4",
    "h11": "0.16.0",
    "more-itertools": "11.2.1",
    "toolz": "1.2.0",
}
HELD_OUT = ("bottle", "h11", "more-itertools", "toolz")  # a web framework, a protocol, two toolkits
PERMISSIVE = ("MIT", "BSD", "Apache", "PSF", "Python Software Foundation", "ISC")


def normalize(name: str) -> str:
    """PEP 503 names: wheels spell `more-itertools` as more_itertools."""
    return name.lower().replace("_", "-").replace(".", "-")


def wheel_name(path: Path) -> Tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return normalize(name), version


def licence(metadata: Message) -> str:
    """The licence a wheel declares: its SPDX expression, else its License field when it
    is a name rather than the whole text, else its licence classifiers."""
    if metadata.get("License-Expression"):
        return metadata["License-Expression"].strip()
    field = (metadata.get("License") or "").strip()
    if field and "\n" not in field and len(field) < 60:
        return field
    classifiers = [
        c.split("::")[-1].strip() for c in metadata.get_all("Classifier") or [] if c.startswith("License ::")
    ]
    return " / ".join(classifiers) or field.split("\n")[0]


def is_permissive(text: str) -> bool:
    return any(word.lower() in text.lower() for word in PERMISSIVE)


def read_wheel(path: Path) -> Tuple[dict, Dict[str, bytes]]:
    """(metadata summary, {relative path: bytes} of its Python sources)."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        meta_name = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
        if meta_name is None:
            raise ValueError(f"{path.name}: no .dist-info/METADATA; not a wheel")
        meta = message_from_bytes(z.read(meta_name))
        # Only the package's own modules: not its metadata, nor the scripts copy under .data/.
        sources = {
            n: z.read(n)
            for n in names
            if n.endswith(".py") and not PurePosixPath(n).parts[0].endswith((".dist-info", ".data"))
        }
    return {"package": normalize(meta["Name"]), "version": meta["Version"], "licence": licence(meta)}, sources


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(packages: Dict[str, str], wheels: Path, log=print) -> None:
    """Fetch the wheels not already in `wheels`, with pip (pure-Python wheels only)."""
    wheels.mkdir(parents=True, exist_ok=True)
    have = {wheel_name(w) for w in wheels.glob("*.whl")}
    missing = [f"{n}=={v}" for n, v in packages.items() if (normalize(n), v) not in have]
    if missing:
        log(f"[INFO] pip download: {' '.join(missing)}")
        code = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--platform",
                "any",
                "--python-version",
                "%d.%d" % sys.version_info[:2],
                "--quiet",
                "-d",
                str(wheels),
                *missing,
            ]
        ).returncode
        if code:
            raise ValueError(f"pip download failed (exit status {code})")


def find_wheel(wheels: Path, name: str, version: str) -> Path:
    for w in sorted(wheels.glob("*.whl")):
        if wheel_name(w) == (normalize(name), version):
            return w
    raise FileNotFoundError(f"no wheel of {name} {version} in {wheels}")


def stdlib_sources(root: Path) -> Dict[str, bytes]:
    return {
        str(f.relative_to(root)): f.read_bytes()
        for f in sorted(root.rglob("*.py"))
        if "site-packages" not in f.relative_to(root).parts
    }


def build(
    out: Path,
    wheels: Path,
    packages: Dict[str, str] = None,
    held_out: Sequence[str] = HELD_OUT,
    stdlib: Optional[Path] = None,
    log=print,
    force: bool = False,
) -> dict:
    """Unpack the pinned wheels in `wheels` (and `stdlib`'s sources, if given) into
    out/train and out/heldout; write and return the manifest. `out` is claimed as every
    output is (output_dir.OutputDir): whole or absent, and with `force` it replaces only
    a corpus this tool built."""
    packages = PACKAGES if packages is None else packages
    held = {normalize(n) for n in held_out}
    unknown = held - {normalize(n) for n in packages}
    if unknown:
        raise ValueError(f"held-out packages not in the package list: {', '.join(sorted(unknown))}")
    entries, trees = [], []  # trees: (entry, {path: bytes})
    for name, version in packages.items():
        path = find_wheel(wheels, name, version)
        meta, sources = read_wheel(path)
        if not is_permissive(meta["licence"]):
            raise ValueError(f"{name} {version}: licence {meta['licence']!r} is not one of {', '.join(PERMISSIVE)}")
        meta.update(split="heldout" if meta["package"] in held else "train", archive=path.name, sha256=sha256(path))
        trees.append((meta, sources))
    if stdlib is not None:
        version = platform.python_version()
        trees.append(
            (
                {
                    "package": "python-stdlib",
                    "version": version,
                    "licence": "PSF-2.0",
                    "split": "train",
                    "archive": str(stdlib),
                    "sha256": None,
                },
                stdlib_sources(stdlib),
            )
        )
    held_hashes = {
        hashlib.sha256(b).digest()
        for meta, src in trees
        if meta["split"] == "heldout"
        for b in src.values()
        if b.strip()
    }  # empty __init__.py files are everywhere
    with OutputDir(out, force, inputs=[wheels] + ([stdlib] if stdlib else []), log=log) as claim, claim.stage() as tmp:
        _unpack(tmp, trees, held_hashes, entries, log)
        manifest = {
            "format": "mlx-skipless python corpus 1",
            "python": platform.python_version(),
            "held_out": sorted(held),
            "splits": {
                s: {
                    "files": sum(e["files"] for e in entries if e["split"] == s),
                    "bytes": sum(e["bytes"] for e in entries if e["split"] == s),
                }
                for s in SPLITS
            },
            "packages": entries,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _unpack(tmp: Path, trees, held_hashes, entries: list, log):
    for meta, sources in trees:
        target = tmp / meta["split"] / f"{meta['package']}-{meta['version']}"
        kept = {
            p: b
            for p, b in sources.items()
            if meta["split"] == "heldout" or hashlib.sha256(b).digest() not in held_hashes
        }
        for rel, body in kept.items():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            (target / rel).write_bytes(body)
        meta.update(
            files=len(kept), bytes=sum(map(len, kept.values())), dropped_as_held_out_copies=len(sources) - len(kept)
        )
        entries.append(meta)
        log(
            f"[INFO] {meta['split']:>7}: {meta['package']} {meta['version']} ({meta['licence']}), "
            f"{meta['files']} files, {meta['bytes']:,} bytes"
        )


def split_of(path: Path, split: str) -> Path:
    """A built corpus's `split` folder when `path` is a corpus directory, else `path`."""
    return path / split if (path / MANIFEST).is_file() and (path / split).is_dir() else path


def build_parser():
    p = argparse.ArgumentParser(
        prog="mlx-skipless corpus",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"corpus directory (default: {DEFAULT_OUT})")
    p.add_argument("--wheels", help="wheel cache (default: OUT/../wheels); missing wheels are fetched with pip")
    p.add_argument("--no-stdlib", action="store_true", help="PyPI packages only")
    p.add_argument("--offline", action="store_true", help="use the wheels in --wheels; never run pip")
    p.add_argument("--force", action="store_true", help="rebuild OUT if it holds a corpus this tool built")
    return p


@cli.command(build_parser)
def main(o):
    out = Path(o.out).expanduser().resolve()
    wheels = Path(o.wheels).expanduser() if o.wheels else out.parent / "wheels"
    if (out / MANIFEST).is_file() and not o.force and written_by_us(out):
        print(f"[INFO] {out} already holds a corpus; --force rebuilds it")
        return 0
    OutputDir(out, o.force).check()  # before any download
    if not o.offline:
        download(PACKAGES, wheels)
    m = build(out, wheels, stdlib=None if o.no_stdlib else Path(sysconfig.get_paths()["stdlib"]), force=o.force)
    s = m["splits"]
    print(
        f"[INFO] wrote {out}: train {s['train']['files']} files, {s['train']['bytes']:,} bytes; "
        f"held out ({', '.join(m['held_out'])}) {s['heldout']['files']} files, {s['heldout']['bytes']:,} bytes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
