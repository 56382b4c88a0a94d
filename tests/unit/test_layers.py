"""The package's architecture, read from its source (see ARCHITECTURE.rst).

Three rules: no import cycle, no module over 500 lines, and layers that import
only downward. Modules are parsed with ``ast``, never imported, so this needs
neither Redis nor Django settings. Every import counts, also one inside a
function (a lazy import is a dependency all the same), except those under
``if TYPE_CHECKING:``. The checker takes a directory and a package name, so
the last tests can show it failing on a small package of their own.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest


class Layer(NamedTuple):
    may_import: set[str]  # layers of the package
    must_not_import: set[str]  # third-party top-level packages


DJANGO = {"django", "django_redis", "django_prometheus", "asgiref"}

# The rules, all of them. A module's layer is the first folder under the
# package (django_apee.core.* is "core"); every other module is "surface".
LAYERS = {
    # The decisions (freshness maths, the bytes in Redis, keys, the breaker,
    # single-flight): pure, so they are tested without a server or settings.
    "core": Layer({"core"}, DJANGO | {"redis", "prometheus_client"}),
    # Redis I/O (Lua scripts, leases, wake-ups, fleet counters) without Django,
    # so it runs against a bare redis-server.
    "store": Layer({"core", "store"}, DJANGO | {"prometheus_client"}),
    # Stampede-safe computation and herd mode: core's decisions composed with
    # the store's I/O. It never sees Django: the surface hands in what it needs.
    "engine": Layer({"core", "store", "engine"}, DJANGO),
    # Metrics, logs and the figures apee_stats shows. It watches the store and
    # knows nothing of the engine; Django's pieces are handed in by the surface.
    "observe": Layer({"core", "store", "observe"}, DJANGO),
    # What Django sees (backend, client, OPTIONS, checks, decorators, template
    # tags, management command): it wires the layers together.
    "surface": Layer({"core", "store", "engine", "observe", "surface"}, set()),
}
MAX_LINES = 500


class Import(NamedTuple):
    module: str  # the importing module, e.g. "django_apee.engine.herd"
    target: str  # a module of the package, or a third-party top-level name
    line: int
    internal: bool

    def __str__(self) -> str:
        return f"{self.module} -> {self.target} (line {self.line})"


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file; a package's ``__init__`` is the package."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``typing.TYPE_CHECKING``."""
    if isinstance(test, ast.Attribute) and isinstance(test.value, ast.Name):
        return test.value.id == "typing" and test.attr == "TYPE_CHECKING"
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def _counted_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of the tree, except the bodies of ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def imports(root: Path, package: str) -> list[Import]:
    """Every counted import of every module of the package, resolved.

    An internal name resolves to the longest module it starts with, so
    ``from pkg import sub`` imports ``pkg.sub`` when that is a module and
    ``pkg`` (its ``__init__``) when ``sub`` is a name defined there.
    """
    known = modules(root, package)
    found = []
    for module, path in known.items():
        here = (
            module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        )
        for node in _counted_nodes(ast.parse(path.read_bytes(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = [node.module] if node.module else []
                if node.level:  # relative: this package, then up level - 1
                    base = [*here[: len(here) - node.level + 1], *base]
                names = [".".join([*base, alias.name]) for alias in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] != package:
                    found.append(Import(module, name.split(".")[0], node.lineno, False))
                    continue
                while name not in known and "." in name:
                    name = name.rpartition(".")[0]
                if name != module:
                    found.append(Import(module, name, node.lineno, True))
    return sorted(set(found), key=lambda imp: (imp.module, imp.line, imp.target))


def layer_of(module: str) -> str:
    parts = module.split(".")  # [package, layer folder or module, ...]
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "surface"


def import_cycles(found: list[Import]) -> list[list[str]]:
    """Strongly connected components of two modules or more (Tarjan), sorted."""
    graph: dict[str, set[str]] = {}
    for imp in found:
        graph.setdefault(imp.module, set())
        if imp.internal:
            graph[imp.module].add(imp.target)
            graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = [stack.pop()]
            while component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def oversized(root: Path, package: str) -> dict[str, int]:
    """Modules over MAX_LINES physical lines -> their line count."""
    counts = {
        m: len(p.read_bytes().splitlines()) for m, p in modules(root, package).items()
    }
    return {m: n for m, n in counts.items() if n > MAX_LINES}


def layer_violations(found: list[Import]) -> dict[str, list[str]]:
    """Layer -> the imports its modules must not make."""
    bad: dict[str, list[str]] = {layer: [] for layer in LAYERS}
    for imp in found:
        layer = layer_of(imp.module)
        rule = LAYERS[layer]
        if imp.internal:
            allowed = layer_of(imp.target) in rule.may_import
        else:
            allowed = imp.target not in rule.must_not_import
        if not allowed:
            bad[layer].append(str(imp))
    return bad


# -- the package itself -------------------------------------------------------

PACKAGE = "django_apee"
ROOT = next(p for p in Path(__file__).resolve().parents if (p / PACKAGE).is_dir())


@pytest.fixture(scope="module")
def package_imports() -> list[Import]:
    return imports(ROOT, PACKAGE)


def test_no_import_cycle(package_imports: list[Import]) -> None:
    cycles = import_cycles(package_imports)
    report = ["import cycles (under each, the imports inside it):"]
    for cycle in cycles:
        report.append("  " + " <-> ".join(cycle))
        report += [
            f"      {imp}"
            for imp in package_imports
            if imp.module in cycle and imp.target in cycle
        ]
    assert not cycles, "\n".join(report)


def test_no_module_over_500_lines() -> None:
    big = oversized(ROOT, PACKAGE)
    assert not big, f"modules over {MAX_LINES} lines: " + ", ".join(
        f"{m} ({n})" for m, n in big.items()
    )


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_only_downward(package_imports: list[Import], layer: str) -> None:
    bad = layer_violations(package_imports)[layer]
    rule = LAYERS[layer]
    assert not bad, (
        f"{layer} may import only {', '.join(sorted(rule.may_import))}"
        f" and none of {', '.join(sorted(rule.must_not_import))}:\n  "
        + "\n  ".join(bad)
    )


# -- the checker can fail ------------------------------------------------------

TOY = {
    "__init__.py": "",
    # a <-> b, b's half lazy and relative
    "a.py": "import django\n\nfrom toy.b import B\n",
    "b.py": "B = 1\n\n\ndef f():\n    from . import a\n\n    return a\n",
    # core importing redis; the TYPE_CHECKING imports would break rules if counted
    "core/__init__.py": "",
    "core/policy.py": (
        "import typing\nfrom typing import TYPE_CHECKING\n\nimport redis\n\n"
        "if TYPE_CHECKING:\n    import django\n\n    from toy import a\n"
        "if typing.TYPE_CHECKING:\n    from toy.store.lease import L\n"
    ),
    # store -> core is downward; the TYPE_CHECKING import would close a cycle
    "store/__init__.py": "",
    "store/lease.py": (
        "from typing import TYPE_CHECKING\n\nfrom ..core import policy\n\n"
        "if TYPE_CHECKING:\n    from toy.engine.herd import H\nelse:\n    H = None\n"
    ),
    "engine/__init__.py": "",
    "engine/herd.py": "from ..store.lease import L\n",
    "fits.py": "x = 1\n" * MAX_LINES,
    "big.py": "x = 1\n" * (MAX_LINES + 1),
}


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    for name, text in TOY.items():
        (tmp_path / "toy" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "toy" / name).write_text(text)
    return tmp_path


def test_checker_reads_every_counted_import(toy: Path) -> None:
    assert [str(imp) for imp in imports(toy, "toy") if imp.internal] == [
        "toy.a -> toy.b (line 3)",
        "toy.b -> toy.a (line 5)",
        "toy.engine.herd -> toy.store.lease (line 1)",
        "toy.store.lease -> toy.core.policy (line 3)",
    ]


def test_checker_finds_the_cycle_through_a_lazy_import(toy: Path) -> None:
    assert import_cycles(imports(toy, "toy")) == [["toy.a", "toy.b"]]


def test_checker_finds_the_module_over_500_lines(toy: Path) -> None:
    assert oversized(toy, "toy") == {"toy.big": MAX_LINES + 1}


def test_checker_finds_core_importing_redis(toy: Path) -> None:
    assert layer_violations(imports(toy, "toy")) == {
        "core": ["toy.core.policy -> redis (line 4)"],
        "store": [],
        "engine": [],
        "observe": [],
        "surface": [],
    }
