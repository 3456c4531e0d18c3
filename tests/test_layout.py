"""The package's layout (issue 26): every module imports, nothing imports in a circle, no
module is much over 600 lines, the package stands without the checkout's scripts, and
TensorFlow loads only through symbol_trainer.backend, never for --help."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "symbol_trainer"
MAX_LINES = 620  # "about 600"
# What lies outside the package at the top of a checkout; the package never imports it.
CHECKOUT_MODULES = {"common", "build_binary_classifier", "build_multi_hot_model", "predict"}


def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `path` imports anywhere (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from symbol_trainer import heads` names a module; `from x.y import name` a name.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules) | CHECKOUT_MODULES
    return {name: imported_modules(path, known) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_module_imports_in_a_circle():
    graph = import_graph()
    assert len(graph) > 30 and "symbol_trainer.pipeline" in graph
    assert graph["symbol_trainer.pipeline"] >= {"symbol_trainer.training", "symbol_trainer.model_dir"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_package_never_imports_the_checkouts_scripts():
    """`pip install .` installs the package alone: it must not need common.py or a script."""
    for module, imports in import_graph().items():
        assert not imports & CHECKOUT_MODULES, (module, imports & CHECKOUT_MODULES)


@pytest.mark.parametrize("module", sorted(package_modules()))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_no_module_is_much_over_600_lines():
    scripts = [path for path in ROOT.glob("*.py")] + list(PACKAGE.rglob("*.py"))
    sizes = {str(path.relative_to(ROOT)): len(path.read_text(encoding="utf-8").splitlines())
             for path in scripts}
    assert "symbol_trainer/pipeline.py" in sizes
    assert {name: lines for name, lines in sizes.items() if lines > MAX_LINES} == {}


def test_tensorflow_and_keras_load_through_backend_only():
    """symbol_trainer.backend imports TensorFlow with its start-up notices held back; a
    module that imported Keras or TensorFlow itself before it would print them."""
    for module, path in package_modules().items():
        if module == "symbol_trainer.backend":
            continue
        backend_seen = False
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom) and node.module in ("symbol_trainer.backend",):
                backend_seen = True
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            heavy = [name for name in names if name.split(".")[0] in ("tensorflow", "keras")]
            assert not heavy or backend_seen, f"{path.name}:{node.lineno} imports {heavy[0]}"


def test_the_package_cli_and_help_import_no_tensorflow():
    probe = ("import sys; import symbol_trainer, symbol_trainer.cli, symbol_trainer.settings, "
             "symbol_trainer.programs.build_multi_hot_model as m; "
             "m.build_parser().format_help(); "
             "print(sorted(n for n in ('tensorflow', 'keras', 'numpy', 'pandas') if n in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr
