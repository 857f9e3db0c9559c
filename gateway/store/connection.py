"""The one Redis connection pool of a replica, and the deadline every call to it keeps.

Everything replicas share (task claims and records, limits, deliveries, sessions, the replica
registry) goes through one :class:`RedisConnection`: at most ``max_connections`` pooled
sockets, and two more for the task store's batches (its claims, its writes: store/pipe.py),
every wait and read within ``deadline``, and one ``asyncio.timeout`` around each call (the
batches on the store's connections keep theirs in the pipe: ``batch``). A Redis that
refuses, stalls or fails raises :class:`StoreUnavailable`; the caller answers
``serviceUnavailable`` (or retries later), it never hangs. One retry, at once, covers a pooled
connection that a Redis restart closed; none follows a reply that is late (the command may
still run).

Keys live under one ``prefix`` (``tenebra`` unless told), so several gateways (or test runs)
share a Redis without meeting. Key parts that come from clients (tenant, taskUUID, session) go
through :func:`key_part`, so that a ':' in a tenant's name cannot make two tenants' keys meet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError, ResponseError

from gateway.store.pipe import Incarnation, RedisPipe
from gateway.store.shared import StoreUnavailable

__all__ = ["RedisConnection", "key_part"]

T = TypeVar("T")


def key_part(text: str) -> str:
    """A tenant or taskUUID as one key segment: '%' and ':' escaped (reversibly)."""
    return text.replace("%", "%25").replace(":", "%3A")


class RedisConnection:
    def __init__(self, client: aioredis.Redis, url: str, *, deadline: float, prefix: str) -> None:
        self.client = client
        # which data set Redis holds: the claims this replica made in an earlier one are gone
        self.incarnation = Incarnation(f"{prefix}:incarnation".encode())
        # the task store's batches (store/pipe.py): its claims on a connection of their own,
        # so that a new task never waits behind a long flush of records
        self.claims = RedisPipe(url, deadline=deadline, incarnation=self.incarnation)
        self.writes = RedisPipe(url, deadline=deadline, incarnation=self.incarnation)
        self.deadline = deadline
        self.prefix = prefix

    @classmethod
    def from_url(
        cls, url: str, *, deadline: float = 1.0, max_connections: int = 32, prefix: str = "tenebra"
    ) -> RedisConnection:
        """Connects on first use, and again after a failure."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=deadline,  # waiting for a free pooled connection
            socket_timeout=deadline,
            socket_connect_timeout=deadline,
            # a connection a restart closed, not a reply late: a command Redis still holds
            # would run twice (a script that appends frames, or takes them)
            retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)),
            health_check_interval=0,
        )
        return cls(aioredis.Redis(connection_pool=pool), url, deadline=deadline, prefix=prefix)

    def key(self, *parts: str) -> str:
        """``prefix:part:part``; parts from clients must have been through :func:`key_part`."""
        return ":".join((self.prefix, *parts))

    async def call(self, step: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self.deadline * 2):  # a connect, then a command
                return await step()
        except (RedisError, OSError) as exc:  # TimeoutError is an OSError
            raise self._unavailable(exc) from exc

    async def batch(self, pipe: RedisPipe, data: bytes, replies: int, built: int = -1) -> list[Any]:
        """``data`` (packed commands) on one of the pipelined connections, and its ``replies``,
        within the deadline the pipe keeps itself (and for the data set it was ``built`` for:
        RedisPipe.exchange); an error reply raises once every reply is read (the connection
        stays in step)."""
        try:
            if self.incarnation.opening:
                await self._open()
            answers = await pipe.exchange(data, replies, built)
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc
        for answer in answers:
            if isinstance(answer, ResponseError):
                raise self._unavailable(answer)
        return answers

    async def _open(self) -> None:
        """Both of the store's connections, before its first batch: a connect after them may
        be to another server than the one claims were made in, and counts so where the server
        cannot be told (``Incarnation``); these two are to the same one."""
        await self.claims.connect()  # one after the other: a failure leaves nothing behind
        await self.writes.connect()
        self.incarnation.opening = False

    def _unavailable(self, exc: Exception) -> StoreUnavailable:
        if isinstance(exc, TimeoutError):
            return StoreUnavailable(f"redis did not answer within {self.deadline * 2:g} s")
        return StoreUnavailable(f"redis: {type(exc).__name__}: {exc}")

    def script(self, source: str) -> Any:
        """A Lua script, sent by its SHA (and loaded again after a Redis restart)."""
        return self.client.register_script(source)

    async def ping(self) -> None:
        """Raises ``StoreUnavailable`` unless Redis answers within the deadline (``/readyz``)."""
        await self.call(lambda: self.client.ping())

    async def close(self) -> None:
        await self.claims.close()
        await self.writes.close()
        await self.client.aclose(close_connection_pool=True)
