"""Measure the code's layout: module sizes, function lengths, import cycles, private names used
across modules, and project imports hidden inside functions.

    python tools/layout.py            # a report
    python tools/layout.py --json     # the same figures as JSON

tests/unit/test_layout.py holds the project to the limits below, so the layout cannot drift back.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIBRARY = ("kd", "slurm", "bench")  # packages whose modules the limits apply to
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


@dataclass
class Module:
    name: str  # dotted, e.g. kd.train.loop
    path: Path
    lines: int
    functions: list[tuple[str, int, int]] = field(default_factory=list)  # (name, lines, line no.)
    imports: set[str] = field(default_factory=set)  # project modules imported at module level
    lazy_imports: list[tuple[str, int]] = field(default_factory=list)  # (module, line) in functions
    private_uses: list[tuple[str, str, int]] = field(default_factory=list)  # (module, name, line)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_project(name: str) -> bool:
    return name.split(".")[0] in LIBRARY


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def parse_module(path: Path, modules: set[str]) -> Module:
    source = path.read_text()
    tree = ast.parse(source)
    name = module_name(path)
    module = Module(name, path, len(source.splitlines()))
    is_package = path.name == "__init__.py"

    def imported(node: ast.Import | ast.ImportFrom) -> list[tuple[str, list[str]]]:
        if isinstance(node, ast.Import):
            return [(a.name, []) for a in node.names if _is_project(a.name)]
        target = _resolve(node, name, is_package)
        if not _is_project(target):
            return []
        out = []
        for alias in node.names:  # `from kd import train` imports the module kd.train
            sub = f"{target}.{alias.name}"
            out.append((sub, []) if sub in modules else (target, [alias.name]))
        return out

    def visit(node: ast.AST, in_function: bool, in_type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                visit(child, in_function, True)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                for target, names in imported(child):
                    if in_function:
                        module.lazy_imports.append((target, child.lineno))
                    elif not in_type_checking:
                        module.imports.add(target)
                    for n in names:
                        if n.startswith("_") and not n.startswith("__") and target != name:
                            module.private_uses.append((target, n, child.lineno))
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (child.end_lineno or child.lineno) - child.lineno + 1
                module.functions.append((child.name, length, child.lineno))
                visit(child, True, in_type_checking)
            else:
                visit(child, in_function, in_type_checking)

    visit(tree, False, False)
    # `module._private` through an imported project module
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _is_project(a.name):
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, name, is_package)
            for a in node.names:
                if f"{target}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{target}.{a.name}"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            dotted = _dotted(node.value)
            if dotted in aliases and aliases[dotted] != name:
                module.private_uses.append((aliases[dotted], node.attr, node.lineno))
    return module


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def library_files() -> list[Path]:
    return sorted(
        p for pkg in LIBRARY for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts
    )


def load() -> dict[str, Module]:
    files = library_files()
    names = {module_name(p) for p in files}
    return {m.name: m for m in (parse_module(p, names) for p in files)}


def _owner(target: str, modules: dict[str, Module]) -> str | None:
    """The module an import lands on: itself, or the closest package above it."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def import_cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Cycles among imports, those inside functions included: a cycle hidden in a function is
    still a cycle. A module importing the package it belongs to (its __init__) is not counted."""
    graph = {
        name: {
            o
            for t in m.imports | {t for t, _ in m.lazy_imports}
            if (o := _owner(t, modules)) and o != name and not name.startswith(o + ".")
        }
        for name, m in modules.items()
    }
    cycles, index, low, stack, on_stack, counter = [], {}, {}, [], set(), [0]

    def strong(v: str) -> None:  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strong(v)
    return cycles


def report(modules: dict[str, Module]) -> dict:
    functions = sorted(
        (
            (f"{m.name}.{f}", n, f"{m.path.relative_to(REPO)}:{line}")
            for m in modules.values()
            for f, n, line in m.functions
        ),
        key=lambda t: -t[1],
    )
    return {
        "library_lines": sum(m.lines for m in modules.values()),
        "modules": len(modules),
        "largest_modules": sorted(
            ((m.name, m.lines) for m in modules.values()), key=lambda t: -t[1]
        )[:10],
        "longest_functions": functions[:10],
        "modules_over_limit": [
            (m.name, m.lines) for m in modules.values() if m.lines > MAX_MODULE_LINES
        ],
        "functions_over_limit": [f for f in functions if f[1] > MAX_FUNCTION_LINES],
        "import_cycles": import_cycles(modules),
        "private_uses": [
            (m.name, f"{t}.{n}", line) for m in modules.values() for t, n, line in m.private_uses
        ],
        "lazy_project_imports": sum(len(m.lazy_imports) for m in modules.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures = report(load())
    if args.json:
        print(json.dumps(figures, indent=1))
        return 0
    print(f"library: {figures['library_lines']} lines in {figures['modules']} modules")
    print("largest modules:")
    for name, n in figures["largest_modules"]:
        print(f"  {n:5d}  {name}")
    print("longest functions:")
    for name, n, where in figures["longest_functions"]:
        print(f"  {n:5d}  {name}  ({where})")
    print(f"modules over {MAX_MODULE_LINES} lines: {len(figures['modules_over_limit'])}")
    print(f"functions over {MAX_FUNCTION_LINES} lines: {len(figures['functions_over_limit'])}")
    print(f"import cycles: {figures['import_cycles'] or 'none'}")
    print(f"private names used across modules: {len(figures['private_uses'])}")
    for user, name, line in figures["private_uses"]:
        print(f"  {user}:{line} uses {name}")
    print(f"project imports inside functions: {figures['lazy_project_imports']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
