"""The layers hold: every import of the project, at module level or inside a function, points down.

Packages, bottom to top: ``calibration`` (pure numerics) < ``snodevit`` < ``export`` < ``service`` < ``benchmarks``.
Inside ``snodevit`` the subpackages follow the flow data -> model -> samples -> decision (``SNODEVIT_LAYERS``), and
nothing imports the package root (its ``__init__`` is the public façade on top). The import graph of the project's
modules has no cycle, and no project import hides inside a function (an import there to dodge a cycle is a cycle).
``snodevit`` plugs ``export`` in through a registry (``snodevit.inference.backends``) and entry points, so it never
names it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("calibration", "snodevit", "export", "service", "benchmarks")
#: Inside snodevit, bottom to top; a module may import its own layer or lower ones.
SNODEVIT_LAYERS: tuple[tuple[str, ...], ...] = (
    ("config", "device", "machine"),
    ("nn",),
    ("model",),
    ("checkpoint",),
    ("data",),
    ("inference",),
    ("training",),
    ("evaluation",),
    ("scoring",),
    ("cli",),
    ("__init__", "__main__"),
)
#: The four library packages: no project import inside a function there (benchmarks are scripts and import lazily).
LIBRARY = PACKAGES[:4]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name of the file
    target: str  # dotted module (or package) imported, resolved to an absolute name
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def _function_lines(tree: ast.AST) -> set[int]:
    """Line numbers of every statement that sits inside a function body."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for sub in ast.walk(node):
                if sub is not node and hasattr(sub, "lineno"):
                    inside.add(sub.lineno)
    return inside


def imports_of(path: Path) -> Iterator[Import]:
    """Every import statement of ``path`` that names a project package, resolved to absolute module names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    inside = _function_lines(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import sub`` imports the submodule when there is one
            targets = [f"{module}.{a.name}" if _is_module(f"{module}.{a.name}") else module for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target.split(".")[0] in PACKAGES:
                yield Import(me, target, node.lineno, node.lineno in inside)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def package_rank(module: str) -> int:
    return PACKAGES.index(module.split(".")[0])


def snodevit_rank(module: str) -> int:
    """The layer of a snodevit module (its subpackage, or the top-level module's own name)."""
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for rank, layer in enumerate(SNODEVIT_LAYERS):
        if key in layer:
            return rank
    raise AssertionError(f"{module} is in no layer of SNODEVIT_LAYERS; add it where it belongs")


ALL_IMPORTS = [imp for path in project_files() for imp in imports_of(path)]


def test_the_walk_sees_the_project() -> None:
    # the walk itself works: it finds imports across packages, inside functions too
    assert len(ALL_IMPORTS) > 200
    assert any(i.importer.startswith("service") and i.target.startswith("snodevit") for i in ALL_IMPORTS)
    assert any(i.in_function for i in ALL_IMPORTS if i.importer.startswith("benchmarks"))
    assert snodevit_rank("snodevit.nn.sde") < snodevit_rank("snodevit.inference.predictor") < snodevit_rank("snodevit.cli.main")


def test_packages_point_down() -> None:
    upward = [f"{i.importer}:{i.line} imports {i.target}" for i in ALL_IMPORTS
              if package_rank(i.target) > package_rank(i.importer)]
    assert not upward, "imports against the package order " + " < ".join(PACKAGES) + ":\n" + "\n".join(upward)


def test_snodevit_subpackages_point_down() -> None:
    upward = [f"{i.importer}:{i.line} imports {i.target}" for i in ALL_IMPORTS
              if i.importer.startswith("snodevit") and i.target.startswith("snodevit")
              and snodevit_rank(i.target) > snodevit_rank(i.importer)]
    assert not upward, "imports against the snodevit layers:\n" + "\n".join(upward)


def test_no_project_import_inside_a_function() -> None:
    hidden = [f"{i.importer}:{i.line} imports {i.target} inside a function" for i in ALL_IMPORTS
              if i.in_function and i.importer.split(".")[0] in LIBRARY]
    assert not hidden, "\n".join(hidden)


def test_no_import_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for i in ALL_IMPORTS:
        if i.target != i.importer and not i.importer.startswith(i.target + "."):  # a package's own __init__
            graph.setdefault(i.importer, set()).add(i.target)
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycle = stack[stack.index(node):] + [node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, stack + [node])
        done.add(node)

    for start in sorted(graph):
        visit(start, [])


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_and_functions_stay_small(package: str) -> None:
    too_long = []
    for path in sorted((ROOT / package).rglob("*.py")):
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, (f"over {MAX_MODULE_LINES} lines per module or {MAX_FUNCTION_LINES} per function:\n"
                          + "\n".join(too_long))
