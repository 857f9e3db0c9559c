"""The shared task store's contract (gateway/store/shared.py), one suite for both stores: in
memory and in a real redis-server (tests/gateway/store/conftest.py). Two "replicas" are two store
objects over one backend: two Redis clients with their own connections, or one memory store."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.store.base import Delivery, TaskRecord, TaskState
from gateway.store.memory_shared import MemorySharedTasks
from gateway.store.redis import RedisSharedTasks
from gateway.store.shared import SharedTasks, StoreUnavailable
from protocol.codec import decode_client_frame, encode_tasks
from protocol.frames import ErrorItem, ImageResult, ImageTask
from protocol.models import default_catalogue
from tests.protocol.conftest import image_task
from tests.timing import MS

Replica = Callable[[], SharedTasks]  # another store object over the same backend


def record(tenant: str, task_uuid: str | None = None, upstream: str | None = None) -> TaskRecord:
    body = image_task() if task_uuid is None else image_task(taskUUID=task_uuid)
    [task] = decode_client_frame(encode_tasks([body]), default_catalogue())
    assert isinstance(task, ImageTask)
    return TaskRecord(
        tenant=tenant, task=task, upstream_uuid=upstream or str(uuid.uuid4()), created=1.5
    )


@pytest.fixture(params=["memory", "redis"])
async def replica(request: pytest.FixtureRequest) -> AsyncIterator[Replica]:
    """Makes stores over one backend (max_retained 3), all closed after the test."""
    made: list[SharedTasks] = []
    if request.param == "memory":
        memory = MemorySharedTasks(max_retained=3)

        def make() -> SharedTasks:
            made.append(memory)
            return memory

    else:
        url = request.getfixturevalue("redis_url")
        prefix = f"test-{uuid.uuid4().hex}"  # one namespace per test: no flush between tests

        def make() -> SharedTasks:
            store = RedisSharedTasks.from_url(
                url, max_retained=3, deadline=1000 * MS, prefix=prefix
            )
            made.append(store)
            return store

    yield make
    for store in made:
        await store.close()


async def gone_within(store: SharedTasks, r: TaskRecord, seconds: float) -> float:
    """Seconds until ``r`` no longer loads, polled (bounded); fails past ``seconds``."""
    start = time.monotonic()
    for _ in range(1000):
        if await store.load(r.tenant, r.task_uuid) is None:
            return time.monotonic() - start
        if time.monotonic() - start > seconds:
            break
        await asyncio.sleep(20 * MS)
    pytest.fail(f"still there after {seconds:g} s")


# ---------------------------------------------------------------------------- claims


async def test_a_claim_is_exclusive_across_replicas(replica: Replica) -> None:
    a, b = replica(), replica()
    task_uuids = [str(uuid.uuid4()) for _ in range(20)]
    outcomes = await asyncio.gather(
        *(s.claim("studio", t, f"{t}-{n}") for t in task_uuids for n, s in enumerate((a, b)))
    )
    for i in range(0, len(outcomes), 2):
        assert sorted(outcomes[i : i + 2]) == [False, True]
    assert not await b.claim("studio", task_uuids[0], "another")


async def test_the_same_task_uuid_under_two_tenants_is_two_claims(replica: Replica) -> None:
    a, b = replica(), replica()
    task_uuid = str(uuid.uuid4())
    assert await asyncio.gather(a.claim("one", task_uuid, "u1"), b.claim("two", task_uuid, "u2"))
    # a ':' in a tenant's name does not make two keys meet
    assert await a.claim("x", "y:z", "u3")
    assert await b.claim("x:y", "z", "u4")


async def test_two_spellings_of_one_task_uuid_are_one_claim(replica: Replica) -> None:
    """UUIDs are case-insensitive (RFC 9562): an upper-case and a lower-case spelling of one
    taskUUID are one claim across replicas, found and given back by either; the record keeps
    the spelling its client sent."""
    a, b = replica(), replica()
    task_uuid = str(uuid.uuid4())
    r = record("studio", task_uuid.upper())
    assert await a.claim(r.tenant, r.task_uuid, r.upstream_uuid)
    assert not await b.claim("studio", task_uuid, "up2")
    assert await b.claim_many("studio", [(task_uuid, "up3"), (str(uuid.uuid4()), "up4")]) == [
        False,
        True,
    ]
    await a.save(r)
    loaded = await b.load("studio", task_uuid)
    assert loaded == r and loaded is not None and loaded.task_uuid == task_uuid.upper()
    await b.release("studio", task_uuid, r.upstream_uuid)
    assert await b.load("studio", task_uuid.upper()) is None
    assert await b.claim("studio", task_uuid, "up5")


async def test_claim_many_claims_a_frame_in_order(replica: Replica) -> None:
    a, b = replica(), replica()
    u1, u2, u3 = (str(uuid.uuid4()) for _ in range(3))
    assert await a.claim_many("studio", [(u1, "up1"), (u2, "up2"), (u1, "up3")]) == [
        True,
        True,
        False,
    ]
    assert await b.claim_many("studio", [(u2, "up4"), (u3, "up5")]) == [False, True]
    assert await b.claim_many("studio", []) == []


async def test_release_gives_back_only_its_own_claim(replica: Replica) -> None:
    a, b = replica(), replica()
    task_uuid = str(uuid.uuid4())
    assert await a.claim("studio", task_uuid, "up1")
    await b.release("studio", task_uuid, "someone-else")
    assert not await b.claim("studio", task_uuid, "up2")
    await b.release("studio", task_uuid, "up1")
    assert await b.claim("studio", task_uuid, "up2")


# ---------------------------------------------------------------------------- records


async def test_a_record_round_trips_with_results_and_deliveries(replica: Replica) -> None:
    a, b = replica(), replica()
    r = record("studio")
    assert await a.claim(r.tenant, r.task_uuid, r.upstream_uuid)
    assert await b.load(r.tenant, r.task_uuid) is None  # claimed, not yet saved
    r.state, r.link, r.window_epoch, r.sends = TaskState.PARTIAL, 1, 7, 2
    r.results = (
        ImageResult(
            taskType="imageInference",
            taskUUID=r.task_uuid,
            imageUUID=str(uuid.uuid4()),
            imageURL="http://127.0.0.1:9/i.png",
            seed=42,
            cost=0.0013,
        ),
    )
    r.deliveries = (
        Delivery(id="msg_1", kind="webhook", target="http://127.0.0.1:9/hook", attempts=2),
    )
    r.error = ErrorItem(code="timeoutProvider", message="late", taskUUID=r.task_uuid)
    await a.save(r)
    loaded = await b.load(r.tenant, r.task_uuid)
    assert loaded == r and loaded is not r
    assert await b.load("another-tenant", r.task_uuid) is None
    assert await b.load(r.tenant, str(uuid.uuid4())) is None
    r.deliveries[0].state = "delivered"  # a save is a copy: the store does not see this ...
    assert (await b.load(r.tenant, r.task_uuid)) != r
    await a.save(r)  # ... until saved again
    assert (await b.load(r.tenant, r.task_uuid)) == r


async def test_a_finished_record_is_kept_for_its_retention_then_gone(replica: Replica) -> None:
    a, b = replica(), replica()
    r = record("studio")
    assert await a.claim(r.tenant, r.task_uuid, r.upstream_uuid)
    await a.save(r)
    r.state, r.finished = TaskState.DONE, 2.5
    await a.finish(r, retention=400 * MS)
    assert await b.load(r.tenant, r.task_uuid) == r  # the final record, at once
    waited = await gone_within(b, r, 4000 * MS)
    assert waited > 100 * MS
    assert await b.claim(r.tenant, r.task_uuid, "a-new-task")  # the taskUUID is free again


async def test_a_retention_of_zero_forgets_at_once(replica: Replica) -> None:
    a = replica()
    r = record("studio")
    assert await a.claim(r.tenant, r.task_uuid, r.upstream_uuid)
    await a.save(r)
    await a.finish(r, retention=0)
    assert await a.load(r.tenant, r.task_uuid) is None
    assert await a.claim(r.tenant, r.task_uuid, "a-new-task")


async def test_past_max_retained_the_earliest_finished_go_first(replica: Replica) -> None:
    a, b = replica(), replica()
    assert a.max_retained == 3
    running = record("studio")
    assert await a.claim(running.tenant, running.task_uuid, running.upstream_uuid)
    await a.save(running)
    done = [record("studio") for _ in range(5)]
    for n, r in enumerate(done):
        assert await a.claim(r.tenant, r.task_uuid, r.upstream_uuid)
        await a.save(r)
        r.state = TaskState.DONE
        await (a, b)[n % 2].finish(r, retention=3600)  # both replicas count together
    for r in done[:2]:
        assert await b.load(r.tenant, r.task_uuid) is None
        assert await b.claim(r.tenant, r.task_uuid, "again")
    for r in done[2:]:
        assert await b.load(r.tenant, r.task_uuid) == r
    assert await b.load(running.tenant, running.task_uuid) == running  # open: not counted


# ---------------------------------------------------------------------------- Redis itself


async def test_redis_keys_carry_their_ttls(redis_url: str) -> None:
    prefix = f"test-{uuid.uuid4().hex}"
    store = RedisSharedTasks.from_url(redis_url, max_retained=10, open_ttl=60, prefix=prefix)
    r = record("stu:dio")
    try:
        assert await store.claim(r.tenant, r.task_uuid, r.upstream_uuid)
        await store.save(r)
        claim = store.claim_key(r.tenant, r.task_uuid)
        assert claim == f"{prefix}:record:stu%3Adio:{r.task_uuid}"
        client = store.connection.client
        assert 55_000 < await client.pttl(claim) <= 60_000  # an open task: the safety net
        await store.finish(r, retention=5)
        assert 0 < await client.pttl(claim) <= 5_000
        # listed finished by its member: tag, then key
        member = store.member(r.tenant, r.task_uuid, r.upstream_uuid)
        assert member == bytes([36]) + r.upstream_uuid.encode() + claim.encode()
        assert await client.lrange(f"{prefix}:ended", 0, -1) == [member]
    finally:
        await store.close()


async def test_a_dropped_connection_is_retried_once(redis_url: str) -> None:
    store = RedisSharedTasks.from_url(redis_url, max_retained=10, prefix=f"t-{uuid.uuid4().hex}")
    other = RedisSharedTasks.from_url(redis_url, max_retained=10)
    try:
        assert await store.claim("studio", "t1", "u1")
        await other._redis.client.client_kill_filter(
            _type="normal", skipme=True
        )  # as a Redis restart
        assert await store.claim("studio", "t2", "u2")
    finally:
        await store.close()
        await other.close()


async def answers_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # until the client gives up
    writer.close()


@pytest.mark.parametrize("server", ["refused", "silent"])
async def test_an_unreachable_redis_raises_within_the_deadline(server: str) -> None:
    listener = await asyncio.start_server(answers_nothing, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    if server == "refused":
        listener.close()
        await listener.wait_closed()
    deadline = 200 * MS
    store = RedisSharedTasks.from_url(
        f"redis://:secret@127.0.0.1:{port}/0", max_retained=10, deadline=deadline
    )
    r = record("studio")
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.claim(r.tenant, r.task_uuid, r.upstream_uuid),
        lambda: store.claim_many(r.tenant, [(r.task_uuid, r.upstream_uuid)]),
        lambda: store.release(r.tenant, r.task_uuid, r.upstream_uuid),
        lambda: store.save(r),
        lambda: store.load(r.tenant, r.task_uuid),
        lambda: store.finish(r, retention=10),
        lambda: store.ping(),
    ]
    try:
        for call in calls:
            start = time.monotonic()
            with pytest.raises(StoreUnavailable) as raised:
                await call()
            assert time.monotonic() - start < 2 * deadline + 500 * MS
            assert "secret" not in str(raised.value)
    finally:
        await store.close()
        if server == "silent":
            listener.close()
            await listener.wait_closed()
