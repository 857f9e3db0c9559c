"""The local provider stands for the remote one: it imports protocol/ and itself, never the
rest of the gateway, and every module stays small enough to read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROVIDER = Path(__file__).parents[3] / "gateway" / "provider"


@pytest.mark.parametrize("module", sorted(PROVIDER.glob("*.py")), ids=lambda p: p.name)
def test_the_provider_depends_on_protocol_only(module: Path) -> None:
    for node in ast.walk(ast.parse(module.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            if name.split(".")[0] == "gateway":
                assert name.startswith("gateway.provider"), f"{module.name} imports {name}"
    assert len(module.read_text().splitlines()) <= 400, module.name
