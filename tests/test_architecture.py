"""The package's import structure: no circle, and every import points down the layers.

Configs and estimators at the bottom; data, model and pretrained parts above; building and
training above them; the run cache and the book's experiments above that; evaluation and analysis
above those; plotting, notebook helpers, the book and the CLI on top. Every import counts,
including the ones inside functions (a lazy import is still a dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tvae_core"

# bottom to top; "name.*" covers a subpackage
LAYERS = (
    ("tvae_core", "cache", "device", "allocator", "protocols", "native", "lm_head", "objectives", "methods",
     "estimators.*"),
    ("config", "profiles"),
    ("data", "model", "exact", "mmm.*", "pretrained.*"),
    ("build", "train"),
    ("runs", "experiments"),
    ("evaluation", "training_split", "budget", "budget_report", "latent_space", "analysis", "pathological"),
    ("plotting.*", "notebook", "book", "cli", "__main__"),
)


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts) or "tvae_core"] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its file."""
    package = name.split(".") if path.name == "__init__.py" and name != "tvae_core" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            target = ".".join(base + ([node.module] if node.module else []))
            submodules = {f"{target}.{a.name}".strip(".") for a in node.names} & set(modules)
            if submodules:      # `from . import estimators`: the submodule, not the package
                found |= submodules
            elif (target or "tvae_core") in modules:
                found.add(target or "tvae_core")
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for imported in names:
                if imported.startswith("tvae_core."):
                    found.add(imported[len("tvae_core."):])
    return {m for m in found if m != name and not m.startswith(name + ".") and m in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> int | None:
    for index, names in enumerate(LAYERS):
        for pattern in names:
            if module == pattern or (pattern.endswith(".*") and (module == pattern[:-2]
                                                                  or module.startswith(pattern[:-1]))):
                return index
    return None


def test_every_module_has_a_layer():
    assert [m for m in _graph() if _layer(m) is None] == []


def test_imports_point_down_the_layers():
    graph = _graph()
    upward = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
              for m, deps in sorted(graph.items()) for d in sorted(deps) if _layer(d) > _layer(m)]
    assert upward == []


def test_no_import_circle():
    graph, state, path = _graph(), {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (circle := visit(dep)):
                return circle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state:
            assert visit(module) is None


def test_the_graph_sees_imports_inside_functions():
    """The checks are not vacuous: runs imports train, build imports the pretrained parts lazily."""
    graph = _graph()
    assert "train" in graph["runs"] and "runs" not in graph["train"]
    assert {"pretrained.corpus", "pretrained.model", "pretrained.vocabulary"} <= graph["build"]
    assert "estimators" in graph["evaluation"]
