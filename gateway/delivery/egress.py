"""The egress guard: tenebra never becomes a way into the private network.

Every request to a client-supplied URL goes through a connector whose resolver drops every
non-global address *at connect time*, after resolution, on every attempt (no DNS cache), so a
name that answers public first and private later (DNS rebinding) is refused the second time.
aiohttp does not resolve IP literals, so a literal host is checked by :meth:`refusal_for_url`
before every attempt. Redirects are never followed (the caller passes ``allow_redirects=False``).

What is refused, and the allow-list that opens chosen destinations, is the pure policy of
:mod:`protocol.egress`, which the local provider applies to reference images as well.
"""

from __future__ import annotations

import errno
import socket

import aiohttp
import structlog
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

from protocol.egress import EgressPolicy, why_not_global

log = structlog.get_logger("tenebra.egress")

__all__ = ["EgressGuard", "EgressRefused", "why_not_global"]


class EgressRefused(OSError):
    """A destination the guard refuses: an OSError, so aiohttp reports a connect failure,
    with the reason as its strerror (which aiohttp's message shows)."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EACCES, reason)


class EgressGuard(EgressPolicy):
    """The policy, with the guarded session that applies it when a request connects."""

    def refusal_for_url(self, url: str) -> str | None:
        """Judged on the host aiohttp will connect to, as yarl reads the URL: a second parser
        (urlsplit) that read another host would open a way round the guard."""
        try:
            host = yarl.URL(url).raw_host or ""
        except ValueError:
            return "the URL does not parse"
        return self.refusal_for_host(host)

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
        kept: list[ResolveResult] = []
        reasons: list[str] = []
        for answer in answers:
            reason = self._guard.refusal_for_answer(host, answer["host"])
            if reason is None:
                kept.append(answer)
            else:
                reasons.append(reason)
        if not kept:
            # what the name resolved to stays in the log: the error reaches tenants (the task
            # view), and the internal network's addresses are none of theirs
            log.info("egress refused", host=host, reasons=reasons)
            raise EgressRefused(f"egress refused: {host} resolves to no allowed address")
        return kept

    async def close(self) -> None:
        await self._inner.close()
