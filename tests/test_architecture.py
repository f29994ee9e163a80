"""The floors of the package (docs/architecture.md): no import cycles, lazy imports included, and
model/ imports nothing above it. Imports under ``if TYPE_CHECKING:`` never run and are left out."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vit_embedding_lens"
ROOT = PACKAGE.name


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of import nodes inside ``if TYPE_CHECKING:`` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(sub) for sub in ast.walk(child))
    return skipped


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package modules an import statement loads (``from pkg import mod`` loads ``pkg.mod``)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            is_package = MODULES[module].name == "__init__.py"
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [target] + [f"{target}.{alias.name}" for alias in node.names]
    return [name for name in names if name in MODULES]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = _type_checking_nodes(tree)
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skipped:
                targets.update(_imported(module, node))
        # a module's own parent packages are always imported first: not an edge of the graph
        graph[module] = {t for t in targets if t != module and not module.startswith(t + ".")}
    return graph


GRAPH = _graph()


def _is_package_face(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def test_the_graph_sees_lazy_imports() -> None:
    """The checks below read imports inside functions too: every one is an edge of the graph."""
    lazy = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = _type_checking_nodes(tree)
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skipped:
                        targets = _imported(module, node)
                        lazy += [(module, t) for t in targets if not module.startswith(t + ".")]
    assert lazy, "no lazy import of a package module found: the graph is not tested on any"
    missing = [(m, t) for m, t in lazy if t != m and t not in GRAPH[m]]
    assert not missing, f"lazy imports missing from the graph: {missing[:5]}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith(f"{ROOT}.model")))
def test_model_floor_imports_nothing_above_it(module: str) -> None:
    allowed = (f"{ROOT}.model", f"{ROOT}.errors")
    above = sorted(
        target
        for target in GRAPH[module]
        if target != ROOT and not any(target == a or target.startswith(a + ".") for a in allowed)
    )
    assert not above, f"{module} imports {above}: model/ is the ground floor"


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components over modules (package faces that only re-export
    are not nodes: importing ``pkg`` for one name is not a dependency on all of ``pkg``)."""
    nodes = {m: {t for t in ts if not _is_package_face(t)} for m, ts in GRAPH.items()}
    nodes = {m: ts for m, ts in nodes.items() if not _is_package_face(m)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in nodes.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


#: floors 4 and 5 (docs/architecture.md): the analyses compute, viz draws, and neither reaches
#: the runner, the report or the command line above them; the analyses draw nothing
_ABOVE = {
    "circuits": ("viz", "runner", "report", "cli"),
    "lens": ("viz", "runner", "report", "cli"),
    "interventions": ("viz", "runner", "report", "cli"),
    "viz": ("runner", "report", "cli"),
}


@pytest.mark.parametrize("package", sorted(_ABOVE))
def test_analysis_and_viz_floors_import_nothing_above_them(package: str) -> None:
    forbidden = tuple(f"{ROOT}.{name}" for name in _ABOVE[package])
    found = sorted(
        (module, target)
        for module in MODULES
        if module == f"{ROOT}.{package}" or module.startswith(f"{ROOT}.{package}.")
        for target in GRAPH[module]
        if any(target == f or target.startswith(f + ".") for f in forbidden)
    )
    assert not found, f"{package}/ imports floors above it: {found[:5]}"


@pytest.mark.parametrize("name", ["class_rank", "logit_lens", "resolve_blocks", "class_targets"])
def test_shared_helpers_are_defined_once(name: str) -> None:
    homes = [
        module
        for module, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name
    ]
    assert len(homes) == 1, f"{name} is defined in {homes}"
