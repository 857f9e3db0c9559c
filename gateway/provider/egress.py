"""The provider's guarded HTTP client: reference images are fetched as the gateway's webhooks
are sent, through :mod:`protocol.egress`'s policy applied when a request connects.

The resolver drops every address the policy refuses, on every attempt (no DNS cache), so a name
that rebinds to a private address is refused when it does. aiohttp never resolves an IP
literal, so the caller checks a literal host before the attempt. The provider keeps its own
copy of this small resolver: it depends on :mod:`protocol` only, never on the gateway.
"""

from __future__ import annotations

import errno
import socket

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from protocol.egress import EgressPolicy

__all__ = ["GuardedResolver", "guarded_session"]


class GuardedResolver(AbstractResolver):
    def __init__(self, policy: EgressPolicy) -> None:
        self._policy = policy
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        kept = [a for a in answers if self._policy.refusal_for_answer(host, a["host"]) is None]
        if not kept:
            # an OSError, so aiohttp reports a failed connect; the addresses stay unsaid
            raise OSError(errno.EACCES, f"egress refused: {host}")
        return kept

    async def close(self) -> None:
        await self._inner.close()


def guarded_session(policy: EgressPolicy, *, timeout: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(policy), use_dns_cache=False, limit=64
    )
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout))
