"""The egress guard when a request connects: resolved answers, DNS rebinding, the allow-list by
name. What is refused, range by range, is tested with the pure policy (tests/protocol)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from aiohttp.abc import ResolveResult

from gateway.delivery.egress import EgressGuard, EgressRefused, _GuardedResolver


class ScriptedResolver:
    """Answers each lookup from a script: a rebinding name says public, then private."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)

    async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[Any]:
        addresses = self.answers.pop(0)
        return [
            ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET, proto=0, flags=0)
            for a in addresses
        ]

    async def close(self) -> None:
        pass


def guarded(guard: EgressGuard, *answers: list[str]) -> _GuardedResolver:
    resolver = _GuardedResolver(guard)
    resolver._inner = ScriptedResolver(*answers)  # type: ignore[assignment]
    return resolver


async def test_dns_rebinding_is_refused_at_the_second_answer() -> None:
    resolver = guarded(EgressGuard(), ["93.184.216.34"], ["127.0.0.1"])
    first = await resolver.resolve("rebind.example", 443)
    assert [r["host"] for r in first] == ["93.184.216.34"]
    with pytest.raises(EgressRefused, match=r"rebind\.example resolves to no allowed address"):
        await resolver.resolve("rebind.example", 443)


async def test_private_answers_are_dropped_and_public_ones_kept() -> None:
    resolver = guarded(EgressGuard(), ["10.0.0.5", "93.184.216.34", "169.254.169.254"])
    kept = await resolver.resolve("mixed.example", 443)
    assert [r["host"] for r in kept] == ["93.184.216.34"]


async def test_a_name_on_the_allow_list_resolves_as_it_is() -> None:
    resolver = guarded(EgressGuard(["provider.internal"]), ["10.0.0.7"])
    assert [r["host"] for r in await resolver.resolve("provider.internal", 80)] == ["10.0.0.7"]


def test_the_guard_reads_a_url_as_the_client_library_does() -> None:
    """urlsplit reads 'example.com' as the host of this URL; yarl (which aiohttp connects
    with) refuses it: the guard judges what would be connected to, so it refuses too."""
    guard = EgressGuard()
    assert guard.refusal_for_url("http://127.0.0.1\\@example.com/hook") is not None
    assert guard.refusal_for_url("http://user@example.com@127.0.0.1/hook") is not None
    assert guard.refusal_for_url("https://example.com/hook") is None
