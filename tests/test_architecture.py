"""The package's imports run one way (docs/architecture.md): read from the source with `ast`, lazy
imports inside functions included, so a circle that only closes at run time is caught too."""

import ast
from pathlib import Path

import pytest

import gemmakit

PACKAGE = Path(gemmakit.__file__).parent

# Layers, low to high: a module imports its own group or lower layers only. Entry points sit on
# top; the options every subcommand shares sit below the subcommands that use them.
LAYERS = {
    "gemmakit.kernels": 0, "gemmakit.errors": 0, "gemmakit.paths": 0, "gemmakit.config": 1, "gemmakit.tokenizer": 1,
    "gemmakit.chat_template": 2,
    "gemmakit.model": 2,
    "gemmakit.checkpoints": 3, "gemmakit.runtime": 3,
    "gemmakit.chat": 4, "gemmakit.lm": 5,
    "gemmakit.cli.options": 6,
    "gemmakit.serve": 7, "gemmakit.train": 7, "gemmakit.eval": 7, "gemmakit.bench": 7,
    "gemmakit.cli": 8, "gemmakit.train.__main__": 9, "gemmakit.eval.__main__": 9, "gemmakit": 10,
}


def module_name(path: Path) -> str:
    parts = ("gemmakit",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The gemmakit modules `name` imports anywhere in its file: `from . import x` names module x
    where x is one, else the package it is taken from."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(name) for name in MODULES}


def layer(name: str) -> tuple[int, str]:
    """(layer, group) of the longest prefix in LAYERS."""
    key = max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len)
    return LAYERS[key], key


def test_the_graph_is_read():
    assert "gemmakit.model.cache" in GRAPH["gemmakit.model.gemma"]
    assert "gemmakit.runtime.aot" in GRAPH["gemmakit.runtime.steps"]  # a lazy import, inside a method
    assert "gemmakit.kernels" in GRAPH["gemmakit.model.loss"]  # `from .. import kernels`


def test_no_import_circle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_no_submodule_imports_the_package_root():
    offenders = sorted(name for name, deps in GRAPH.items() if name != "gemmakit" and "gemmakit" in deps)
    assert not offenders, f"these import the package root, which imports them: {offenders}"


def test_dependencies_point_one_way():
    """serve / train / eval / bench / cli -> lm -> runtime -> model -> kernels, and lm -> checkpoints -> model."""
    upward = []
    for name, deps in GRAPH.items():
        here, group = layer(name)
        for dep in deps:
            there, dep_group = layer(dep)
            if there > here or (there == here and dep_group != group):
                upward.append(f"{name} -> {dep}")
    assert not upward, "imports against the layers: " + ", ".join(sorted(upward))
