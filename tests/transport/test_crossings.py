"""The transport talks to the engine through the engine's own surface, never through its parts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TRANSPORT = Path(__file__).resolve().parents[2] / "service" / "transport"
ENGINE_PARTS = {"runner", "scheduler", "sessions"}  # the engine's insides: model runner, scheduler, sessions


@pytest.mark.parametrize("module", sorted(TRANSPORT.glob("*.py")), ids=lambda p: p.name)
def test_the_transport_does_not_reach_into_the_engine(module: Path) -> None:
    tree = ast.parse(module.read_text(), filename=str(module))
    reached = [
        f"{module.name}:{node.lineno} .{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in ENGINE_PARTS
    ]
    assert reached == []
