"""Replicas of one gateway that share a Redis: who is alive, who takes over the dead, and the bus.

Every replica holds a **lease**: its name in the sorted set ``{prefix}:replicas`` scored by when
the lease ends (Redis's clock, ms), renewed every third of ``store.lease``. A replica whose lease
has ended is dead (SIGKILLed, partitioned, stopped without a goodbye); the first live replica to
see it takes the lock ``{prefix}:takeover:{name}`` and runs the takeover hooks (the dead one's
provider sessions and tasks, its clients' sessions). Hooks must be idempotent: a taker that dies
half way leaves the lock to expire and another replica to run them all again. A replica that
stops cleanly removes its lease after handing over what it held, so nothing is taken over.

The **bus** carries what one replica has to tell another (a client's frames to the replica that
holds its socket, a session that moved): one Redis pub/sub channel per replica,
``{prefix}:bus:{name}``, MessagePack ``[kind, body]``. Pub/sub is at most once: a message to a
replica that is down, or that is reconnecting to Redis, is lost. Everything sent on the bus is
therefore also recoverable from the store (a task's results from its record, through
``getResponse``); the bus only makes the common case immediate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog
from redis.exceptions import RedisError

from gateway.backoff import full_jitter
from gateway.store.connection import RedisConnection, key_part
from gateway.store.shared import StoreUnavailable

__all__ = ["Cluster", "default_replica_name"]

log = structlog.get_logger("tenebra.cluster")

# KEYS[1]: replicas; ARGV[1]: name, ARGV[2]: lease (ms). Renews the lease; returns the dead.
_RENEW = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
"""

Handler = Callable[[bytes], None]
Takeover = Callable[[str], Awaitable[None]]

_MESSAGE = msgspec.msgpack.Encoder()
_DECODE = msgspec.msgpack.Decoder(tuple[str, bytes])


def default_replica_name() -> str:
    """Unique enough among replicas: host, pid and a random part (pids repeat in containers)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Cluster:
    def __init__(self, redis: RedisConnection, name: str, lease: float) -> None:
        self.redis = redis
        self.name = name
        self.lease = lease
        self.healthy = False  # the last renewal got through: /readyz says so
        self._replicas = redis.key("replicas")
        self._renew = redis.script(_RENEW)
        self._handlers: dict[str, Handler] = {}
        self.takeovers: list[Takeover] = []  # run, in order, for each dead replica taken over
        self._tasks: list[asyncio.Task[None]] = []
        self._rng = random.Random()
        self._stopping = asyncio.Event()

    def channel(self, name: str) -> str:
        return self.redis.key("bus", key_part(name))

    def on(self, kind: str, handler: Handler) -> None:
        """Messages of ``kind`` to this replica go to ``handler`` (on the event loop, in order)."""
        self._handlers[kind] = handler

    async def start(self) -> None:
        """Lease first (a replica that cannot reach Redis starts unready, and keeps trying)."""
        with contextlib.suppress(StoreUnavailable):
            await self._renew_once()
        self._tasks = [
            asyncio.create_task(self._renew_forever(), name="cluster-lease"),
            asyncio.create_task(self._listen_forever(), name="cluster-bus"),
        ]

    async def stop(self, *, hand_over: bool = False) -> None:
        """Stop the loops and give up the lease: nobody takes over a replica that left; with
        ``hand_over``, the lease is ended instead, so that another replica takes over what
        this one leaves (its open tasks) at its next renewal.

        The lease loop is let finish its call rather than cancelled in it: a renewal already
        sent would otherwise land after the removal and bring the lease back, to lapse later
        and be taken over."""
        self._stopping.set()
        for task in self._tasks[1:]:
            task.cancel()
        if self._tasks:  # the lease loop
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._tasks[0]), self.redis.deadline * 2)
            self._tasks[0].cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        client = self.redis.client
        with contextlib.suppress(StoreUnavailable):
            if hand_over:  # a lease that ended long ago: dead to the next renewal that looks
                await self.redis.call(lambda: client.zadd(self._replicas, {self.name: 0}))
            else:
                await self.redis.call(lambda: client.zrem(self._replicas, self.name))

    async def send(self, to: str, kind: str, body: bytes) -> bool:
        """Publish to replica ``to``; False when Redis could not take it or nobody listens."""
        message = _MESSAGE.encode((kind, body))
        try:
            listeners = await self.redis.call(
                lambda: self.redis.client.publish(self.channel(to), message)
            )
        except StoreUnavailable:
            return False
        return bool(listeners)

    async def alive(self) -> list[str]:
        """Replicas whose lease has not ended (as of Redis's clock)."""
        client = self.redis.client
        now = await self.redis.call(lambda: client.time())
        ms = now[0] * 1000 + now[1] // 1000
        names = await self.redis.call(lambda: client.zrangebyscore(self._replicas, ms + 1, "+inf"))
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    async def _renew_once(self) -> list[str]:
        lease_ms = round(self.lease * 1000)
        dead = await self.redis.call(
            lambda: self._renew(keys=[self._replicas], args=[self.name, lease_ms])
        )
        self.healthy = True
        return [d.decode() if isinstance(d, bytes) else str(d) for d in dead if d != self.name]

    async def _renew_forever(self) -> None:
        delays = full_jitter(0.05, self.lease / 3, self._rng)
        while not self._stopping.is_set():
            try:
                dead = await self._renew_once()
                delays = full_jitter(0.05, self.lease / 3, self._rng)
            except StoreUnavailable as exc:
                if self.healthy:
                    log.warning("replica lease not renewed: redis unavailable", error=str(exc))
                self.healthy = False
                await self._pause(next(delays))
                continue
            for name in dead:
                await self._take_over(name)
            await self._pause(self.lease / 3)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _take_over(self, dead: str) -> None:
        lock = self.redis.key("takeover", key_part(dead))
        hold_ms = round(self.lease * 10_000)  # ten leases to run the hooks, then another may
        client = self.redis.client
        try:
            won = await self.redis.call(lambda: client.set(lock, self.name, nx=True, px=hold_ms))
        except StoreUnavailable:
            return
        if not won:
            return
        log.warning("taking over a dead replica", replica=dead)
        try:
            for hook in self.takeovers:
                await hook(dead)
            await self.redis.call(lambda: client.zrem(self._replicas, dead))
        except StoreUnavailable as exc:  # the lock lapses; this or another replica tries again
            log.warning("takeover interrupted: redis unavailable", replica=dead, error=str(exc))
            return
        except Exception:
            log.exception("takeover hook failed", replica=dead)
            return
        with contextlib.suppress(StoreUnavailable):
            await self.redis.call(lambda: client.delete(lock))
        log.info("took over a dead replica", replica=dead)

    async def _listen_forever(self) -> None:
        delays = full_jitter(0.05, self.lease / 3, self._rng)
        while not self._stopping.is_set():
            try:
                await self._listen()
            except (RedisError, OSError, TimeoutError) as exc:
                log.info("bus reconnecting", error=repr(exc))
                await asyncio.sleep(next(delays))

    async def _listen(self) -> None:
        pubsub = self.redis.client.pubsub(ignore_subscribe_messages=True)
        try:
            async with asyncio.timeout(self.redis.deadline * 2):
                await pubsub.subscribe(self.channel(self.name))
            while not self._stopping.is_set():
                # redis-py's get_message was seen to swallow a cancellation: the loop also ends
                # on the flag, within one wait
                message: dict[str, Any] | None = await pubsub.get_message(timeout=self.lease / 3)
                if message is None or message.get("type") != "message":
                    continue
                try:
                    kind, body = _DECODE.decode(message["data"])
                except msgspec.DecodeError:
                    continue
                handler = self._handlers.get(kind)
                if handler is not None:
                    try:
                        handler(body)
                    except Exception:
                        log.exception("bus handler failed", kind=kind)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
