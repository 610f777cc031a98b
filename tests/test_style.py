"""The code is formatted and linted by ruff (settings in pyproject.toml), so a diff shows only what changed."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("check", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_is_clean(check):
    out = subprocess.run([sys.executable, "-m", "ruff", *check, "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_package_imports_without_cycles():
    """Every import between the package's modules, function-level ones included: a cycle would
    make the order of imports matter and the layering in docs/architecture.md untrue."""
    import ast

    package = ROOT / "mlx_skipless"
    files = [*package.glob("*.py"), *package.glob("models/*.py")]
    name = lambda f: ".".join(f.relative_to(ROOT).with_suffix("").parts)  # noqa: E731
    graph = {name(f): set() for f in files}
    for f in files:
        here = name(f).rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here.rsplit(".", node.level - 1)[0] if node.level else ""
                module = ".".join(p for p in (base, node.module) if p)
                targets = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
                graph[name(f)] |= {t for t in targets if t in graph and t != name(f)}
    state, cycles = {}, []

    def visit(u, path):
        state[u] = "open"
        for v in graph[u]:
            if state.get(v) == "open":
                cycles.append(path[path.index(v) :] + [v])
            elif v not in state:
                visit(v, path + [v])
        state[u] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert len(graph) > 40 and not cycles, cycles
