"""The egress guard: tenebra never becomes a way into the private network.

Every request to a client-supplied URL goes through a connector whose resolver drops every
non-global address *at connect time*, after resolution, on every attempt (no DNS cache), so a
name that answers public first and private later (DNS rebinding) is refused the second time.
aiohttp does not resolve IP literals, so a literal host is checked by :meth:`refusal_for_url`
before every attempt. Redirects are never followed (the caller passes ``allow_redirects=False``).

Refused: loopback, RFC 1918, link-local (169.254/16, fe80::/10), CGNAT 100.64/10, ULA fc00::/7,
multicast, unspecified, documentation and reserved ranges (``ipaddress``'s ``is_global``), plus
what ``is_global`` misses: IPv4 embedded in IPv4-mapped (::ffff:0:0/96), 6to4 (2002::/16),
NAT64 (64:ff9b::/96) and Teredo addresses, and multicast. An operator allow-list (CIDRs or host
names) opens chosen destinations on purpose: tests, private deployments, the embedded provider.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

__all__ = ["EgressGuard", "EgressRefused", "why_not_global"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class EgressRefused(OSError):
    """A destination the guard refuses: an OSError, so aiohttp reports a connect failure,
    with the reason as its strerror (which aiohttp's message shows)."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EACCES, reason)


def _embedded(address: IPAddress) -> list[IPAddress]:
    """The IPv4 addresses an IPv6 address carries inside it."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    inner: list[IPAddress] = []
    if address.ipv4_mapped is not None:
        inner.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        inner.append(address.sixtofour)
    if address.teredo is not None:
        inner.extend(address.teredo)
    if address in _NAT64:
        inner.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return inner


def why_not_global(address: IPAddress) -> str | None:
    """Why ``address`` is not a public destination, or None if it is."""
    if address.is_multicast:
        return f"{address} is a multicast address"
    if address.is_unspecified:
        return f"{address} is unspecified"
    if not address.is_global:
        return f"{address} is not a global address"
    for inner in _embedded(address):
        if reason := why_not_global(inner):
            return f"{address} embeds {inner}: {reason}"
    return None


class EgressGuard:
    def __init__(self, allow: Iterable[str] = ()) -> None:
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self._hosts: set[str] = set()
        for entry in allow:
            try:
                self._networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self._hosts.add(entry.lower().rstrip("."))

    def allow(self, entry: str) -> None:
        try:
            self._networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            self._hosts.add(entry.lower().rstrip("."))

    def refusal(self, address: IPAddress) -> str | None:
        if any(address in network for network in self._networks):
            return None
        return why_not_global(address)

    def refusal_for_url(self, url: str) -> str | None:
        """Why a URL's host is refused without resolving it (a literal address), or None."""
        host = (urlsplit(url).hostname or "").rstrip(".")
        if host.lower() in self._hosts:
            return None
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return None  # a name: checked when it resolves
        return self.refusal(address)

    def session(self, *, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            resolver=_GuardedResolver(self), use_dns_cache=False, limit=256
        )
        return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)


class _GuardedResolver(AbstractResolver):
    """Resolves, then keeps only the addresses the guard allows; none left is a refusal."""

    def __init__(self, guard: EgressGuard) -> None:
        self._guard = guard
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        if host.lower().rstrip(".") in self._guard._hosts:
            return answers
        kept: list[ResolveResult] = []
        reasons: list[str] = []
        for answer in answers:
            reason = self._guard.refusal(ipaddress.ip_address(answer["host"]))
            if reason is None:
                kept.append(answer)
            else:
                reasons.append(reason)
        if not kept:
            raise EgressRefused(f"egress refused: {host} resolves to {'; '.join(reasons)}")
        return kept

    async def close(self) -> None:
        await self._inner.close()
