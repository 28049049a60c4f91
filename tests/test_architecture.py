"""The shape of the package, checked from its source: no import circle among unillm's modules, no module
over 800 lines, CONTRIBUTING.md's map names every module, and every module's docstring examples run."""

from __future__ import annotations

import ast
import doctest
import importlib
from pathlib import Path

import pytest

from unillm.errors import BackendNotInstalledError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "unillm"


def module_names() -> dict[str, Path]:
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = module_names()


def imports_of(name: str, path: Path) -> set[str]:
    """The unillm modules ``name`` imports, at the top or inside functions (TYPE_CHECKING blocks aside)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            candidates = [f"{target}.{a.name}" for a in node.names] + [target]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for c in candidates:
            while c and c not in MODULES and "." in c:
                c = c.rsplit(".", 1)[0]
            if c in MODULES and c != name and not name.startswith(c + ".") and c != "unillm":
                found.add(c)
    return found


def test_no_import_circle_among_unillm_modules():
    graph = {name: imports_of(name, path) for name, path in MODULES.items()}
    circles = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in stack:
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in done:
                visit(nxt, stack + [nxt], done)
        done.add(node)

    done: set[str] = set()
    for name in graph:
        if name not in done:
            visit(name, [name], done)
    assert not circles, circles


def test_no_module_over_800_lines():
    big = {name: n for name, p in MODULES.items() if (n := p.read_text(encoding="utf-8").count("\n")) > 800}
    assert not big, big


def test_contributing_maps_every_module():
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    missing = [p.relative_to(SRC).as_posix() for p in MODULES.values() if f"`{p.relative_to(SRC).as_posix()}`" not in text]
    assert not missing, f"CONTRIBUTING.md's Architecture does not name {missing}"


#: Libraries that take seconds to import: a module that imports them at the top has its examples run from
#: its source (they need none of its names) instead of being imported, so that this tier stays fast.
SLOW_IMPORTS = {"vllm", "torch", "transformers"}


def slow_to_import(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = [n for stmt in tree.body for n in ([stmt] if not isinstance(stmt, (ast.Try, ast.If)) else ast.walk(stmt))]
    roots = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    roots |= {(n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and not n.level}
    return bool(roots & SLOW_IMPORTS)


def docstrings(path: Path) -> list[tuple[str, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [(getattr(n, "name", "<module>"), d) for n in nodes if (d := ast.get_docstring(n, clean=True))]


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"unillm.__main__"}))
def test_docstring_examples_run(name):
    """Each module's examples (those not marked ``+SKIP``, which need a model or a server) as doctests."""
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    path = MODULES[name]
    if slow_to_import(path):
        parser = doctest.DocTestParser()
        tests = [parser.get_doctest(text, {}, f"{name}.{obj}", str(path), 0) for obj, text in docstrings(path)]
    else:
        try:
            module = importlib.import_module(name)
        except BackendNotInstalledError as exc:
            pytest.skip(f"{name} needs a library this environment lacks: {exc}")
        except ImportError as exc:
            pytest.skip(f"{name} needs {exc.name}, which is not installed")
        tests = doctest.DocTestFinder(exclude_empty=True).find(module, name, module=module)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
