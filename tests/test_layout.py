"""The package's layers, read from the source with ast: imports run compression -> artifact <- runtime, all three
may use the leaf modules and kernels/, only the top (CLI, bench, evaluation, reports) sees everything, and no
module imports itself back through a cycle. Function-level (lazy) imports count like module-level ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"teal_quant": ROOT / "teal_quant", "teal_quant.kernels": ROOT / "kernels"}

LEAF = {"teal_quant.errors", "teal_quant.architecture", "teal_quant.devices", "teal_quant.progress",
        "teal_quant.distributed", "teal_quant.gguf_files"}
# part -> the parts it may import (besides itself, the leaf modules, kernels and the package root's __version__)
ALLOWED = {
    "kernels": set(),
    "leaf": set(),
    "artifact": set(),
    "compression": {"artifact"},
    "runtime": {"artifact"},
    "top": {"artifact", "compression", "runtime"},
}


def module_files() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGE_DIRS.items():
        for file in folder.rglob("*.py"):
            parts = list(file.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = file
    return out


MODULES = module_files()


def part_of(module: str) -> str:
    if module == "teal_quant.kernels" or module.startswith("teal_quant.kernels."):
        return "kernels"
    if module in LEAF:
        return "leaf"
    for part in ("artifact", "compression", "runtime"):
        if module == f"teal_quant.{part}" or module.startswith(f"teal_quant.{part}."):
            return part
    return "top"


def imports_of(module: str) -> set[str]:
    """Every teal_quant module that `module` imports, resolved to the most specific module that exists."""
    file = MODULES[module]
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_the_three_parts_and_the_leaf_exist():
    for name in ("teal_quant.compression", "teal_quant.artifact", "teal_quant.runtime", "teal_quant.architecture",
                 "teal_quant.artifact.format", "teal_quant.compression.sources", "teal_quant.runtime.assemble"):
        assert name in MODULES, name


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_one_way(module):
    if module == "teal_quant":  # the package __init__ exposes the public API of every part
        return
    part = part_of(module)
    for target in GRAPH[module]:
        if target == "teal_quant":  # `from teal_quant import __version__`
            continue
        other = part_of(target)
        if part == "kernels":
            assert other == "kernels", f"{module} (kernels/) imports {target}: kernels/ is the leaf"
            continue
        allowed = {part, "leaf", "kernels"} | ALLOWED[part]
        assert other in allowed, f"{module} ({part}) imports {target} ({other})"


def test_no_import_cycle():
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module):] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(GRAPH[module]):
            if target != "teal_quant":
                visit(target, path + [module])
        done.add(module)

    for module in sorted(MODULES):
        visit(module, [])


def test_walker_sees_lazy_and_relative_imports():
    """The checks above would pass vacuously if the walker found nothing: it must see a function-level import and
    kernels/' relative ones."""
    assert "teal_quant.kernels.reference" in GRAPH["teal_quant.kernels"]
    assert any(part_of(t) == "runtime" for t in GRAPH["teal_quant.cli"] | GRAPH["teal_quant.bench"])
