"""The package's dependencies run one way: no module imports, directly or through others, a module
that imports it back, and training never imports the benchmark. Drawn from the source (every import
statement, lazy ones inside functions included; ``if TYPE_CHECKING:`` blocks are not imports)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "modeling_dflare"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports (``from . import x`` counts as module ``x`` when it is one)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target for alias in node.names}
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) for name, path in paths.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in sorted(graph[node]):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_a_cycle_is_found():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "modeling_dflare.timing" in graph["modeling_dflare.training.consistency"]  # a lazy import in a function
    assert "modeling_dflare.conversations" in graph["modeling_dflare.data"]
    assert "modeling_dflare.training.args" in graph["modeling_dflare.training.loop"]


def test_no_import_cycles():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(cycle) for cycle in cycles)


def test_training_does_not_import_the_benchmark():
    graph = import_graph()
    bench = {name for name in graph if name.startswith("modeling_dflare.bench")}
    wrong = {name: sorted(graph[name] & bench) for name in graph if name.startswith("modeling_dflare.training") and graph[name] & bench}
    assert not wrong, wrong


def test_leaf_modules_import_nothing_of_the_package():
    graph = import_graph()
    for leaf in ("modeling_dflare.conversations", "modeling_dflare.training.args"):
        assert not graph[leaf], (leaf, graph[leaf])


def test_forward_timing_depends_on_neither_the_benchmark_nor_training():
    """The bench and training both time the target with :mod:`modeling_dflare.timing`: it is below both."""
    graph = import_graph()
    below = {"modeling_dflare.timing"}
    while True:
        grown = below | {module for name in below for module in graph[name]}
        if grown == below:
            break
        below = grown
    assert not {name for name in below if name.startswith(("modeling_dflare.bench", "modeling_dflare.training"))}, below
