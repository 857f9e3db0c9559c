from __future__ import annotations

import ast
from pathlib import Path

import pytest

from protocol.errors import CODES, error_item, http_status

PROTOCOL = Path(__file__).parents[2] / "protocol"


@pytest.mark.parametrize("code", sorted(CODES))
def test_every_code_has_a_message_and_a_status(code: str) -> None:
    item = error_item(code, task_type="imageInference", task_uuid="u")
    assert item.message and item.code == code
    assert 400 <= http_status(code) < 600


def test_statuses() -> None:
    assert http_status("invalidApiKey") == 401
    assert http_status("taskNotFound") == 404
    assert http_status("rateLimitExceeded") == 429
    assert http_status("serviceUnavailable") == 503
    assert http_status("invalidOutputQuality") == 400
    assert http_status("noSuchCode") == 500


def test_platform_documentation_by_task_type() -> None:
    assert error_item("invalidApiKey", task_type="authentication").documentation == (
        "https://runware.ai/docs/platform/authentication"
    )
    assert error_item("timeout", task_type="imageInference").documentation is None


def test_codes_sort_into_sdk_categories() -> None:
    # runware-sdk 1.8 classifies validation errors by these prefixes; keep ours inside them.
    prefixes = (
        "invalid",
        "missing",
        "conflict",
        "duplicate",
        "unsupported",
        "value",
        "array",
        "max",
        "unknown",
        "incompatible",
        "tooMany",
    )
    for code, spec in CODES.items():
        if spec.http_status == 400:
            assert code.startswith(prefixes), code


@pytest.mark.parametrize("module", sorted(PROTOCOL.glob("*.py")), ids=lambda p: p.name)
def test_protocol_stays_sans_io(module: Path) -> None:
    forbidden = {
        "asyncio",
        "aiohttp",
        "websockets",
        "gateway",
        "socket",
        "time",
        "random",
        "uvloop",
    }
    tree = ast.parse(module.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in forbidden, f"{module.name} imports {name}"
