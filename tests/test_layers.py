"""Imports flow one way: data -> models -> protect | attack -> evaluate -> cli."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mmguard

PACKAGE = Path(mmguard.__file__).parent
# What each layer must never import (anything above it, and its sibling).
FORBIDDEN = {
    "data": ("models", "protect", "attack", "evaluate", "cli", "demo", "demo_lvlm"),
    "models": ("protect", "attack", "evaluate", "cli", "demo", "demo_lvlm"),
    "protect": ("attack", "evaluate", "cli", "demo", "demo_lvlm"),
    "attack": ("protect", "evaluate", "cli", "demo", "demo_lvlm"),
    "evaluate": ("protect", "cli", "demo", "demo_lvlm"),
}


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):  # local imports inside functions count too
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_upwards(layer):
    above = {f"mmguard.{name}" for name in FORBIDDEN[layer]}
    wrong = [f"{path.relative_to(PACKAGE)} imports {name}"
             for path in sorted((PACKAGE / layer).rglob("*.py"))
             for name in sorted(_imported_modules(path))
             if ".".join(name.split(".")[:2]) in above]
    assert not wrong, "\n".join(wrong)
