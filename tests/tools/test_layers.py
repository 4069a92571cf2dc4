"""The package's layers, read from the source: kernels <- ops <- training <- tools, no import cycles.

Every import is counted, lazy ones inside functions included, so a cycle cannot hide behind a local
import. Module names are the installed ones (kernels/ is repa_fused.kernels).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"repa_fused": ROOT / "repa_fused", "repa_fused.kernels": ROOT / "kernels"}
# What each layer may import from the package, beside itself: only the layers beneath it.
BENEATH = {
    "repa_fused.kernels": (),
    "repa_fused.ops": ("repa_fused.kernels", "repa_fused._C", "repa_fused._version"),
    "repa_fused.training": ("repa_fused.ops", "repa_fused.kernels", "repa_fused._version"),
    "repa_fused.tools": ("repa_fused.training", "repa_fused.ops", "repa_fused.kernels", "repa_fused._version"),
}
# Third-party modules a kernel file may import: the kernels sit beneath everything and need only these.
KERNEL_DEPENDENCIES = ("torch", "triton", "numpy", "os", "functools", "dataclasses", "typing", "__future__",
                       "math")


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(package modules imported by ``name``, top-level names of the other modules it imports)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "repa_fused" or target.startswith("repa_fused."):
                inside.add(target)
            else:
                outside.add(target.split(".")[0])
    return inside, outside


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    found = modules()
    known = set(found) | {"repa_fused._C"}
    edges, external = {}, {}
    for name, path in found.items():
        edges[name], external[name] = imports_of(name, path, known)
        edges[name].discard(name)
    return edges, external


def layer(name: str) -> str:
    for prefix in BENEATH:
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return name  # the package root and _version, _C


def find_cycle(edges: dict[str, set[str]]):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph()[0])
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    """"A imports B" for each import of a layer that is not one beneath it (nor itself)."""
    wrong = []
    for name, targets in edges.items():
        own = layer(name)
        if own not in BENEATH:
            continue
        for target in targets:
            if layer(target) != own and not any(target == p or target.startswith(p + ".") for p in BENEATH[own]):
                wrong.append(f"{name} imports {target}")
    return sorted(wrong)


def test_layers_import_only_downwards():
    wrong = upward_imports(graph()[0])
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_kernels_import_only_torch_and_triton():
    _, external = graph()
    wrong = [f"{name} imports {dep}" for name, deps in external.items() if layer(name) == "repa_fused.kernels"
             for dep in deps if dep not in KERNEL_DEPENDENCIES]
    assert not wrong, "\n".join(wrong)


def test_the_checks_see_a_planted_cycle_and_a_planted_upward_import():
    edges = {"repa_fused.ops.api": {"repa_fused.training.config"}, "repa_fused.training.config": {"repa_fused.ops.api"}}
    assert find_cycle(edges) is not None
    assert upward_imports(edges) == ["repa_fused.ops.api imports repa_fused.training.config"]
    assert upward_imports({"repa_fused.kernels.cosine": {"repa_fused.ops.dispatch"}}) == [
        "repa_fused.kernels.cosine imports repa_fused.ops.dispatch"]
