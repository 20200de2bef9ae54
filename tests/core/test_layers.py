"""Tests that the core imports nothing above it: a static walk of every core module's syntax tree, so that an
import inside a function (which no import-time probe sees) is caught too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lightning_introspect

PACKAGE = Path(lightning_introspect.__file__).parent
CORE = PACKAGE / "core"
# Layers above the core (relative to the package) and third-party packages the core must not use.
ABOVE = ("sinks", "records", "datamap", "report", "publish", "callback", "_compat")
BANNED = ("lightning", "pytorch_lightning", "lightning_fabric", "tensorboard", "matplotlib", "torch.utils.tensorboard")


def _imports(path: Path, package: list[str] | None = None) -> list[tuple[int, str]]:
    """Every module ``path`` imports, as absolute names, with its line: import statements anywhere (also in
    functions) and string literals passed to ``importlib.import_module`` / ``__import__``."""
    tree = ast.parse(path.read_text(), str(path))
    if package is None:  # the module's own package, for relative imports
        package = ["lightning_introspect", *path.relative_to(PACKAGE).parent.parts]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _forbidden(module: str) -> bool:
    parts = module.split(".")
    if parts[0] == "lightning_introspect":
        return len(parts) > 1 and parts[1] in ABOVE
    return any(module == b or module.startswith(b + ".") for b in BANNED)


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: p.name)
def test_core_module_imports_nothing_above_the_core(path: Path) -> None:
    """Test that a core module imports no package layer above the core, nor Lightning, TensorBoard or matplotlib."""
    bad = [f"line {line}: {module}" for line, module in _imports(path) if _forbidden(module)]
    assert not bad, f"{path.relative_to(PACKAGE)} imports above the core: {bad}"


def test_the_walk_sees_imports_inside_functions_and_import_module_strings(tmp_path: Path) -> None:
    """Test that the checker flags an import inside a function, a relative one and an import_module string."""
    probe = tmp_path / "probe.py"  # read as if it were a module of lightning_introspect.core
    source = (
        "import importlib\n"
        "def f():\n    from .. import records\n    import tensorboard.summary\n"
        "    return importlib.import_module('lightning_introspect.datamap')\n"
        "from ..sinks.base import AsyncWriter\n"
    )
    probe.write_text(source)
    flagged = sorted({m for _, m in _imports(probe, ["lightning_introspect", "core"]) if _forbidden(m)})
    assert flagged == [
        "lightning_introspect.datamap", "lightning_introspect.records", "lightning_introspect.sinks.base",
        "lightning_introspect.sinks.base.AsyncWriter", "tensorboard.summary",
    ]
