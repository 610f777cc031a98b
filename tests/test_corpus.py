"""Issue 17: the Python corpus holds whole packages out (by package, and their vendored
copies by content), never lets them into training or the tokenizer, and writes a manifest
with each package's licence and archive hash. Fake wheels, no network."""

import hashlib
import json
import zipfile

import pytest

from mlx_skipless import corpus, data, evaluate

HELD_BODY = b"def held_out_function(x):\n    return x * 2\n"


def fake_wheel(folder, name, version, files, licence="MIT"):
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    dist = f"{name.replace('-', '_')}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(
            f"{dist}/METADATA",
            f"Metadata-Version: 2.4\nName: {name}\nVersion: {version}\n"
            f"License-Expression: {licence}\n\nA fake package.\n",
        )
        z.writestr(f"{name}-{version}.data/scripts/copy.py", "print('scripts are not the package')\n")
        for rel, body in files.items():
            z.writestr(rel, body)
    return path


@pytest.fixture()
def wheels(tmp_path):
    w = tmp_path / "wheels"
    w.mkdir()
    fake_wheel(
        w, "alpha", "1.0", {"alpha/__init__.py": "", "alpha/core.py": "X = 1\n", "alpha/_vendor/held.py": HELD_BODY}
    )  # a vendored copy
    fake_wheel(w, "beta-pkg", "2.1", {"beta_pkg.py": "import alpha\n"}, licence="Apache-2.0 OR BSD-2-Clause")
    fake_wheel(w, "held", "0.3", {"held/__init__.py": "", "held/held.py": HELD_BODY})
    return w


PACKAGES = {"alpha": "1.0", "beta-pkg": "2.1", "held": "0.3"}


def test_held_out_by_package_with_manifest(wheels, tmp_path):
    out = tmp_path / "corpus"
    stdlib = tmp_path / "fakestdlib"
    (stdlib / "site-packages" / "x").mkdir(parents=True)
    (stdlib / "os_like.py").write_text("import sys\n")
    (stdlib / "site-packages" / "x" / "installed.py").write_text("not the standard library\n")
    m = corpus.build(out, wheels, PACKAGES, held_out=["held"], stdlib=stdlib, log=lambda *_: None)

    assert json.loads((out / corpus.MANIFEST).read_text()) == m
    by = {e["package"]: e for e in m["packages"]}
    assert {k: (e["split"], e["version"]) for k, e in by.items()} == {
        "alpha": ("train", "1.0"),
        "beta-pkg": ("train", "2.1"),
        "held": ("heldout", "0.3"),
        "python-stdlib": ("train", m["python"]),
    }
    assert by["beta-pkg"]["licence"] == "Apache-2.0 OR BSD-2-Clause" and by["python-stdlib"]["licence"] == "PSF-2.0"
    for name in PACKAGES:
        wheel = wheels / by[name]["archive"]
        assert by[name]["sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    # The vendored copy of the held-out module is dropped from training; the empty __init__ stays.
    assert by["alpha"]["files"] == 2 and by["alpha"]["dropped_as_held_out_copies"] == 1
    assert by["held"]["files"] == 2 and by["held"]["bytes"] == len(HELD_BODY)
    assert by["python-stdlib"]["files"] == 1  # not site-packages
    assert m["splits"]["heldout"] == {"files": 2, "bytes": len(HELD_BODY)}

    # The trainer (and its tokenizer) read the training split only; evaluation the held-out one.
    train_files = data.find_files([str(out)])
    assert train_files and all("heldout" not in f.parts and ".data" not in str(f) for f in train_files)
    assert not any(f.read_bytes() == HELD_BODY for f in train_files)
    assert {f.name for f in evaluate.read_files([str(out)])} == {"__init__.py", "held.py"}
    assert not list(tmp_path.glob("*.partial"))


def test_refuses_a_licence_that_is_not_permissive_and_unknown_held_out(wheels, tmp_path):
    fake_wheel(wheels, "copyleft", "1.0", {"copyleft.py": "x = 1\n"}, licence="GPL-3.0-only")
    with pytest.raises(ValueError, match="copyleft 1.0: licence 'GPL-3.0-only'"):
        corpus.build(tmp_path / "c", wheels, {**PACKAGES, "copyleft": "1.0"}, ["held"], log=lambda *_: None)
    with pytest.raises(ValueError, match="not in the package list: gamma"):
        corpus.build(tmp_path / "c", wheels, PACKAGES, ["gamma"], log=lambda *_: None)
    with pytest.raises(FileNotFoundError, match="no wheel of alpha 9.9"):
        corpus.build(tmp_path / "c", wheels, {"alpha": "9.9"}, [], log=lambda *_: None)
    assert not (tmp_path / "c").exists()


def test_held_out_packages_are_pinned_packages():
    assert set(corpus.HELD_OUT) <= set(corpus.PACKAGES)
    assert len(corpus.PACKAGES) - len(corpus.HELD_OUT) >= 10


def test_corpus_names_the_default_corpus(wheels, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "DEFAULT_OUT", tmp_path / "default")
    with pytest.raises(FileNotFoundError, match="python -m mlx_skipless.corpus"):
        data.find_files(["corpus"])
    corpus.build(tmp_path / "default", wheels, PACKAGES, held_out=["held"], log=lambda *_: None)
    assert data.find_files(["corpus"]) == data.find_files([str(tmp_path / "default")])
    assert evaluate.read_files(["corpus"]) == evaluate.read_files([str(tmp_path / "default" / "heldout")])
