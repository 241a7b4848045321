"""The shape of the code base: no import cycle in the package, no module reaching into another's
`_private` names, no room of the package over 400 lines, and a training loop that reads at a
glance. `python tests/test_layout.py` prints the figures."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "llama_jax"
MAX_LINES = 400
MAX_TRAIN_LINES = 60


def modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import in a file, function-level ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{node.module}.{a.name}"
                found.append((sub, []) if sub in known else (node.module, [a.name]))
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m, _ in imports(path, known) if m in known and m != name} for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def private_uses() -> list[str]:
    """`file: module._name` for every private name of a package module used outside it (the
    package, the command lines and the benchmarks)."""
    known, out = modules(), []
    files = [*known.values(), ROOT / "train.py", ROOT / "infer.py", *sorted((ROOT / "benchmarks").glob("*.py"))]
    for path in files:
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> package module
        for module, names in imports(path, known):
            for name in names:
                if name.startswith("_"):
                    out.append(f"{path.relative_to(ROOT)}: {module}.{name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
                for a in node.names:
                    if f"{node.module}.{a.name}" in known:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                aliases |= {a.asname: a.name for a in node.names if a.asname and a.name in known}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                if node.attr.startswith("_") and not node.attr.startswith("__"):
                    out.append(f"{path.relative_to(ROOT)}: {aliases[node.value.id]}.{node.attr}")
    return out


def line_counts() -> dict[str, int]:
    return {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in modules().values()}


def train_lines() -> int:
    tree = ast.parse((ROOT / PACKAGE / "training.py").read_text())
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    return train.end_lineno - train.lineno + 1


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_no_module_uses_another_modules_private_names():
    assert private_uses() == []


def test_no_room_is_over_400_lines():
    assert {f: n for f, n in line_counts().items() if n > MAX_LINES} == {}


def test_the_training_loop_reads_at_a_glance():
    assert train_lines() <= MAX_TRAIN_LINES


if __name__ == "__main__":
    counts = line_counts()
    graph = import_graph()
    print(f"modules: {len(counts)}, import edges: {sum(map(len, graph.values()))}")
    print(f"import cycles: {cycles(graph) or 'none'}")
    print(f"private names used across modules: {private_uses() or 'none'}")
    largest = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
    print(f"largest files (limit {MAX_LINES}): " + ", ".join(f"{f} {n}" for f, n in largest))
    print(f"training.train: {train_lines()} lines (limit {MAX_TRAIN_LINES})")
    sys.exit(0)
