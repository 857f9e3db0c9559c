"""The replica registry and the bus (gateway/cluster.py) against a real redis-server."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.cluster import Cluster
from gateway.store.connection import RedisConnection
from tests.gateway.conftest import until
from tests.timing import MS

LEASE = 300 * MS

Make = Callable[[str], Cluster]


@pytest.fixture
async def make(redis_url: str) -> AsyncIterator[Make]:
    prefix = f"test-{uuid.uuid4().hex}"
    made: list[Cluster] = []

    def cluster(name: str) -> Cluster:
        redis = RedisConnection.from_url(redis_url, deadline=500 * MS, prefix=prefix)
        made.append(Cluster(redis, name, LEASE))
        return made[-1]

    yield cluster
    async with asyncio.timeout(5000 * MS):
        for c in made:
            await c.stop()
            await c.redis.close()


async def kill(cluster: Cluster) -> None:
    """As SIGKILL would: the loops stop, the lease is left to lapse."""
    for task in cluster._tasks:
        task.cancel()
    await asyncio.gather(*cluster._tasks, return_exceptions=True)
    cluster._tasks = []


async def test_a_dead_replica_is_taken_over_once(make: Make) -> None:
    a, b, c = make("a"), make("b"), make("c")
    taken: list[tuple[str, str]] = []
    for survivor in (b, c):
        survivor.takeovers.append(functools.partial(_record, taken, survivor.name))
    for replica in (a, b, c):
        await replica.start()
    assert sorted(await b.alive()) == ["a", "b", "c"]
    assert a.healthy
    await kill(a)
    await until(lambda: len(taken) == 1)
    await asyncio.sleep(3 * LEASE)  # nobody takes it over again
    assert [dead for _, dead in taken] == ["a"]
    assert sorted(await b.alive()) == ["b", "c"]


async def _record(taken: list[tuple[str, str]], taker: str, dead: str) -> None:
    """A takeover hook that notes who took over whom."""
    taken.append((taker, dead))


async def test_a_replica_that_stops_is_not_taken_over(make: Make) -> None:
    a, b = make("a"), make("b")
    taken: list[tuple[str, str]] = []
    b.takeovers.append(functools.partial(_record, taken, "b"))
    await a.start()
    await b.start()
    await a.stop()
    await asyncio.sleep(4 * LEASE)
    assert taken == []
    assert await b.alive() == ["b"]


async def test_the_bus_carries_messages_in_order(make: Make) -> None:
    a, b = make("a"), make("b")
    got: list[bytes] = []
    b.on("frame", got.append)
    await a.start()
    await b.start()
    for _ in range(50):  # the subscription may take a moment: the first publish tells
        if await a.send("b", "frame", b"ping"):
            break
        await asyncio.sleep(10 * MS)
    for i in range(100):
        assert await a.send("b", "frame", str(i).encode())
    assert await a.send("b", "unknown kind", b"x")  # delivered, and dropped by b
    await until(lambda: len(got) >= 101)
    assert got[1:] == [str(i).encode() for i in range(100)]
    assert not await a.send("nobody", "frame", b"lost")  # no listener: the caller knows
