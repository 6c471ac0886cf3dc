"""The package's import graph, by layer: cycles between modules, and imports that run back up the house.

    python scripts/import_graph.py          # prints the layers, the upward imports and any cycle
    python scripts/import_graph.py --check  # exits 1 on a cycle or more upward imports than MAX_UPWARD

Every import of ``lit_dash`` counts, module level or inside a function (a deferred import is still a
dependency). A module's layer is the first of ``LAYERS`` its dotted name starts with; an import is
"upward" when it reaches a higher layer than the importer's. Only the standard library: CI needs nothing.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lit_dash"
# bottom to top: a module may import its own layer and the ones below it
LAYERS = [
    ("base", ["errors", "hardware", "console", "logs", "models", "checkpointing", "lora", "export"]),
    ("maths", ["kl", "losses", "advantages", "world_metrics"]),
    ("engines", ["engines"]),
    ("records", ["data.records", "data.formatting", "data.batches", "data.packing"]),
    ("rewards", ["rewards"]),
    ("evaluation", ["evaluation"]),
    ("data", ["data", "contract", "step_metrics"]),
    ("training", ["training"]),
    ("module", ["module", "sft", "eval_hooks"]),
    ("callbacks", ["callbacks"]),
    ("top", ["cli", "examples"]),
]
MAX_UPWARD = 2  # the imports that run back up, each named in docs/how-it-works.md


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """The lit_dash modules ``path`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def layer_of(name: str) -> int:
    short = name.removeprefix(PACKAGE + ".")
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(short == p or short.startswith(p + ".") for p in prefixes):
            return index
    return len(LAYERS)  # the package root: above everything


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt] if nxt in stack else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*stack, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def main(check: bool) -> int:
    files = {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}
    graph = {
        name: {m for m in imports_of(path, name) if m in files and m != name} for name, path in files.items()
    }
    # a package's __init__ is imported on the way to any of its modules: not an edge of its own
    graph = {n: {m for m in deps if not (n.startswith(m + ".") and files[m].name == "__init__.py")} for n, deps in graph.items()}  # fmt: skip
    for index, (layer, _) in enumerate(LAYERS):
        members = sorted(n.removeprefix(PACKAGE + ".") for n in files if layer_of(n) == index)
        print(f"{index:2d} {layer:<10} {', '.join(members)}")
    upward = sorted((a, b) for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a))
    print(f"upward imports: {len(upward)}")
    for a, b in upward:
        print(f"  {a} -> {b}")
    cycle = find_cycle(graph)
    print("cycle: " + (" -> ".join(cycle) if cycle else "none"))
    return int(check and (cycle is not None or len(upward) > MAX_UPWARD))


if __name__ == "__main__":
    sys.exit(main("--check" in sys.argv[1:]))
