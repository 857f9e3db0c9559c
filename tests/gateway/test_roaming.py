"""The session directory of replicas on a real redis-server (gateway/roaming.py): what it
holds, for how long, and how its changes travel. Resumption across replicas end to end is in
tests/gateway/test_replication.py and tests/cluster/."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

import gateway.roaming
import gateway.store.pipe
from gateway.provider.server import LocalProvider
from tests.compiled import pure_python_only
from tests.gateway.conftest import ALPHA, connect, running, shared_config, until
from tests.timing import MS

DAY_MS = 86_400_000


@pytest.fixture
async def replica(provider: LocalProvider, redis_url: str) -> AsyncIterator[Any]:
    async with running(shared_config(provider, redis_url, f"test-{uuid.uuid4().hex}", "a")) as a:
        yield a


async def entry(gateway: Any, session_uuid: str) -> tuple[dict[bytes, bytes], int]:
    client = gateway.redis.client
    key = gateway.redis.key("session", session_uuid)
    return await client.hgetall(key), await client.pttl(key)


async def in_directory(gateway: Any, session_uuid: str) -> None:
    """Until the session's entry names ``gateway``: the directory is written just after the
    auth reply, so a resume elsewhere a moment sooner would not find it."""
    name: bytes = gateway.clients.roaming.replica.encode()

    async def held() -> bool:
        return (await entry(gateway, session_uuid))[0].get(b"replica") == name

    await eventually(held)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5000 * MS) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(10 * MS)


async def test_a_session_is_in_the_directory_while_held_then_for_its_resume_window(
    replica: Any, http: aiohttp.ClientSession
) -> None:
    on_a = await connect(http, replica.url)
    session = await on_a.auth(ALPHA)

    async def held() -> bool:
        fields, ttl = await entry(replica, session)
        name = replica.clients.roaming.replica.encode()
        return fields == {b"tenant": b"alpha", b"replica": name} and ttl > DAY_MS - 60_000

    await eventually(held)
    await on_a.ws.close()
    window: int = round(replica.config.server.resume_window * 1000)

    async def detached() -> bool:
        _, ttl = await entry(replica, session)
        return 0 < ttl <= window

    await eventually(detached)


@pure_python_only(gateway.store.pipe)
async def test_a_burst_of_sessions_goes_in_one_round_trip_in_order(replica: Any) -> None:
    """A fleet connecting again: every change of a loop turn in one round trip, each session's
    in the order made (opened, attached, detached)."""
    roaming, writes = replica.clients.roaming, replica.redis.writes
    exchanges = 0
    exchange = writes.exchange

    async def counted(data: bytes, replies: int, built: int = -1) -> list[Any]:
        nonlocal exchanges
        exchanges += 1
        answers: list[Any] = await exchange(data, replies, built)
        return answers

    writes.exchange = counted
    sessions = [replica.clients.table.open("alpha") for _ in range(300)]
    for session in sessions:
        roaming.opened(session)
        roaming.attached(session)
        roaming.detached(session)
    await until(lambda: roaming._updating is None)
    assert exchanges == 1
    window: int = round(replica.config.server.resume_window * 1000)
    for session in sessions:
        fields, ttl = await entry(replica, session.uuid)
        assert fields[b"replica"] == roaming.replica.encode()
        assert 0 < ttl <= window


async def test_changes_past_the_bound_are_dropped_newest_first_and_said(
    replica: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.roaming, "MAX_DIRECTORY_UPDATES", 3)
    roaming = replica.clients.roaming
    sessions = [replica.clients.table.open("alpha") for _ in range(5)]
    with capture_logs() as logs:
        for session in sessions:
            roaming.opened(session)
        await until(lambda: roaming._updating is None)
    kept = [bool((await entry(replica, s.uuid))[0]) for s in sessions]
    assert kept == [True, True, True, False, False]
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["dropped"] == 2 and warning["bound"] == 3


@pure_python_only(gateway.store.pipe)
async def test_redis_away_leaves_the_directory_behind_and_nothing_else(
    replica: Any, http: aiohttp.ClientSession
) -> None:
    """The change is logged and lost (a session missing from the directory is not resumed
    elsewhere); the socket is served all the same."""
    roaming, writes = replica.clients.roaming, replica.redis.writes

    async def away(data: bytes, replies: int, built: int = -1) -> list[Any]:
        raise ConnectionError("redis: gone")

    writes.exchange = away
    with capture_logs() as logs:
        on_a = await connect(http, replica.url)
        session = await on_a.auth(ALPHA)
        await until(lambda: roaming._updating is None)
    assert any(e["event"] == "session directory not updated" for e in logs)
    assert (await entry(replica, session))[0] == {}


async def test_a_late_change_leaves_a_session_another_replica_holds_alone(replica: Any) -> None:
    """Another replica adopted the session (its entry names that one, for its own lifetime): a
    change this replica makes late (a socket that closed after the move, a batch sent again)
    neither shortens the entry nor takes it back."""
    roaming = replica.clients.roaming
    session = replica.clients.table.open("alpha")
    roaming.opened(session)
    await until(lambda: roaming._updating is None)
    client, key = replica.redis.client, replica.redis.key("session", session.uuid)
    await client.hset(key, "replica", "b")  # as b's adoption writes it
    await client.pexpire(key, DAY_MS)
    roaming.detached(session)
    roaming.opened(session)
    await until(lambda: roaming._updating is None)
    fields, ttl = await entry(replica, session.uuid)
    assert fields[b"replica"] == b"b" and ttl > DAY_MS - 60_000


async def test_a_session_handed_on_is_not_detached_here(
    replica: Any, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket of a session that moved to another replica closes here later: the entry is
    that replica's to keep, so no change is made for it."""
    on_a = await connect(http, replica.url)
    session_uuid = await on_a.auth(ALPHA)
    roaming = replica.clients.roaming
    changes: list[tuple[bytes, str]] = []
    monkeypatch.setattr(roaming, "_update", lambda kind, key, *_: changes.append((kind, key)))
    session = replica.clients.table.sessions[session_uuid]
    session.forward = lambda frame: None  # what "moved" makes of it
    await on_a.ws.close()
    await until(lambda: session.connection is None)
    await asyncio.sleep(50 * MS)  # the socket's cleanup is done
    assert changes == []


# ---------------------------------------------------------------------------- adoption


async def test_two_resumes_racing_on_one_replica_make_one_session(
    pair: tuple[Any, Any], http: aiohttp.ClientSession
) -> None:
    """Both adopt the session A held; the second finds it adopted when its answer comes, and
    the tenant's count of sessions is one (it was two, for good: a place of
    ``max_sessions_per_tenant`` lost per race)."""
    a, b = pair
    on_a = await connect(http, a.url)
    session = await on_a.auth(ALPHA)
    await in_directory(a, session)
    await on_a.ws.close()
    one, two = await connect(http, b.url), await connect(http, b.url)
    auth = {"taskType": "authentication", "apiKey": ALPHA, "connectionSessionUUID": session}
    await asyncio.gather(one.send(auth), two.send(auth))
    # both resumed it (the newest socket holds it, and takes what the other had not sent of it)
    await until(lambda: sum(c.session is not None for c in b.clients.connections) == 2)
    table = b.clients.table
    assert (
        table._counts.get("alpha") == 1 == sum(s.tenant == "alpha" for s in table.sessions.values())
    )


async def test_two_resumes_racing_on_one_replica_each_get_their_own_reply(
    pair: tuple[Any, Any], http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both sockets adopt the session A held, and go on to their authentication in one loop
    turn (held together between the steps): each one's next frame is its own reply, and each
    answers a ping next, the one the session moved away from included. The first one's reply
    once moved to the second with the session: one socket got two, the other none."""
    a, b = pair
    on_a = await connect(http, a.url)
    session = await on_a.auth(ALPHA)
    await in_directory(a, session)
    await on_a.ws.close()
    roaming = b.clients.roaming
    adopt = roaming.adopt
    entered: list[None] = []
    adopted: list[None] = []
    both_entered, both_adopted = asyncio.Event(), asyncio.Event()

    async def together(arrived: list[None], both: asyncio.Event) -> None:
        arrived.append(None)
        if len(arrived) == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 5000 * MS)

    async def adopt_together(*args: Any) -> bool:
        await together(entered, both_entered)  # neither has adopted it yet
        result: bool = await adopt(*args)
        await together(adopted, both_adopted)
        return result

    monkeypatch.setattr(roaming, "adopt", adopt_together)
    one, two = await connect(http, b.url), await connect(http, b.url)
    auth = {"taskType": "authentication", "apiKey": ALPHA, "connectionSessionUUID": session}
    await asyncio.gather(one.send(auth), two.send(auth))
    for client in (one, two):
        reply = await client.recv(2000 * MS)
        assert reply == {"data": [{"taskType": "authentication", "connectionSessionUUID": session}]}
    for client in (one, two):
        await client.send({"taskType": "ping"})
        assert await client.recv(2000 * MS) == {"data": [{"taskType": "ping", "pong": True}]}


async def test_a_session_back_from_another_replica_resumes_whatever_its_old_window(
    pair: tuple[Any, Any], http: aiohttp.ClientSession
) -> None:
    """A handed the session on long ago (past ``resume_window`` by A's own clock, before A's
    sweep came to it): back on A, the client resumes it, not a new one."""
    a, b = pair
    on_a = await connect(http, a.url)
    session = await on_a.auth(ALPHA)
    await in_directory(a, session)
    await on_a.ws.close()
    on_b = await connect(http, b.url)
    assert await on_b.auth(ALPHA, session) == session
    held = a.clients.table.sessions[session]
    await until(lambda: held.forward is not None)
    a.clients.table.detached(held, a.clock() - 2 * a.config.server.resume_window)
    back = await connect(http, a.url)
    assert await back.auth(ALPHA, session) == session


async def test_a_resume_that_will_be_refused_leaves_the_session_where_it_is(
    pair: tuple[Any, Any], http: aiohttp.ClientSession
) -> None:
    """B refuses the address (too many failed keys): its answer is an error, and the session
    stays with A's open socket, which still gets its frames."""
    a, b = pair
    on_a = await connect(http, a.url)
    session = await on_a.auth(ALPHA)
    await in_directory(a, session)
    held = a.clients.table.sessions[session]
    on_b = await connect(http, b.url)
    b.clients.throttle.refused = lambda address: 5.0  # from now on
    await on_b.send(
        {"taskType": "authentication", "apiKey": ALPHA, "connectionSessionUUID": session}
    )
    assert (await on_b.recv())["errors"][0]["code"] == "rateLimitExceeded"
    await asyncio.sleep(200 * MS)  # what an adoption would have set off has happened
    assert held.forward is None and held.connection is not None
    fields, _ = await entry(a, session)
    assert fields[b"replica"] == a.clients.roaming.replica.encode()


def probe(n: int) -> bytes:
    return json.dumps({"data": [{"taskType": "imageInference", "n": n}]}).encode()


async def gone_from(gateway: Any, http: aiohttp.ClientSession) -> tuple[str, Any]:
    """A session opened on ``gateway``, in its directory, whose client then went away: its
    UUID, and the session ``gateway`` keeps for it."""
    client = await connect(http, gateway.url)
    session_uuid = await client.auth(ALPHA)
    await in_directory(gateway, session_uuid)
    held = gateway.clients.table.sessions[session_uuid]
    await client.ws.close()
    await until(lambda: held.connection is None)
    return session_uuid, held


def a_result_right_after_adopting(
    monkeypatch: pytest.MonkeyPatch, gateway: Any, result: Callable[[], None]
) -> None:
    """``gateway``'s next adoption of a session is followed at once by ``result`` (a task of
    the session's there has one), before the replica that held it hands anything over."""
    roaming = gateway.clients.roaming
    adopt = roaming.adopt

    async def adopt_then_a_result(*args: Any) -> bool:
        adopted: bool = await adopt(*args)
        result()
        return adopted

    monkeypatch.setattr(roaming, "adopt", adopt_then_a_result)


async def test_a_replica_that_takes_a_session_holds_its_own_frames_behind_the_missed_ones(
    pair: tuple[Any, Any], http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kept frame 1 for the client while it was away; the client resumes on B, and a task on
    B has a result at once (frame 2): the client gets 1, then 2."""
    a, b = pair
    session, held = await gone_from(a, http)
    held.push(probe(1))
    a_result_right_after_adopting(
        monkeypatch, b, lambda: b.clients.table.sessions[session].push(probe(2))
    )
    on_b = await connect(http, b.url)
    assert await on_b.auth(ALPHA, session) == session
    got = [(await on_b.recv())["data"][0]["n"] for _ in range(2)]
    assert got == [1, 2]


async def test_a_session_back_on_its_first_replica_gets_what_the_other_kept_first(
    pair: tuple[Any, Any], http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A -> B -> A: B kept frame 1 (of A's task, forwarded to it) for the client; back on A,
    A's task's next result (frame 2) waits for B to hand frame 1 over."""
    a, b = pair
    session, on_a_session = await gone_from(a, http)
    on_b = await connect(http, b.url)
    assert await on_b.auth(ALPHA, session) == session
    await until(lambda: on_a_session.forward is not None)
    await in_directory(b, session)
    on_b_session = b.clients.table.sessions[session]
    await on_b.ws.close()
    await until(lambda: on_b_session.connection is None)
    on_a_session.push(probe(1))  # A's task: forwarded to B, which keeps it for the client
    await until(lambda: len(on_b_session.buffer) == 1)
    a_result_right_after_adopting(monkeypatch, a, lambda: on_a_session.push(probe(2)))
    back = await connect(http, a.url)
    assert await back.auth(ALPHA, session) == session
    got = [(await back.recv())["data"][0]["n"] for _ in range(2)]
    assert got == [1, 2]


async def test_the_wait_of_an_earlier_move_does_not_end_a_later_ones(
    replica: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session taken over twice within the wait: the first move's timer must not release
    what the second move holds."""
    roaming = replica.clients.roaming
    session = replica.clients.table.open("alpha")
    monkeypatch.setattr(gateway.roaming, "HANDOVER_WAIT", 200 * MS)
    roaming._await_handover(session.uuid)
    session.handed_over()  # handed over (as the mark would), the first timer still set
    monkeypatch.setattr(gateway.roaming, "HANDOVER_WAIT", 20000 * MS)
    roaming._await_handover(session.uuid)  # taken over again
    await asyncio.sleep(400 * MS)
    assert session.awaiting is not None
