"""The package's import graph, read from the source (ast): no cycles; argparse only in cli/.

Every import counts, function-local ones included (they run too, only later); imports under
``if TYPE_CHECKING:`` do not run and are skipped. kernels/ and export/ are read as the
fastinsight.kernels / fastinsight.export they ship as; old moved paths count as their new home.
"""

from __future__ import annotations

import ast
from pathlib import Path

from fastinsight._moved import MOVED

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"fastinsight": REPO / "fastinsight", "fastinsight.kernels": REPO / "kernels",
         "fastinsight.export": REPO / "export"}  # fmt: skip


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for prefix, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(root).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            name = ".".join((prefix, *rel))
            if prefix == "fastinsight" and rel[:1] in (("kernels",), ("export",)):
                continue  # not a folder of fastinsight/; shipped from the root
            found[name] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, name: str, is_pkg: bool) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every executed import statement in ``tree``."""
    out: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                parts = parts if is_pkg else parts[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            out.append((base, [a.name for a in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Edges between fastinsight modules, and the stdlib/third-party roots each one imports."""
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    external: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for base, names in _imports(tree, name, path.name == "__init__.py"):
            base = MOVED.get(base, base)
            if not base.startswith("fastinsight"):
                external[name].add(base.split(".")[0])
                continue
            targets = [MOVED.get(f"{base}.{n}", f"{base}.{n}") for n in names]
            subs = [t for t in targets if t in modules]
            if len(subs) < len(targets) or not names:
                subs.append(base)
            missing = [t for t in subs if t not in modules]
            assert not missing or base in modules, f"{name} imports {base}, which does not exist"
            edges[name].update(t for t in subs if t in modules and t != name)
    return edges, external


def _cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[set[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return found


def test_no_import_cycles() -> None:
    edges, _ = import_graph()
    assert "fastinsight.models.insight" in edges and edges["fastinsight.cli.main"]
    cycles = _cycles(edges)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_argparse_only_in_cli() -> None:
    _, external = import_graph()
    users = sorted(m for m, ext in external.items() if "argparse" in ext)
    assert users and all(m.startswith("fastinsight.cli") for m in users), users


def test_nothing_imports_the_cli() -> None:
    """Only the CLI and ``python -m fastinsight`` (``fastinsight/__main__.py``, its entry)."""
    edges, _ = import_graph()
    importers = sorted(
        m
        for m, targets in edges.items()
        if not m.startswith("fastinsight.cli")
        and m != "fastinsight.__main__"
        and any(t == "fastinsight.cli" or t.startswith("fastinsight.cli.") for t in targets)
    )
    assert not importers, importers
