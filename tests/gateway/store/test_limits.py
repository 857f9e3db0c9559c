"""A tenant's limits shared by two replicas (gateway/store/limits.py) on a real redis-server."""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from gateway.admission import TenantLimits
from gateway.store.connection import RedisConnection
from gateway.store.limits import DAY, LocalFigures, SharedLimits, shared_limits
from gateway.store.shared import StoreUnavailable
from tests.gateway.conftest import Clock, until
from tests.gateway.store.test_connection import BUSY
from tests.redis_server import answers_ping, free_port, stop_redis
from tests.timing import MS

SECOND = 1000 * MS  # a test second: rates are per test second, so a slow run stretches them
INTERVAL = 50 * MS
TTL = 300 * MS

Make = Callable[..., SharedLimits]


@pytest.fixture
def wall() -> Clock:
    return Clock()  # 1970-01-01 00:16:40 UTC


@pytest.fixture
async def make(redis_url: str, wall: Clock) -> AsyncIterator[Make]:
    prefix = f"test-{uuid.uuid4().hex}"
    made: list[SharedLimits] = []

    def replica(name: str, url: str = redis_url, **options: object) -> SharedLimits:
        redis = RedisConnection.from_url(url, deadline=200 * MS, prefix=prefix)
        options.setdefault("interval", INTERVAL)
        options.setdefault("ttl", TTL)
        options.setdefault("wall_clock", wall)
        made.append(SharedLimits(redis, name, **options))  # type: ignore[arg-type]
        return made[-1]

    yield replica
    async with asyncio.timeout(5000 * MS):
        for limits in made:
            await limits.stop()
            await limits.redis.close()


async def test_the_rate_is_one_bucket_for_both_replicas(make: Make) -> None:
    a, b = make("a"), make("b")
    rate = 5 / SECOND
    started = time.monotonic()
    first = await asyncio.gather(a.take("t", 5, rate, 5), b.take("t", 5, rate, 5))
    assert sum(g.tokens for g in first) == 5  # 10 asked, the burst given once
    refused = min(first, key=lambda g: g.tokens)
    assert 0 < refused.wait <= SECOND / 5
    await asyncio.sleep(2 * SECOND / 5)
    later = await a.take("t", 10, rate, 5)
    elapsed = time.monotonic() - started
    assert 2 <= later.tokens <= math.floor(elapsed * rate)  # refilled at the rate, no faster
    assert (await b.take("other", 3, rate, 5)).tokens == 3  # each tenant its own bucket


async def test_concurrent_takes_never_pass_the_burst(make: Make) -> None:
    a, b = make("a"), make("b")
    rate = 0.001  # no refill to speak of during the test
    grants = await asyncio.gather(
        *(replica.take("t", 2, rate, 7) for replica in (a, b) for _ in range(20))
    )
    assert sum(g.tokens for g in grants) == 7
    assert (await a.take("t", 1, 0.0, 7)).wait == math.inf  # a rate of 0 never refills


async def test_each_replica_sees_the_others_figures_until_they_lapse(make: Make) -> None:
    figures = {"t": LocalFigures(in_flight=3, queued=2, connections=1, held=0.5)}
    a = make("a", local=lambda: figures)
    b, c = make("b"), make("c", local=lambda: {"t": LocalFigures(1, 1, 1, 0.25)})
    refreshed: list[int] = []
    b.on_refresh.append(lambda: refreshed.append(b.refreshes))
    for replica in (a, b, c):
        await replica.start()
    await until(lambda: b.others("t") == LocalFigures(4, 3, 2, 0.75))
    assert refreshed  # the hook the pool's reconfigure hangs on
    assert a.others("t") == LocalFigures(1, 1, 1, 0.25)  # not its own
    assert b.others("nobody") == LocalFigures()
    limits = shared_limits(TenantLimits(2.0, 5, 4), b.others("t"))
    assert limits == TenantLimits(2.0, 1, 1)
    assert shared_limits(TenantLimits(1.0, 3, None), b.others("t")) == TenantLimits(1.0, 0, None)
    figures["t"] = LocalFigures(in_flight=1)
    await until(lambda: b.others("t").in_flight == 2)
    # "a" dies (its loop stops without a word): its figures lapse after the TTL
    assert a._task is not None
    a._task.cancel()
    await asyncio.gather(a._task, return_exceptions=True)
    await until(lambda: b.others("t") == LocalFigures(1, 1, 1, 0.25))
    # "c" stops cleanly: gone at once, not after the TTL
    await c.stop()
    await until(lambda: b.others("t") == LocalFigures(), within=TTL * 0.9)


async def test_spend_is_counted_by_every_replica_per_utc_day(make: Make, wall: Clock) -> None:
    a, b = make("a"), make("b")
    await a.start()
    await b.start()
    a.add_spend("t", 0.25)
    assert a.spent_today("t") == pytest.approx(0.25)  # its own at once, before any flush
    a.add_spend("t", 0.5)
    await until(lambda: b.spent_today("t") == pytest.approx(0.75))
    b.add_spend("t", 0.125)
    await until(lambda: a.spent_today("t") == pytest.approx(0.875))
    assert b.spend_by_tenant() == {"t": pytest.approx(0.875)}
    wall.advance(DAY - 1000.0)  # 00:00 UTC: a new day, nothing spent yet
    assert a.spent_today("t") == 0.0
    b.add_spend("t", 1.0)
    await until(lambda: a.spent_today("t") == pytest.approx(1.0))
    key = a.redis.key("spend", "19700101")  # yesterday's total is kept, for two days
    kept = await a.redis.client.hget(key, "t")
    assert kept is not None and float(kept) == pytest.approx(0.875)
    assert 0 < await a.redis.client.ttl(key) <= 2 * DAY


async def test_a_stopping_replica_flushes_its_spend(make: Make) -> None:
    a, b = make("a", interval=10 * SECOND), make("b")
    await a.start()
    a.add_spend("t", 0.5)
    await a.stop()
    await b.refresh()
    assert b.spent_today("t") == pytest.approx(0.5)


async def test_spend_whose_answer_came_late_is_added_once(make: Make, redis_url: str) -> None:
    """Redis busy past the deadline while a flush of spend waits: the flush fails, yet Redis
    ran it; sent again, it is not added a second time (the tenant would be refused early,
    every replica's budget counting the spend twice until the day ends)."""
    a = make("a", interval=10 * SECOND)
    await a.refresh()  # connected, its script known to Redis: as on a replica that ran a while
    a.add_spend("t", 1.0)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        stall = asyncio.ensure_future(admin.eval(BUSY, 0, round(4 * 200 * MS * 1e6)))
        await asyncio.sleep(30 * MS)  # the busy script runs
        with pytest.raises(StoreUnavailable):
            await a.refresh()
        await stall
        a.add_spend("t", 0.25)  # spent meanwhile: the next flush's
        await a.refresh()  # the lost one again (not added twice)
        await a.refresh()  # then what was spent since
    finally:
        await admin.aclose()
    assert a.spent_today("t") == pytest.approx(1.25)
    b = make("b")
    await b.refresh()
    assert b.spent_today("t") == pytest.approx(1.25)


# --------------------------------------------------------------------------- Redis away


def spawn_redis(binary: str, port: int) -> subprocess.Popen[bytes]:
    """A redis-server on ``port``, where a replica already tried to reach one."""
    return subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def test_redis_away_then_back(make: Make) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    figures = {"t": LocalFigures(in_flight=1)}
    a = make("a", url, local=lambda: figures)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await a.take("t", 1, 1.0, 1)
    assert time.monotonic() - started < 2 * a.redis.deadline + 200 * MS
    await a.start()  # does not raise: the loop keeps trying
    a.add_spend("t", 0.5)
    await asyncio.sleep(3 * INTERVAL)
    assert a._task is not None and not a._task.done()
    assert not a.healthy and a.refreshes == 0
    assert a.spent_today("t") == pytest.approx(0.5)  # kept, to be flushed later
    server = spawn_redis(binary, port)
    try:
        await until(lambda: answers_ping(port), within=5000 * MS)
        await until(lambda: a.healthy, within=5000 * MS)
        b = make("b", url)
        await b.refresh()
        assert b.others("t") == LocalFigures(in_flight=1)
        assert b.spent_today("t") == pytest.approx(0.5)  # flushed once, not twice
        assert (await b.take("t", 2, 1.0, 1)).tokens == 1
        await a.stop()
        await b.stop()
    finally:
        stop_redis(server)
