"""A tenant's limits across every replica that shares a Redis (``store.url``; issue 13).

One gateway alone has no :class:`SharedLimits` (None): its limits are its own, as before. With
replicas, a tenant's rate, in-flight, queued, connection and budget limits hold for all of them
together:

- **Rate, exact.** Each client frame takes the tokens for its tasks from one token bucket in
  Redis (:meth:`SharedLimits.take`: one Lua script, on Redis's own clock), so the replicas
  together never let more than the tenant's burst, then its rate, through.
- **In flight, queued, connections, held budget: shared views.** Every ``interval`` (0.25 s
  unless told) a loop writes this replica's own figures per tenant (from the ``local`` callable
  the gateway gives) and reads back the sum of the *other* live replicas' figures
  (:meth:`SharedLimits.others`, synchronous, as of the last refresh). The views are at most one
  interval (and one round trip) old: a burst arriving on two replicas within one interval may
  pass a limit by what one interval lets in on each of them.
- **Spend, shared.** Each replica adds its tenants' provider cost (:meth:`add_spend`, fed by the
  budget ledger) and the loop flushes it into one hash per UTC day; :meth:`spent_today` is the
  last total read plus what this replica has not flushed yet. Other replicas' spend is seen
  one interval late; spend added just before 00:00 UTC is counted on the day it was added.

Keys (``prefix`` is the connection's; tenant and replica names escaped by ``key_part``):

- ``{prefix}:rate:{tenant}``         hash ``tokens``, ``stamp`` (Redis time, µs): the bucket;
  it expires after two fill times, when it would be full anyway
- ``{prefix}:limits:replicas``       sorted set of replica names by when their figures expire
  (Redis time, ms): a replica that stops reporting drops out after ``ttl`` by itself
- ``{prefix}:limits:figures:{name}`` string, MessagePack ``{tenant: [in_flight, queued,
  connections, held]}`` of one replica, with the same ``ttl``; a replica that stops cleanly
  deletes it at once
- ``{prefix}:spend:{yyyymmdd}``      hash tenant -> USD spent that UTC day (HINCRBYFLOAT),
  kept two days

Every call keeps the connection's deadline. While Redis is away, :meth:`take` raises
``StoreUnavailable`` (the door answers those tasks ``serviceUnavailable``), the loop backs off
(at most ``ttl`` / 2 between tries) and keeps the last views it had: each replica enforces with
those, and after ``ttl`` the other replicas no longer count this one's figures. Spend not yet
flushed stays pending and is flushed when Redis is back (a reply lost after the script ran may
add it twice: toward refusing, never overspending). Scripts compute keys of other replicas, so
this is for one Redis (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
import structlog

from gateway.admission import TenantLimits
from gateway.backoff import full_jitter
from gateway.store.shared import StoreUnavailable

if TYPE_CHECKING:  # the redis package is an extra: quotas imports this module without it
    from gateway.store.connection import RedisConnection

__all__ = ["Grant", "LocalFigures", "SharedLimits", "shared_limits"]

log = structlog.get_logger("tenebra.limits")

DAY = 86_400.0
SPEND_TTL = 2 * 86_400  # seconds: a day's total outlives the day, for a replica late to roll


class LocalFigures(NamedTuple):
    """One replica's figures for one tenant (or the sum of the other replicas')."""

    in_flight: int = 0
    queued: int = 0
    connections: int = 0
    held: float = 0.0  # USD: catalogue prices of budgeted tasks in flight


class Grant(NamedTuple):
    tokens: int  # granted, 0..count
    wait: float  # seconds until the next token after this grant (inf: a rate of 0)


ZERO = LocalFigures()


def shared_limits(limits: TenantLimits, others: LocalFigures) -> TenantLimits:
    """The tenant's limits for this replica: its bounds less what the other replicas use now
    (never below 0); the weight is the tenant's."""
    if others is ZERO or (limits.max_in_flight is None and limits.max_queued is None):
        return limits
    in_flight, queued = limits.max_in_flight, limits.max_queued
    return TenantLimits(
        limits.weight,
        None if in_flight is None else max(0, in_flight - others.in_flight),
        None if queued is None else max(0, queued - others.queued),
    )


def utc_day(wall: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(wall))


# KEYS[1]: bucket; ARGV: count, rate (/s), burst, TTL (ms). Returns {granted, wait (µs, -1: never)}.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rate, burst = tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = burst
if state[1] then
  local elapsed = math.max(0, now - tonumber(state[2])) / 1000000
  tokens = math.min(burst, tonumber(state[1]) + elapsed * rate)
end
local granted = math.max(0, math.min(tonumber(ARGV[1]), math.floor(tokens)))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
  'stamp', string.format('%d', now))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local wait = 0
if tokens < 1 then
  if rate > 0 then wait = math.ceil((1 - tokens) / rate * 1000000) else wait = -1 end
end
return {granted, wait}
"""

# KEYS[1]: replicas, KEYS[2]: own figures, KEYS[3]: today's spend, KEYS[4]: the number of this
# replica's last spend flush added. ARGV[1]: own name (escaped), ARGV[2]: own figures, ARGV[3]:
# their TTL (ms), ARGV[4]: figures key prefix, ARGV[5]: spend TTL (s), ARGV[6]: this flush's
# number (0: none), then (spend key, tenant, USD) triples to add, once: a flush sent again after
# its answer was lost is not added twice. Returns {others' figures, today's spend}.
_SYNC = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('ZREM', KEYS[1], gone)
  redis.call('DEL', ARGV[4] .. gone)
end
local others = {}
for _, name in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if name ~= ARGV[1] then
    local figures = redis.call('GET', ARGV[4] .. name)
    if figures then others[#others + 1] = figures end
  end
end
local flush = tonumber(ARGV[6])
if flush > 0 and flush > tonumber(redis.call('GET', KEYS[4]) or '0') then
  for i = 7, #ARGV, 3 do
    redis.call('HINCRBYFLOAT', ARGV[i], ARGV[i + 1], ARGV[i + 2])
    redis.call('EXPIRE', ARGV[i], ARGV[5])
  end
  redis.call('SET', KEYS[4], ARGV[6], 'EX', ARGV[5])
end
return {others, redis.call('HGETALL', KEYS[3])}
"""

_ENCODE = msgspec.msgpack.Encoder()
_DECODE = msgspec.msgpack.Decoder(dict[str, tuple[int, int, int, float]])

Local = Callable[[], Mapping[str, LocalFigures]]


class SharedLimits:
    def __init__(
        self,
        redis: RedisConnection,
        name: str,
        *,
        local: Local = dict,
        interval: float = 0.25,
        ttl: float | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        from gateway.store.connection import key_part  # imports redis: an extra

        self.redis = redis
        self.name = name
        self.local = local  # this replica's own figures by tenant, read once per interval
        self.interval = interval
        # a replica's figures outlive a few missed refreshes, not a dead replica
        self.ttl = ttl if ttl is not None else max(2.0, 8 * interval)
        self._wall_clock = wall_clock
        self._key_part = key_part
        self._take = redis.script(_TAKE)
        self._sync = redis.script(_SYNC)
        self._replicas = redis.key("limits", "replicas")
        self._figures_prefix = redis.key("limits", "figures", "")
        self._own = self._figures_prefix + key_part(name)
        self._others: dict[str, LocalFigures] = {}
        self._spend_day = ""  # the UTC day of the totals last read
        self._spent: dict[str, float] = {}  # tenant -> USD, that day, all replicas, as last read
        self._pending: dict[str, dict[str, float]] = {}  # day -> tenant -> USD not flushed yet
        # a flush sent whose answer did not come: sent again as it is, under its number (Redis
        # adds a number once), before what was spent since goes in the next
        self._unconfirmed: dict[str, dict[str, float]] = {}
        self._flushes = 0  # the number of the last flush made
        self._flushed_key = redis.key("spend", "flushed", key_part(name))
        self.on_push: list[Callable[[], None]] = []  # run before each refresh (spend feeds)
        self.on_refresh: list[Callable[[], None]] = []  # run after each successful refresh
        self.healthy = False  # the last refresh got through
        self.refreshes = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._rng = random.Random()

    # ------------------------------------------------------------------ rate

    async def take(self, tenant: str, count: int, rate: float, burst: int) -> Grant:
        """Up to ``count`` tokens of the tenant's bucket (``rate`` per second, ``burst`` at
        once), shared by every replica. Raises ``StoreUnavailable``."""
        fill = burst / rate if rate > 0 else DAY  # a rate of 0 never refills: keep it a day
        ttl_ms = max(1000, math.ceil(min(2 * fill, DAY) * 1000))
        key = self.redis.key("rate", self._key_part(tenant))
        granted, wait = await self.redis.call(
            lambda: self._take(keys=[key], args=[count, repr(float(rate)), burst, ttl_ms])
        )
        return Grant(int(granted), math.inf if wait < 0 else wait / 1e6)

    # ------------------------------------------------------------------ views

    def others(self, tenant: str) -> LocalFigures:
        """The other live replicas' figures for ``tenant``, as of the last refresh."""
        return self._others.get(tenant, ZERO)

    def add_spend(self, tenant: str, amount: float) -> None:
        """This replica's provider cost for ``tenant``: counted today, flushed by the loop."""
        pending = self._pending.setdefault(utc_day(self._wall_clock()), {})
        pending[tenant] = pending.get(tenant, 0.0) + amount

    def spent_today(self, tenant: str) -> float:
        """Every replica's spend for ``tenant`` this UTC day: the last total read, plus what
        this replica has not flushed yet."""
        day = utc_day(self._wall_clock())
        spent = self._spent.get(tenant, 0.0) if day == self._spend_day else 0.0
        for amounts in (self._pending.get(day), self._unconfirmed.get(day)):
            if amounts:
                spent += amounts.get(tenant, 0.0)
        return spent

    def spend_by_tenant(self) -> dict[str, float]:
        day = utc_day(self._wall_clock())
        tenants = (
            set(self._pending.get(day, ()))
            | set(self._unconfirmed.get(day, ()))
            | (set(self._spent) if day == self._spend_day else set())
        )
        return {tenant: self.spent_today(tenant) for tenant in tenants}

    # ------------------------------------------------------------------ the loop

    async def refresh(self) -> None:
        """Write this replica's figures and spend, read the others'. Raises StoreUnavailable
        (what was to be flushed is kept for the next refresh). One at a time: the loop's, or a
        caller's while the loop is not running (tests)."""
        for feed in self.on_push:
            feed()
        figures = {tenant: tuple(f) for tenant, f in self.local().items() if f != ZERO}
        # a snapshot, numbered: what is added meanwhile stays pending, and the amounts keep
        # counting in spent_today until the total read back includes them
        if not self._unconfirmed and self._pending:
            self._unconfirmed, self._pending = self._pending, {}
            self._flushes += 1
        args: list[Any] = [
            self._key_part(self.name),
            _ENCODE.encode(figures),
            max(1, round(self.ttl * 1000)),
            self._figures_prefix,
            SPEND_TTL,
            self._flushes if self._unconfirmed else 0,
        ]
        for day, amounts in self._unconfirmed.items():
            key = self.redis.key("spend", day)
            for tenant, amount in amounts.items():
                args += [key, tenant, repr(amount)]
        today = utc_day(self._wall_clock())
        keys = [self._replicas, self._own, self.redis.key("spend", today), self._flushed_key]
        others, spent = await self.redis.call(lambda: self._sync(keys=keys, args=args))
        self._unconfirmed = {}
        self._others = _sum(others)
        self._spend_day = today
        self._spent = {_text(spent[i]): float(spent[i + 1]) for i in range(0, len(spent) - 1, 2)}
        self.refreshes += 1
        for hook in self.on_refresh:
            try:
                hook()
            except Exception:  # one hook's failure neither stops the others nor the loop
                log.exception("shared limits refresh hook failed")

    async def start(self) -> None:
        """A first refresh (a Redis that is away leaves the views empty), then the loop."""
        with contextlib.suppress(StoreUnavailable):
            await self._refresh_once()
        self._task = asyncio.create_task(self._refresh_forever(), name="shared-limits")

    async def stop(self) -> None:
        """Stop the loop, flush the spend, and take this replica's figures away at once."""
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.local = dict
        try:
            await self.refresh()
            if self._pending:  # what waited behind a flush sent again
                await self.refresh()
        except StoreUnavailable:
            return  # the figures lapse after the TTL; unflushed spend is lost with the process
        client, name = self.redis.client, self._key_part(self.name)

        async def leave() -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.zrem(self._replicas, name)
                pipe.delete(self._own)
                await pipe.execute()

        with contextlib.suppress(StoreUnavailable):
            await self.redis.call(leave)

    async def _refresh_once(self) -> None:
        try:
            await self.refresh()
        except StoreUnavailable as exc:
            if self.healthy:
                log.warning("shared limits not refreshed: redis unavailable", error=str(exc))
            self.healthy = False
            raise
        self.healthy = True

    async def _refresh_forever(self) -> None:
        delays = full_jitter(self.interval, self.ttl / 2, self._rng)
        while not self._stopping.is_set():
            try:
                await self._refresh_once()
                delays = full_jitter(self.interval, self.ttl / 2, self._rng)
                pause = self.interval
            except StoreUnavailable:
                pause = next(delays)
            except Exception:  # a hook or the local figures failed: never end the loop
                log.exception("shared limits refresh failed")
                pause = self.interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), pause)


def _text(data: bytes | str) -> str:
    return data.decode() if isinstance(data, bytes) else data


def _sum(blobs: list[bytes]) -> dict[str, LocalFigures]:
    """The other replicas' figures, tenant by tenant."""
    total: dict[str, list[float]] = {}
    for blob in blobs:
        try:
            figures = _DECODE.decode(blob)
        except msgspec.DecodeError:  # another version's, or damaged: not ours to count
            continue
        for tenant, row in figures.items():
            acc = total.setdefault(tenant, [0, 0, 0, 0.0])
            for i, value in enumerate(row):
                acc[i] += value
    return {
        tenant: LocalFigures(int(a[0]), int(a[1]), int(a[2]), a[3]) for tenant, a in total.items()
    }
