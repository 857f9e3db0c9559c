"""Replicas of one gateway that share a Redis: who is alive, who takes over the dead, and the bus.

Every replica holds a **lease**: its name in the sorted set ``{prefix}:replicas`` scored by when
the lease ends (Redis's clock, ms), renewed every third of ``store.lease``. A replica whose lease
has ended is dead (SIGKILLed, partitioned, stopped without a goodbye); a live replica that sees
it takes the lock ``{prefix}:takeover:{name}`` and runs the takeover hooks (the dead one's
provider sessions and tasks, its clients' sessions). Hooks must be idempotent: a taker that dies
half way leaves the lock to expire and another replica to run them all again. A replica that
stops cleanly removes its lease after handing over what it held, so nothing is taken over.

A lapsed lease is only evidence that a replica did not reach Redis, and Redis itself can be the
one that was away: after an outage longer than the lease every score is in the past, and the
first replica back would take over the others while they live (two replicas running the same
tasks: double bills, double frames). So only a replica whose own lease held at this renewal
sees the dead, and only once its lease has been unbroken for a **settling time** (one lease and
one call's deadline, ``{prefix}:registered`` holds since when): by then every replica that is
alive has reached Redis again and renewed. Everything is decided in Lua on Redis's clock, so
the replicas' clocks and a stalled event loop do not matter.

A replica can still be taken over while it lives (partitioned from Redis alone, its event loop
stalled past the lease). The taker marks it **fenced** (``{prefix}:fenced:{name}``, set with the
lock, kept a week) and from then on it owns nothing: its next renewal says so instead of bringing
its lease back, and it calls ``on_fenced`` (the gateway stops) and stops its loops, touching the
registry no more. A process that starts under a fenced name clears the fence: it holds nothing.

Takeovers run in their own task, one at a time, from a short queue of names: a takeover of
thousands of records must not hold up the renewals (the taker would lapse and be taken over in
turn). Its lock is held for a few leases and extended while the hooks run; a taker that cannot
extend it in time (another may then take the lock) cancels its hooks rather than run them twice.
A replica that is shutting down takes over nobody (``pause_takeovers``): what it took would be
left half adopted, or handed over straight away.

The **bus** carries what one replica has to tell another (a client's frames to the replica that
holds its socket, a session that moved): one Redis pub/sub channel per replica,
``{prefix}:bus:{name}``, MessagePack ``[kind, body]``. Pub/sub is at most once: a message to a
replica that is down, or that is reconnecting to Redis, is lost. Everything sent on the bus is
therefore also recoverable from the store (a task's results from its record, through
``getResponse``); the bus only makes the common case immediate. Its loop outlives any error
(it reconnects) and every wait in it is bounded: a bus that died silently would lose every
message from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
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

__all__ = ["FENCE_TTL", "MAX_QUEUED_TAKEOVERS", "Cluster", "default_replica_name"]

log = structlog.get_logger("tenebra.cluster")

# a fenced replica must learn it at its next renewal, however long its partition lasted
FENCE_TTL = 7 * 24 * 3600.0
# dead replicas waiting for their takeover; more are seen again at a later renewal
MAX_QUEUED_TAKEOVERS = 64

_NOW = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
"""

# KEYS: replicas, registered, this replica's fence. ARGV: name, lease (ms), settling time (ms),
# '1' at a process's first registration. Returns {status, dead}: status 0 the lease held, 1 it
# had lapsed (or is new) and is registered again, 2 fenced (nothing renewed). The dead are
# listed only to a replica whose lease held and has been unbroken for the settling time.
_RENEW = (
    _NOW
    + """
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[3])
elseif redis.call('EXISTS', KEYS[3]) == 1 then
  return {2, {}}
end
local previous = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local since = tonumber(redis.call('HGET', KEYS[2], ARGV[1]))
if ARGV[4] == '1' or previous == nil or previous < now or since == nil then
  redis.call('HSET', KEYS[2], ARGV[1], now)
  return {1, {}}
end
if now - since < tonumber(ARGV[3]) then
  return {0, {}}
end
return {0, redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)}
"""
)

# KEYS: replicas, registered, the takeover lock, the dead one's fence, this replica's fence.
# ARGV: this replica, the dead one, lock hold (ms), fence TTL (ms), settling time (ms).
# 1 when the lock is taken and the dead one fenced; 0 when it is not this replica's to take
# (taken by another, alive again, gone) or this replica may not take anyone over now.
_SEIZE = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[5]) == 1 then return 0 end
local mine = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
local since = tonumber(redis.call('HGET', KEYS[2], ARGV[1]))
if mine == nil or mine < now or since == nil or now - since < tonumber(ARGV[5]) then
  return 0
end
local theirs = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[2]))
if theirs == nil or theirs >= now then return 0 end
if not redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[3]) then return 0 end
redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[4])
return 1
"""
)

# KEYS: the takeover lock. ARGV: this replica, hold (ms). 1 while the lock is still this one's.
_KEEP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: replicas, registered, the takeover lock. ARGV: this replica, the dead one. The dead one
# leaves the registry (unless a new process took its name meanwhile), then the lock goes.
_RELEASE = (
    _NOW
    + """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return 0 end
local theirs = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[2]))
if theirs ~= nil and theirs < now then
  redis.call('ZREM', KEYS[1], ARGV[2])
  redis.call('HDEL', KEYS[2], ARGV[2])
end
redis.call('DEL', KEYS[3])
return 1
"""
)

_LEASE_HELD, _LEASE_LAPSED, _FENCED = 0, 1, 2

Handler = Callable[[bytes], None]
Takeover = Callable[[str], Awaitable[None]]

_MESSAGE = msgspec.msgpack.Encoder()
_DECODE = msgspec.msgpack.Decoder(tuple[str, bytes])


def default_replica_name() -> str:
    """Unique enough among replicas: host, pid and a random part (pids repeat in containers)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Cluster:
    def __init__(self, redis: RedisConnection, name: str, lease: float) -> None:
        self.redis = redis
        self.name = name
        self.lease = lease
        self.healthy = False  # the last renewal got through: /readyz says so
        self.fenced = False  # taken over while alive: it owns nothing any more
        self.takeovers: list[Takeover] = []  # run, in order, for each dead replica taken over
        # called once, on the event loop, when this replica learns it was taken over: what it
        # runs is another replica's now, it must stop (its loops here have stopped already)
        self.on_fenced: list[Callable[[], None]] = []
        # called after every renewal that got through: what the replica keeps in Redis is
        # written again, in case Redis lost it meanwhile (restarted empty, or flushed)
        self.on_renewed: list[Callable[[], None]] = []
        self._replicas = redis.key("replicas")
        self._registered = redis.key("registered")
        self._fence = self._fence_key(name)
        self._renew = redis.script(_RENEW)
        self._seize = redis.script(_SEIZE)
        self._keep = redis.script(_KEEP)
        self._release = redis.script(_RELEASE)
        self._handlers: dict[str, Handler] = {}
        self._tasks: list[asyncio.Task[None]] = []  # the lease loop first
        self._rng = random.Random()
        self._stopping = asyncio.Event()
        self._first = True  # the next renewal is this process's first
        # loop times a renewal was sent: the last that got through (the lease runs a lease from
        # it at least), and the last that was answered, through or not (lease_in_doubt)
        self._renewed_sent = -math.inf
        self._answered_sent = -math.inf
        # the loop's own pulse (_beat_forever): when it last beat, and when it last found it
        # had stood still (a stall) longer than _stall
        self._stall = lease / 3
        self._beat = -math.inf
        self._stalled_at = -math.inf
        self._pulse: asyncio.Task[None] | None = None
        self._takeovers_paused = False
        self._dead: asyncio.Queue[str] = asyncio.Queue(MAX_QUEUED_TAKEOVERS)
        self._queued: set[str] = set()  # in the queue or being taken over
        self._taking = False  # a takeover is running

    def lease_in_doubt(self) -> bool:
        """Whether another replica may have taken this one over without its knowing yet: its
        lease ran out by its own clock (a stall: SIGSTOP, a paused VM, a blocked loop) and no
        renewal sent since has been answered; or it was fenced. The frames to its clients wait
        meanwhile (gateway.replication): a renewal that gets through lets them go, one that
        finds the replica fenced drops them (another replica sends them), one that fails
        (Redis away) lets them go, as frames go while Redis is away."""
        if self.fenced:
            return True
        now = asyncio.get_running_loop().time()
        ran_out = self._renewed_sent + self.lease
        if not now > ran_out > self._answered_sent:
            return False
        # a stall, not an outage (the loop ran on, Redis did not answer: frames go as they go
        # while Redis is away): the loop stood still, now or since the last renewal answered
        return now - self._beat > self._stall or self._stalled_at > self._answered_sent

    async def _beat_forever(self) -> None:
        """The loop's pulse: a beat a third of a lease late says the process stood still
        (SIGSTOP, a paused VM, a blocked loop), which lease_in_doubt tells from a Redis
        outage. A lease runs out unrenewed after two thirds of it at least: no stall that
        lets it is shorter."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._stall / 4)
            now = loop.time()
            if now - self._beat > self._stall:
                self._stalled_at = now
            self._beat = now

    @property
    def settling(self) -> float:
        """How long a lease must have been unbroken before its replica may take anyone over: a
        lease, and a call that hung when Redis came back, let every live replica renew."""
        return self.lease + 2 * self.redis.deadline

    @property
    def hold(self) -> float:
        """A takeover lock's life, extended every third of a lease while the hooks run."""
        return 3 * self.lease + 2 * self.redis.deadline

    def channel(self, name: str) -> str:
        return self.redis.key("bus", key_part(name))

    def on(self, kind: str, handler: Handler) -> None:
        """Messages of ``kind`` to this replica go to ``handler`` (on the event loop, in order)."""
        self._handlers[kind] = handler

    async def start(self) -> None:
        """Lease first (a replica that cannot reach Redis starts unready, and keeps trying)."""
        with contextlib.suppress(StoreUnavailable):
            await self._renew_once()
        self._beat = asyncio.get_running_loop().time()
        self._pulse = asyncio.create_task(self._beat_forever(), name="cluster-pulse")
        self._tasks = [
            asyncio.create_task(self._renew_forever(), name="cluster-lease"),
            asyncio.create_task(self._listen_forever(), name="cluster-bus"),
            asyncio.create_task(self._take_over_forever(), name="cluster-takeovers"),
        ]

    def pause_takeovers(self) -> None:
        """From now on this replica takes over nobody: the first thing a shutdown does, so that
        what it takes is not left half adopted, or handed over at once. A takeover already
        running goes on (its tasks are this replica's, drained or handed over with the rest);
        ``stop`` waits a lease for it, then cancels it (its lock lapses: another runs it)."""
        self._takeovers_paused = True
        self._forget_queued()

    async def stop(self, *, hand_over: bool = False) -> None:
        """Stop the loops and give up the lease: nobody takes over a replica that left; with
        ``hand_over``, the lease is ended instead, so that another replica takes over what
        this one leaves (its open tasks) at its next renewal. A fenced replica leaves the
        registry as it is: its name is the taker's business now.

        The lease loop is let finish its call rather than cancelled in it: a renewal already
        sent would otherwise land after the removal and bring the lease back, to lapse later
        and be taken over."""
        self.pause_takeovers()
        self._stopping.set()
        if self._tasks:
            lease, bus, takeovers = self._tasks
            bus.cancel()
            if self._taking:  # let it end if it is about to (the loop ends after it)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(takeovers), self.lease)
            takeovers.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(lease), self.redis.deadline * 2)
            lease.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._pulse is not None:
            self._pulse.cancel()
        if self.fenced:
            return
        client = self.redis.client
        with contextlib.suppress(StoreUnavailable):
            if hand_over:  # a lease that ended long ago: dead to the next renewal that looks
                await self.redis.call(lambda: client.zadd(self._replicas, {self.name: 0}))
            else:
                await self.redis.call(lambda: client.zrem(self._replicas, self.name))
                await self.redis.call(lambda: client.hdel(self._registered, self.name))

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
        names = await self.redis.call(lambda: client.zrangebyscore(self._replicas, ms, "+inf"))
        return [_text(n) for n in names]

    def _fence_key(self, name: str) -> str:
        return self.redis.key("fenced", key_part(name))

    # ------------------------------------------------------------------------------ the lease

    async def _renew_once(self) -> list[str]:
        """Renew; the dead this replica may take over."""
        first = self._first
        keys = [self._replicas, self._registered, self._fence]
        args = [
            self.name,
            round(self.lease * 1000),
            round(self.settling * 1000),
            "1" if first else "0",
        ]
        sent = asyncio.get_running_loop().time()
        try:
            status, dead = await self.redis.call(lambda: self._renew(keys=keys, args=args))
        except StoreUnavailable:
            self._answered_sent = max(self._answered_sent, sent)  # Redis away since
            raise
        self._answered_sent = max(self._answered_sent, sent)
        self._first = False
        if status == _FENCED:
            self._fenced_now()
            return []
        self.healthy = True
        self._renewed_sent = max(self._renewed_sent, sent)
        if status == _LEASE_LAPSED:
            if not first:
                log.warning(
                    "replica lease had lapsed: registered again, takes over nobody for a while",
                    seconds=self.settling,
                )
            self._forget_queued()  # seen while this replica's own view was not to be trusted
        for hook in self.on_renewed:
            try:
                hook()
            except Exception:  # one hook's failure neither stops the others nor the lease
                log.exception("a renewal hook failed")
        return [name for name in map(_text, dead) if name != self.name]

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
            except Exception:  # a reply not understood: the loop goes on, unready meanwhile
                log.exception("replica lease not renewed")
                self.healthy = False
                await self._pause(next(delays))
                continue
            self._queue(dead)
            await self._pause(self.lease / 3)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _fenced_now(self) -> None:
        if self.fenced:
            return
        self.fenced = True
        self.healthy = False
        log.error("replica fenced: another replica took over what it held", replica=self.name)
        self._takeovers_paused = True
        self._forget_queued()
        self._stopping.set()
        for task in self._tasks[1:]:  # the lease loop is the caller: it ends on the flag
            task.cancel()
        for hook in self.on_fenced:
            try:
                hook()
            except Exception:
                log.exception("on_fenced hook failed")

    # ------------------------------------------------------------------------------ takeovers

    def _queue(self, dead: list[str]) -> None:
        if self._takeovers_paused or self._stopping.is_set():
            return
        for name in dead:
            if name in self._queued:
                continue
            try:
                self._dead.put_nowait(name)
            except asyncio.QueueFull:
                return  # the others are seen again at a later renewal
            self._queued.add(name)

    def _forget_queued(self) -> None:
        while not self._dead.empty():
            self._queued.discard(self._dead.get_nowait())

    async def _take_over_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                dead = await asyncio.wait_for(self._dead.get(), self.lease)
            except TimeoutError:
                continue
            self._taking = True
            try:
                if not self._takeovers_paused:
                    await self._take_over(dead)
            except Exception:
                log.exception("takeover failed", replica=dead)
            finally:
                self._taking = False
                self._queued.discard(dead)

    async def _take_over(self, dead: str) -> None:
        lock = self.redis.key("takeover", key_part(dead))
        keys = [self._replicas, self._registered, lock, self._fence_key(dead), self._fence]
        hold_ms = round(self.hold * 1000)
        args = [
            self.name,
            dead,
            hold_ms,
            round(FENCE_TTL * 1000),
            round(self.settling * 1000),
        ]
        loop = asyncio.get_running_loop()
        sent = loop.time()
        try:
            won = await self.redis.call(lambda: self._seize(keys=keys, args=args))
        except StoreUnavailable:
            return
        if not won:
            return
        log.warning("taking over a dead replica", replica=dead)
        hooks = asyncio.create_task(self._run_hooks(dead), name=f"cluster-takeover-{dead}")
        try:
            held = await self._hold_while(lock, hooks, sent + self.hold)
        finally:
            if not hooks.done():  # this replica stops (or is fenced): its lock lapses
                hooks.cancel()
                await asyncio.gather(hooks, return_exceptions=True)
        if not held or not hooks.result():
            return  # the lock lapses; this or another replica tries again
        try:
            released = await self.redis.call(
                lambda: self._release(
                    keys=[self._replicas, self._registered, lock], args=[self.name, dead]
                )
            )
        except StoreUnavailable as exc:
            log.warning("takeover not recorded: redis unavailable", replica=dead, error=str(exc))
            return
        if released:
            log.info("took over a dead replica", replica=dead)

    async def _run_hooks(self, dead: str) -> bool:
        try:
            for hook in self.takeovers:
                await hook(dead)
        except StoreUnavailable as exc:
            log.warning("takeover interrupted: redis unavailable", replica=dead, error=str(exc))
            return False
        except Exception:
            log.exception("takeover hook failed", replica=dead)
            return False
        return True

    async def _hold_while(self, lock: str, hooks: asyncio.Task[bool], until: float) -> bool:
        """Extend the lock while ``hooks`` run; False (the hooks cancelled) once it may have
        gone to another replica: two takers would run the same tasks twice."""
        loop = asyncio.get_running_loop()
        hold_ms = round(self.hold * 1000)
        retry = self.lease / 3 + 2 * self.redis.deadline  # when the next extension may end
        while True:
            done, _ = await asyncio.wait({hooks}, timeout=self.lease / 3)
            if done:
                return True
            sent = loop.time()
            try:
                kept = await self.redis.call(
                    lambda: self._keep(keys=[lock], args=[self.name, hold_ms])
                )
            except StoreUnavailable:
                kept = loop.time() + retry < until
            else:
                if kept:
                    until = sent + self.hold
            if not kept:
                log.warning("takeover abandoned: its lock may be another's", lock=lock)
                hooks.cancel()
                await asyncio.gather(hooks, return_exceptions=True)
                return False

    # ------------------------------------------------------------------------------ the bus

    async def _listen_forever(self) -> None:
        delays = full_jitter(0.05, self.lease / 3, self._rng)
        while not self._stopping.is_set():
            try:
                await self._listen()
            except (RedisError, OSError, TimeoutError) as exc:
                log.info("bus reconnecting", error=repr(exc))
                await self._pause(next(delays))
            except Exception:  # whatever it was, a bus that stops loses every later message
                log.exception("bus failed: reconnecting")
                await self._pause(next(delays))

    async def _listen(self) -> None:
        pubsub = self.redis.client.pubsub(ignore_subscribe_messages=True)
        wait = self.lease / 3
        try:
            async with asyncio.timeout(self.redis.deadline * 2):
                await pubsub.subscribe(self.channel(self.name))
            while not self._stopping.is_set():
                # redis-py's get_message was seen to swallow a cancellation: the loop also ends
                # on the flag, within one wait; a read that stalls past it reconnects
                async with asyncio.timeout(wait + self.redis.deadline * 2):
                    message: dict[str, Any] | None = await pubsub.get_message(timeout=wait)
                if message is None or message.get("type") != "message":
                    continue
                try:
                    kind, body = _DECODE.decode(message["data"])
                except (msgspec.DecodeError, KeyError, TypeError):
                    continue
                handler = self._handlers.get(kind)
                if handler is not None:
                    try:
                        handler(body)
                    except Exception:
                        log.exception("bus handler failed", kind=kind)
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.redis.deadline * 2):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
