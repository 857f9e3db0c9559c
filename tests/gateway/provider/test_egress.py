"""The provider's guarded resolver: a name is judged by the addresses it resolves to, on every
attempt, before any connection."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from aiohttp.abc import ResolveResult

from gateway.provider.egress import GuardedResolver
from protocol.egress import EgressPolicy


class ScriptedResolver:
    """Answers each lookup from a script, as a name that rebinds would."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)

    async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[Any]:
        return [
            ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET, proto=0, flags=0)
            for a in self.answers.pop(0)
        ]

    async def close(self) -> None:
        pass


def scripted(policy: EgressPolicy, *answers: list[str]) -> GuardedResolver:
    resolver = GuardedResolver(policy)
    resolver._inner = ScriptedResolver(*answers)  # type: ignore[assignment]
    return resolver


async def test_a_name_for_the_metadata_address_is_refused() -> None:
    resolver = scripted(EgressPolicy(), ["169.254.169.254"])
    with pytest.raises(OSError, match="egress refused") as refused:
        await resolver.resolve("metadata.example", 80)
    assert "169.254" not in str(refused.value)  # what the name resolves to stays inside


async def test_a_rebinding_name_is_refused_at_its_private_answer() -> None:
    resolver = scripted(EgressPolicy(), ["93.184.216.34"], ["10.0.0.1", "127.0.0.1"])
    assert [r["host"] for r in await resolver.resolve("rebind.example", 80)] == ["93.184.216.34"]
    with pytest.raises(OSError, match="egress refused"):
        await resolver.resolve("rebind.example", 80)


async def test_private_answers_are_dropped_and_allowed_ones_kept() -> None:
    resolver = scripted(EgressPolicy(["127.0.0.1/32"]), ["169.254.169.254", "127.0.0.1"])
    assert [r["host"] for r in await resolver.resolve("images.local", 80)] == ["127.0.0.1"]
