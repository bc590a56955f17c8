"""The package's layers (issue 17): imports only downward, no cycle, no file over 400 lines.

Read from the code with ``ast`` (every import, in functions too), not from a picture: a module of a
layer imports modules of its own layer or below, never above. The table here is the README's layer
table and each subpackage's ``May import:`` line; the last test holds the docstrings to it.
"""

import ast
import re
from pathlib import Path

import pytest

PSI = Path(__file__).resolve().parents[1] / "psi"
# bottom to top; a layer may import its own and every layer below it
LAYERS = ("core", "engine", "study", "grid", "paper", "bench", "check")
# modules outside the subpackages: the package's face (psi: re-exports psi.core) and the command
# line of one run (python -m psi.train: psi.engine's)
TOP = {"psi": "core", "psi.train": "engine"}
MAX_LINES = 400


def _name(path: Path) -> str:
    parts = list(path.relative_to(PSI.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PSI) -> dict[str, Path]:
    return {_name(p): p for p in sorted(root.rglob("*.py"))}


def layer(module: str) -> str:
    return TOP[module] if module in TOP else module.split(".")[1]


def imports(path: Path, known: set[str]) -> set[str]:
    """The psi modules ``path`` imports (``from psi.x import y`` names module ``psi.x.y`` when it is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                raise AssertionError(f"{path}: relative import (level {node.level}); write psi's imports in full")
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def graph(root: Path = PSI) -> dict[str, set[str]]:
    mods = modules(root)
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def upward(g: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return sorted(f"{m} ({layer(m)}) imports {d} ({layer(d)})" for m, ds in g.items() for d in ds
                  if rank[layer(d)] > rank[layer(m)])


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == "open":
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    return found


def test_every_module_is_in_a_layer():
    assert {layer(m) for m in modules()} == set(LAYERS)


def test_imports_only_go_down():
    assert upward(graph()) == []


def test_no_import_cycle():
    # a package imports its own modules' names through them, so psi.x's __init__ importing psi.x.y is no cycle
    # of ours; there is none of those: every __init__ but psi's holds only its docstring
    assert cycles(graph()) == []


@pytest.mark.parametrize("path", sorted(PSI.rglob("*.py")), ids=lambda p: str(p.relative_to(PSI.parent)))
def test_no_file_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_each_subpackage_says_what_it_may_import():
    for i, name in enumerate(LAYERS):
        doc = ast.get_docstring(ast.parse((PSI / name / "__init__.py").read_text())) or ""
        said = re.search(r"May import: (.*?)\.?$", doc, re.S | re.M)
        assert said, f"psi/{name}/__init__.py: no 'May import:' line"
        listed = set(re.findall(r"psi\.(\w+)", said.group(1)))
        assert listed == set(LAYERS[:i]) or (name in ("bench", "check") and "everything" in said.group(1)), (name, listed)
