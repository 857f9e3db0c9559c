"""The replica registry and the bus (gateway/cluster.py) against a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

import pytest

from gateway.cluster import Cluster
from gateway.store.connection import RedisConnection
from tests.gateway.conftest import until
from tests.timing import MS

LEASE = 300 * MS
DEADLINE = 500 * MS


class Proxy:
    """A TCP proxy between one replica and redis-server: ``cut`` closes its connections and
    closes new ones at once (Redis gone, for that replica only); ``restore`` lets them through."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.cut = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def sever(self) -> None:
        self.cut = True
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    def restore(self) -> None:
        self.cut = False

    async def close(self) -> None:
        self.sever()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.close()
            return
        try:
            upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, upstream}
        await asyncio.gather(self._pipe(reader, upstream), self._pipe(upstream_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()
        self._writers.discard(writer)


class Make(Protocol):
    def __call__(self, name: str, proxy: Proxy | None = None) -> Cluster: ...


@pytest.fixture
async def make(redis_url: str) -> AsyncIterator[Make]:
    prefix = f"test-{uuid.uuid4().hex}"
    made: list[Cluster] = []

    def cluster(name: str, proxy: Proxy | None = None) -> Cluster:
        url = redis_url if proxy is None else f"redis://127.0.0.1:{proxy.port}/0"
        redis = RedisConnection.from_url(url, deadline=DEADLINE, prefix=prefix)
        made.append(Cluster(redis, name, LEASE))
        return made[-1]

    yield cluster
    async with asyncio.timeout(10000 * MS):
        for c in made:
            await c.stop()
            await c.redis.close()


@pytest.fixture
async def proxies(redis_url: str) -> AsyncIterator[Callable[[], Proxy]]:
    port = urlsplit(redis_url).port
    assert port is not None
    made: list[Proxy] = []

    def proxy() -> Proxy:
        made.append(Proxy(port))
        return made[-1]

    yield proxy
    for p in made:
        await p.close()


async def kill(cluster: Cluster) -> None:
    """As SIGKILL (or SIGSTOP) would: the loops stop, the lease is left to lapse."""
    tasks = [*cluster._tasks, *([cluster._pulse] if cluster._pulse is not None else [])]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    cluster._tasks = []


def settled(cluster: Cluster) -> float:
    """Long enough after a replica registered for it to take over the dead."""
    return cluster.lease + 2 * cluster.redis.deadline + LEASE


async def _record(taken: list[tuple[str, str]], taker: str, dead: str) -> None:
    """A takeover hook that notes who took over whom."""
    taken.append((taker, dead))


async def started_watched(*replicas: Cluster) -> tuple[list[tuple[str, str]], list[str]]:
    """``replicas`` started, each noting whom it takes over and whether it was fenced."""
    taken: list[tuple[str, str]] = []
    fenced: list[str] = []
    for replica in replicas:
        replica.takeovers.append(functools.partial(_record, taken, replica.name))
        replica.on_fenced.append(functools.partial(fenced.append, replica.name))
        await replica.start()
    return taken, fenced


async def started_pair(make: Make) -> tuple[Cluster, Cluster, list[tuple[str, str]]]:
    """Replicas a and b, started; whom b takes over is noted in the list."""
    a, b = make("a"), make("b")
    taken: list[tuple[str, str]] = []
    b.takeovers.append(functools.partial(_record, taken, "b"))
    await a.start()
    await b.start()
    return a, b, taken


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


async def test_a_replica_that_stops_is_not_taken_over(make: Make) -> None:
    a, b, taken = await started_pair(make)
    await a.stop()
    await asyncio.sleep(4 * LEASE)
    assert taken == []
    assert await b.alive() == ["b"]


async def test_a_replica_that_stops_handing_over_is_taken_over(make: Make) -> None:
    a, b, taken = await started_pair(make)
    await asyncio.sleep(settled(b))
    await a.stop(hand_over=True)
    await until(lambda: taken == [("b", "a")], within=5000 * MS)
    assert await b.alive() == ["b"]


async def test_an_outage_longer_than_the_lease_takes_nobody_over(
    make: Make, proxies: Callable[[], Proxy]
) -> None:
    """Redis gone for both replicas past their leases: when it is back, the first to renew sees
    the other's lease ended, yet the other is alive; it must not take it over."""
    to_a, to_b = proxies(), proxies()
    await to_a.start()
    await to_b.start()
    a, b = make("a", to_a), make("b", to_b)
    taken, fenced = await started_watched(a, b)
    await asyncio.sleep(settled(a))  # both could take over a dead replica now
    to_a.sever()
    to_b.sever()
    await until(lambda: not a.healthy and not b.healthy, within=5000 * MS)
    await asyncio.sleep(3 * LEASE)
    to_a.restore()  # a is back first, b a moment later
    await until(lambda: a.healthy, within=5000 * MS)
    await asyncio.sleep(LEASE / 3)
    to_b.restore()
    await until(lambda: b.healthy, within=5000 * MS)
    await asyncio.sleep(2 * settled(a))
    assert taken == []
    assert fenced == []
    assert a.healthy and b.healthy
    assert sorted(await a.alive()) == ["a", "b"]


async def test_a_replica_taken_over_while_alive_is_fenced(
    make: Make, proxies: Callable[[], Proxy]
) -> None:
    """a alone loses Redis past its lease: b takes it over, and a, back, learns it owns nothing
    any more instead of renewing as if nothing had happened."""
    to_a = proxies()
    await to_a.start()
    a, b = make("a", to_a), make("b")
    taken, fenced = await started_watched(a, b)
    await asyncio.sleep(settled(b))
    to_a.sever()
    await until(lambda: taken == [("b", "a")], within=5000 * MS)
    to_a.restore()
    await until(lambda: fenced == ["a"], within=5000 * MS)
    assert a.fenced and not a.healthy
    await until(lambda: all(task.done() for task in a._tasks), within=2000 * MS)
    assert await b.alive() == ["b"]  # a did not bring its lease back
    await a.stop(hand_over=True)  # a fenced replica hands nothing over: it holds nothing
    await asyncio.sleep(3 * LEASE)
    assert taken == [("b", "a")]
    assert await b.alive() == ["b"]
    assert b.healthy and not b.fenced

    again = make("a")  # a new process under that name holds nothing: it is not fenced
    again.on_fenced.append(functools.partial(fenced.append, "again"))
    await again.start()
    await asyncio.sleep(2 * LEASE)
    assert again.healthy and not again.fenced
    assert sorted(await b.alive()) == ["a", "b"]
    assert fenced == ["a"]


async def test_a_lease_that_ran_out_unseen_is_in_doubt_until_a_renewal_answers(make: Make) -> None:
    """A stall (SIGSTOP, a paused VM, a blocked loop) stops a replica with its lease: woken, it
    cannot know whether another took it over meanwhile. Its lease is in doubt (its frames
    wait: gateway.replication) until a renewal sent after the lease ran out answers: fenced,
    it stays so."""
    a, b, taken = await started_pair(make)
    await asyncio.sleep(settled(b))
    assert not a.lease_in_doubt()
    await kill(a)  # stalled: its loops do nothing, its clock runs on
    await until(lambda: taken == [("b", "a")], within=5000 * MS)
    assert a.lease_in_doubt()  # woken: nothing heard since its lease ran out
    await a._renew_once()
    assert a.fenced and a.lease_in_doubt()


async def test_a_lease_that_ran_out_with_redis_away_is_not_in_doubt(
    make: Make, proxies: Callable[[], Proxy]
) -> None:
    """Redis away past the lease, the replica running on: its lease is never in doubt (frames
    go, as they go while Redis is away: a stall is what leaves it in doubt), though not
    renewed. Frames once stopped from the moment the lease ran out until a renewal tried
    after it had failed: a third of a lease and a call's deadline."""
    to_a = proxies()
    await to_a.start()
    a = make("a", to_a)
    await a.start()
    to_a.sever()
    seen: set[bool] = set()
    deadline = time.monotonic() + 3 * LEASE
    while time.monotonic() < deadline:  # past the lease, and past a renewal after it
        seen.add(a.lease_in_doubt())
        await asyncio.sleep(LEASE / 30)
    assert seen == {False}
    assert not a.healthy


async def test_a_long_takeover_does_not_hold_up_the_lease(make: Make) -> None:
    """A takeover that lasts longer than the lease (and than its lock's first hold): the taker
    renews meanwhile, nobody takes it over, and nobody takes the dead one over twice."""
    a, b, c = make("a"), make("b"), make("c")
    taken: list[tuple[str, str]] = []
    finished: list[str] = []

    async def slow(taker: str, dead: str) -> None:
        taken.append((taker, dead))
        await asyncio.sleep(8 * LEASE)
        finished.append(dead)

    for survivor in (b, c):
        survivor.takeovers.append(functools.partial(slow, survivor.name))
    for replica in (a, b, c):
        await replica.start()
    assert 3 * LEASE + 2 * DEADLINE < 8 * LEASE  # longer than the lock's first hold
    await asyncio.sleep(settled(b))
    await kill(a)
    await until(lambda: finished == ["a"], within=10000 * MS)
    await asyncio.sleep(2 * LEASE)
    assert [dead for _, dead in taken] == ["a"]
    assert sorted(await b.alive()) == ["b", "c"]
    assert b.healthy and c.healthy


async def test_takeovers_run_one_at_a_time(make: Make) -> None:
    a, b, c = make("a"), make("b"), make("c")
    taken: list[str] = []
    running: list[str] = []
    most = 0

    async def hook(dead: str) -> None:
        nonlocal most
        running.append(dead)
        most = max(most, len(running))
        await asyncio.sleep(2 * LEASE)
        running.remove(dead)
        taken.append(dead)

    c.takeovers.append(hook)
    for replica in (a, b, c):
        await replica.start()
    await asyncio.sleep(settled(c))
    await kill(a)
    await kill(b)
    await until(lambda: len(taken) == 2, within=10000 * MS)
    await asyncio.sleep(2 * LEASE)
    assert sorted(taken) == ["a", "b"]
    assert most == 1
    assert await c.alive() == ["c"]


async def test_a_replica_whose_takeovers_are_paused_takes_nobody_over(make: Make) -> None:
    a, b, taken = await started_pair(make)
    await asyncio.sleep(settled(b))
    b.pause_takeovers()  # b begins to shut down
    await kill(a)
    await asyncio.sleep(6 * LEASE)
    assert taken == []
    assert b.healthy


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


@pytest.mark.parametrize("fault", ["raises", "stalls"])
async def test_the_bus_outlives_a_failed_or_stalled_read(
    make: Make, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """A read from the subscription that raises something unexpected, or never returns: the
    bus reconnects and carries the next messages."""
    a, b = make("a"), make("b")
    got: list[bytes] = []
    b.on("frame", got.append)
    original = b.redis.client.pubsub
    faults = [fault]

    def pubsub(**options: Any) -> Any:
        subscription = original(**options)
        read = subscription.get_message

        async def get_message(**kwargs: Any) -> Any:
            if faults:
                if faults.pop() == "raises":
                    raise RuntimeError("not a Redis error")
                await asyncio.Event().wait()  # never set
            return await read(**kwargs)

        monkeypatch.setattr(subscription, "get_message", get_message)
        return subscription

    monkeypatch.setattr(b.redis.client, "pubsub", pubsub)
    await a.start()
    await b.start()
    deadline = time.monotonic() + 5000 * MS
    while not got:  # a message sent while the read stalls is lost: pub/sub is at most once
        assert time.monotonic() < deadline, "the bus did not come back"
        await a.send("b", "frame", b"ping")
        await asyncio.sleep(20 * MS)
    assert faults == []
