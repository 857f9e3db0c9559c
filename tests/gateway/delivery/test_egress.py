"""The egress guard, range by range, literal and resolved, with DNS rebinding."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest
from aiohttp.abc import ResolveResult

from gateway.delivery.egress import EgressGuard, EgressRefused, _GuardedResolver, why_not_global

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("::1", "loopback v6"),
    ("10.1.2.3", "RFC 1918"),
    ("172.16.0.1", "RFC 1918"),
    ("172.31.255.254", "RFC 1918"),
    ("192.168.1.1", "RFC 1918"),
    ("169.254.169.254", "link-local (cloud metadata)"),
    ("fe80::1", "link-local v6"),
    ("100.64.0.1", "CGNAT"),
    ("100.100.100.200", "CGNAT (Alibaba metadata)"),
    ("fc00::1", "ULA"),
    ("fd12:3456::1", "ULA"),
    ("2002:c0a8:0101::1", "6to4 embedding 192.168.1.1"),
    ("2002:7f00:0001::1", "6to4 embedding 127.0.0.1"),
    ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
    ("::ffff:10.0.0.1", "IPv4-mapped RFC 1918"),
    ("64:ff9b::a00:1", "NAT64 embedding 10.0.0.1"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast v6"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified v6"),
    ("192.0.2.1", "documentation"),
    ("2001:db8::1", "documentation v6"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "2002:0808:0808::1", "::ffff:8.8.8.8"]


@pytest.mark.parametrize(("address", "kind"), REFUSED)
def test_non_global_addresses_are_refused(address: str, kind: str) -> None:
    assert why_not_global(ipaddress.ip_address(address)) is not None, kind
    guard = EgressGuard()
    host = f"[{address}]" if ":" in address else address
    assert guard.refusal_for_url(f"https://{host}:8443/hook") is not None


@pytest.mark.parametrize("address", ALLOWED)
def test_global_addresses_pass(address: str) -> None:
    assert why_not_global(ipaddress.ip_address(address)) is None
    host = f"[{address}]" if ":" in address else address
    assert EgressGuard().refusal_for_url(f"https://{host}/hook") is None


def test_names_are_left_to_connect_time() -> None:
    assert EgressGuard().refusal_for_url("https://hooks.example.com/x") is None


def test_the_allow_list_opens_chosen_destinations() -> None:
    guard = EgressGuard(["127.0.0.0/8", "10.1.0.0/16", "internal.example"])
    assert guard.refusal_for_url("http://127.0.0.1:9000/x") is None
    assert guard.refusal_for_url("http://10.1.2.3/x") is None
    assert guard.refusal_for_url("http://10.2.0.1/x") is not None
    assert guard.refusal_for_url("http://[::1]/x") is not None


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
    with pytest.raises(EgressRefused, match=r"127\.0\.0\.1"):
        await resolver.resolve("rebind.example", 443)


async def test_private_answers_are_dropped_and_public_ones_kept() -> None:
    resolver = guarded(EgressGuard(), ["10.0.0.5", "93.184.216.34", "169.254.169.254"])
    kept = await resolver.resolve("mixed.example", 443)
    assert [r["host"] for r in kept] == ["93.184.216.34"]


async def test_a_name_on_the_allow_list_resolves_as_it_is() -> None:
    resolver = guarded(EgressGuard(["provider.internal"]), ["10.0.0.7"])
    assert [r["host"] for r in await resolver.resolve("provider.internal", 80)] == ["10.0.0.7"]
