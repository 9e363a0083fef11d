"""The layering ARCHITECTURE.md promises, checked from the code's own imports (function-level
imports included: a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "service", "training")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Project module -> the project modules it imports."""
    modules = {_module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            found.update(target for target in targets if target in modules and target != name)
        graph[name] = found
    return graph


GRAPH = _imports()


def _imports_of(module: str) -> set[str]:
    return GRAPH[module]


def test_there_is_no_import_cycle_between_the_projects_modules():
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in GRAPH[module]:
            # A package's __init__ importing its own modules is how packages re-export; not a cycle.
            if target.startswith(module + "."):
                continue
            if state.get(target) == 1 and not module.startswith(target + "."):
                pytest.fail("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("models")))
def test_models_import_neither_serving_nor_training(module):
    assert not {m for m in _imports_of(module) if m.split(".")[0] in ("service", "training")}


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("service")))
def test_serving_never_imports_training(module):
    assert not {m for m in _imports_of(module) if m.startswith("training")}


def test_the_http_layer_knows_nothing_of_the_network():
    for module in ("service.routes", "service.middleware", "service.errors", "service.app", "service.event_stream"):
        forbidden = {m for m in _imports_of(module) if m.startswith("models") or m == "service.engine"}
        assert not forbidden, (module, forbidden)


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("service.client")))
def test_the_client_library_never_imports_the_command_line(module):
    assert "service.cli" not in _imports_of(module)


@pytest.mark.parametrize("module", ["service.tiling", "service.tile_queue", "service.watchdog", "service.memory",
                                    "service.imaging", "service.image_structure", "service.image_files",
                                    "service.progress", "service.devices"])
def test_the_bottom_layer_imports_no_other_service_module(module):
    # But imaging reads what an upload's bytes say through image_structure, a layer further down.
    allowed = {"service.image_structure"} if module == "service.imaging" else set()
    assert not {m for m in _imports_of(module) if m.startswith("service")} - allowed


@pytest.mark.parametrize("path", sorted((ROOT / "service").glob("*.py")), ids=lambda path: path.name)
def test_no_service_module_is_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("training.")
                                          and m not in {"training.evaluate", "training.held_out"}))
def test_no_training_module_imports_the_held_out_degradations(module):
    # A held-out family imported by a mixture would be trained on and its card row a lie.
    assert "training.held_out" not in _imports_of(module)
