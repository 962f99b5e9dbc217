"""Every benchmark and tool module imports: they run rarely (by hand, for minutes), so a moved
helper would otherwise break one unnoticed until someone needs its figures."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
MODULES = sorted(
    ".".join(path.relative_to(TOOLS.parent).with_suffix("").parts)
    for path in TOOLS.rglob("*.py")
    if path.name != "__init__.py"
)


def test_the_tools_are_found() -> None:
    assert "tools.bench.node" in MODULES and "tools.make_tiny_model" in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_the_tool_imports(module: str) -> None:
    importlib.import_module(module)
