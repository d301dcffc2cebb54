"""The layout's rules: imports flow one way, from the base layer up to the commands; no import
cycle between modules; the command line builds every parser without importing torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

LAYERS = (
    ("speechllm", "speechllm.errors", "speechllm.config", "speechllm.labels", "speechllm.records", "speechllm.io",
     "speechllm.distributed"),
    ("speechllm.hub",),
    ("annotate", "speechllm.data"),
    ("speechllm.model",),
    ("speechllm.targets",),
    ("speechllm.eval",),
    ("speechllm.training",),
    ("speechllm.demo", "speechllm.serve"),
    ("speechllm.cli",),
)
"""Lowest first. A module may import from its own layer and those below, never from above. The
README's Layout section lists the same order."""
PACKAGES = ("speechllm", "annotate")


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix naming `module`; entry points (`__main__`) are above all."""
    if module.endswith(".__main__"):
        return len(LAYERS)
    best, length = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            inside = module.startswith(name + ".") and name != "speechllm"  # the root package holds only __init__
            if (module == name or inside) and len(name) > length:
                best, length = i, len(name)
    if best is None:
        raise AssertionError(f"module {module} is in no layer: add it to LAYERS (and the README's Layout)")
    return best


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `module` imports anywhere in its file (function-level imports included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:  # "pkg.module.Class" -> "pkg.module"
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                  for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    # a package's __init__ re-exporting its own modules is not a dependency between layers or a cycle
    return {m: {t for t in imports_of(m, p, known) if not (p.name == "__init__.py" and t.startswith(m + "."))}
            for m, p in files.items()}


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer_of(module)


def test_imports_flow_downward_only(graph):
    assert upward_imports(graph) == []


def test_annotate_depends_only_on_the_base_layer(graph):
    used = {t for m, targets in graph.items() if m.startswith("annotate") for t in targets
            if not t.startswith("annotate")}
    assert all(layer_of(t) <= layer_of("speechllm.hub") for t in used), used


def test_no_import_cycle_between_modules(graph):
    assert cycles(graph) == []


def test_the_checks_catch_what_they_forbid():
    assert upward_imports({"speechllm.model.prompt": {"speechllm.eval.suite"}}) == [
        "speechllm.model.prompt (layer 3) imports speechllm.eval.suite (layer 5)"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("speechllm.somewhere_new")


def test_help_imports_no_torch():
    code = ("import sys, contextlib, io\n"
            "from speechllm.cli import COMMANDS, main\n"
            "for argv in [[]] + [[c] for c in COMMANDS]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n"
            "            main(argv + ['--help'])\n"
            "        except SystemExit:\n"
            "            pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:500]
