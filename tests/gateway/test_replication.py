"""Two gateways in one process sharing a real redis-server: what replicas share about tasks
(gateway/replication.py). The process-level tests (SIGKILL, takeover) are in tests/cluster/."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import uuid
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter

import gateway.replication
import gateway.store.pipe
import gateway.store.redis
from gateway.clients import MAX_CLAIMING_FRAMES
from gateway.config import Tenant
from gateway.provider.server import LocalProvider
from gateway.replication import CLAIM_BATCH, Replication
from gateway.store.base import TaskRecord, TaskState
from gateway.store.pipe import Incarnation
from gateway.store.redis import RedisSharedTasks
from gateway.store.shared import StoreUnavailable
from tests.compiled import pure_python_only
from tests.gateway.conftest import (
    ALPHA,
    BETA,
    connect,
    polled_images,
    running,
    set_faults,
    shared_config,
    task,
    until,
)
from tests.gateway.test_dispatch import image_task
from tests.redis_server import free_port
from tests.timing import MS


@pytest.fixture
async def patient_pair(provider: LocalProvider, redis_url: str) -> AsyncIterator[tuple[Any, Any]]:
    """A pair whose store deadline and lease outlast ``held_writes``: a Redis that holds
    writes for a while is slow to them, not away."""
    prefix, patient = f"test-{uuid.uuid4().hex}", {"timeout": 5000 * MS, "lease": 20000 * MS}
    async with (
        running(shared_config(provider, redis_url, prefix, "a", **patient)) as a,
        running(shared_config(provider, redis_url, prefix, "b", **patient)) as b,
    ):
        yield a, b


@contextlib.asynccontextmanager
async def held_writes(redis_url: str) -> AsyncIterator[None]:
    """Redis holds every write (CLIENT PAUSE WRITE) until the block ends (at most 5 s)."""
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.client_pause(round(5000 * MS * 1000), all=False)
        yield
    finally:
        await admin.client_unpause()
        await admin.aclose()


async def accepted_once_given_back(client: Any, body: dict[str, Any]) -> None:
    """``body`` sent again until accepted: its taskUUID's claim goes back in a round trip of its
    own, soon after; until then it is a conflict, nothing else."""
    for _ in range(100):
        await client.send(body)
        frame = await client.recv()
        if "data" in frame:
            break
        assert frame["errors"][0]["code"] == "conflictTaskUUID", frame
        await asyncio.sleep(20 * MS)
    assert frame["data"][0]["taskUUID"] == body["taskUUID"]


class AllWon:
    """A shared store stand-in whose claims are all won; the size of each batch it was asked."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.connection = SimpleNamespace(incarnation=Incarnation(b"incarnation"))

    async def create_batch(self, records: list[Any], replica: str) -> list[bool]:
        self.sizes.append(len(records))
        return [True] * len(records)


def replication_over(shared: Any) -> Replication:
    """Replica "a"'s replication over a stand-in store (pure Python only: a compiled class
    takes no duck-typed store)."""
    return Replication(
        shared,
        "a",
        retention=60.0,
        max_pending=10,
        new_uuid=lambda: str(uuid.uuid4()),
        dropped=Counter("dropped", "dropped", registry=CollectorRegistry()),
    )


async def claimed(replication: Replication, count: int) -> list[TaskRecord]:
    """The records of a frame of ``count`` async tasks, once its claims are answered."""
    heard: list[Any] = []
    tasks = [image_task("async") for _ in range(count)]
    replication.claim_then("t", tasks, heard.append, session=None, created=0.0)
    await until(lambda: bool(heard))
    return list(heard[0].won.values())


async def flushed(replication: Replication, *records: TaskRecord) -> None:
    """``records`` changed, and every change written."""
    for r in records:
        replication.changed(r)
    await until(lambda: not replication.pending and replication._flushing is None)


def hearing(heard: list[int], n: int) -> Callable[[Any], None]:
    """A frame's callback: its number, appended to ``heard`` once its claims are answered."""
    return lambda claims: heard.append(n)


async def test_get_response_on_b_answers_a_task_sent_on_a(
    pair: tuple[Any, Any], http: aiohttp.ClientSession
) -> None:
    a, b = pair
    on_a, on_b = await connect(http, a.url), await connect(http, b.url)
    await on_a.auth(ALPHA)
    await on_b.auth(ALPHA)
    body = task(deliveryMethod="async", numberResults=2)
    await on_a.send(body)
    assert (await on_a.recv())["data"][0]["taskUUID"] == body["taskUUID"]
    images = await polled_images(on_b, body["taskUUID"], want=2)
    assert len(images) == 2
    assert all(i["taskUUID"] == body["taskUUID"] for i in images)
    # another tenant asking for the same taskUUID finds nothing
    other = await connect(http, b.url)
    await other.auth(BETA)
    await other.send({"taskType": "getResponse", "taskUUID": body["taskUUID"]})
    assert (await other.recv())["errors"][0]["code"] == "taskNotFound"


async def test_the_same_task_uuid_on_b_is_a_conflict(
    pair: tuple[Any, Any], http: aiohttp.ClientSession
) -> None:
    a, b = pair
    on_a, on_b = await connect(http, a.url), await connect(http, b.url)
    await on_a.auth(ALPHA)
    await on_b.auth(ALPHA)
    body = task(deliveryMethod="async")
    await on_a.send(body)
    assert "data" in await on_a.recv()
    await on_b.send(body)
    error = (await on_b.recv())["errors"][0]
    assert error["code"] == "conflictTaskUUID"
    assert error["taskUUID"] == body["taskUUID"]
    # the same taskUUID under another tenant is another task
    beta = await connect(http, b.url)
    await beta.auth(BETA)
    await beta.send(body)
    assert "data" in await beta.recv()


async def test_two_spellings_of_one_task_uuid_are_one_task_across_replicas(
    pair: tuple[Any, Any], http: aiohttp.ClientSession
) -> None:
    """UUIDs are case-insensitive (RFC 9562): a taskUUID claimed on a in upper case is a
    conflict on b in lower case, and b's getResponse in its own spelling finds a's task and
    answers in that spelling (the SDKs match answers by the string they sent)."""
    a, b = pair
    on_a, on_b = await connect(http, a.url), await connect(http, b.url)
    await on_a.auth(ALPHA)
    await on_b.auth(ALPHA)
    lower = str(uuid.uuid4())
    await on_a.send(task(taskUUID=lower.upper(), deliveryMethod="async"))
    assert (await on_a.recv())["data"][0]["taskUUID"] == lower.upper()
    await on_b.send(task(taskUUID=lower, deliveryMethod="async"))
    error = (await on_b.recv())["errors"][0]
    assert (error["code"], error["taskUUID"]) == ("conflictTaskUUID", lower)
    images = await polled_images(on_b, lower)
    assert [i["taskUUID"] for i in images] == [lower]


async def test_rest_task_view_reads_another_replica_task(
    pair: tuple[Any, Any], http: aiohttp.ClientSession
) -> None:
    a, b = pair
    body = task(deliveryMethod="async")
    headers = {"Authorization": f"Bearer {ALPHA}"}
    async with http.post(f"http://127.0.0.1:{a.port}/v1", json=[body], headers=headers) as r:
        assert r.status == 200
    view: dict[str, Any] = {}
    for _ in range(200):
        async with http.get(
            f"http://127.0.0.1:{b.port}/v1/tasks/{body['taskUUID']}", headers=headers
        ) as r:
            view = await r.json()
        if view.get("state") == "done":
            break
        await asyncio.sleep(20 * MS)
    assert view["state"] == "done", view
    assert len(view["results"]) == 1


async def test_a_poll_of_another_replicas_task_while_redis_is_away_is_unavailable_not_unknown(
    provider: LocalProvider, redis_url: str, http: aiohttp.ClientSession
) -> None:
    """B cannot read A's task while Redis stalls: getResponse and the REST view say so
    (serviceUnavailable, 503), never taskNotFound: a client told its task does not exist may
    send it again under another taskUUID, and pay for it twice."""
    prefix, quick = f"test-{uuid.uuid4().hex}", {"timeout": 100 * MS, "lease": 3000 * MS}
    async with (
        running(shared_config(provider, redis_url, prefix, "a", **quick)) as a,
        running(shared_config(provider, redis_url, prefix, "b", **quick)) as b,
    ):
        on_a = await connect(http, a.url)
        await on_a.auth(ALPHA)
        body = task(deliveryMethod="async")
        await on_a.send(body)
        assert "data" in await on_a.recv()
        on_b = await connect(http, b.url)
        await on_b.auth(ALPHA)
        poll = {"taskType": "getResponse", "taskUUID": body["taskUUID"]}
        headers = {"Authorization": f"Bearer {ALPHA}"}
        view = f"http://127.0.0.1:{b.port}/v1/tasks/{body['taskUUID']}"
        admin = aioredis.Redis.from_url(redis_url)
        try:
            await admin.client_pause(round(1000 * MS * 1000), all=True)
            await on_b.send(poll)
            error = (await on_b.recv())["errors"][0]
            assert (error["code"], error["taskUUID"]) == ("serviceUnavailable", body["taskUUID"])
            async with http.get(view, headers=headers) as r:
                assert r.status == 503
                assert (await r.json())["errors"][0]["code"] == "serviceUnavailable"
        finally:
            await admin.client_unpause()
            await admin.aclose()
        await on_b.send(poll)  # Redis back: the task as A wrote it
        assert "data" in await on_b.recv()


async def test_redis_away_new_tasks_get_service_unavailable(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    async with running(shared_config(provider, nowhere, "x", "lonely")) as gateway:
        client = await connect(http, gateway.url)
        await client.auth(ALPHA)
        body = task()
        await client.send(body)
        error = (await client.recv())["errors"][0]
        assert error["code"] == "serviceUnavailable"
        assert error["taskUUID"] == body["taskUUID"]
        async with http.get(f"http://127.0.0.1:{gateway.port}/readyz") as r:
            assert r.status == 503
            assert (await r.json())["store"] == "unavailable"


async def _images(client: Any, want: int, seen: list[str], within: float) -> None:
    """Read frames until ``seen`` holds ``want`` imageUUIDs (errors are not expected)."""
    async with asyncio.timeout(within):
        while len(seen) < want:
            frame = await client.recv()
            assert "errors" not in frame, frame
            seen.extend(i["imageUUID"] for i in frame["data"] if "imageUUID" in i)


async def test_a_session_resumed_on_b_gets_the_rest_of_its_task_from_a(
    provider: LocalProvider, pair: tuple[Any, Any], http: aiohttp.ClientSession
) -> None:
    """The client leaves A mid-task and resumes its session on B: A still carries the task
    and forwards its results; every image arrives once."""
    a, b = pair
    set_faults(provider, fast=True, latency={"kind": "uniform", "ms": 50, "high_ms": 1500})
    on_a = await connect(http, a.url)
    session = await on_a.auth(ALPHA)
    body = task(numberResults=4)
    await on_a.send(body)
    seen: list[str] = []
    await _images(on_a, 1, seen, 5000 * MS)
    await on_a.ws.close()
    on_b = await connect(http, b.url)
    assert await on_b.auth(ALPHA, session) == session
    await _images(on_b, 4, seen, 10000 * MS)
    assert len(set(seen)) == len(seen) == 4


async def test_a_session_unknown_or_of_another_tenant_is_not_resumed(
    pair: tuple[Any, Any], http: aiohttp.ClientSession
) -> None:
    a, b = pair
    on_a = await connect(http, a.url)
    session = await on_a.auth(ALPHA)
    beta = await connect(http, b.url)
    assert await beta.auth(BETA, session) != session
    stranger = await connect(http, b.url)
    unknown = str(uuid.uuid4())
    assert await stranger.auth(ALPHA, unknown) != unknown


async def test_a_replica_that_stops_leaves_its_open_tasks_to_another(
    provider: LocalProvider, redis_url: str, http: aiohttp.ClientSession
) -> None:
    """SIGTERM with replicas: past the drain deadline the open tasks are not failed but taken
    over; the client resumes its session on the other replica and gets every image once."""
    prefix = f"test-{uuid.uuid4().hex}"
    set_faults(provider, fast=True, latency={"kind": "uniform", "ms": 600, "high_ms": 1500})
    a_config = shared_config(provider, redis_url, prefix, "a")
    a_config.server.drain_deadline = 100 * MS
    async with running(shared_config(provider, redis_url, prefix, "b")) as b:
        async with running(a_config) as a:
            on_a = await connect(http, a.url)
            session = await on_a.auth(ALPHA)
            body = task(numberResults=3)
            await on_a.send(body)
            await asyncio.sleep(200 * MS)
        seen: list[str] = []
        async with asyncio.timeout(1000 * MS):  # what A sent before it closed
            async for message in on_a.ws:
                seen.extend(i["imageUUID"] for i in json.loads(message.data).get("data", []))
        assert len(seen) < 3
        on_b = await connect(http, b.url)
        assert await on_b.auth(ALPHA, session) == session
        await _images(on_b, 3, seen, 10000 * MS)
        assert len(set(seen)) == len(seen) == 3


async def test_redis_restarted_empty_is_the_documented_outcome(
    provider: LocalProvider, pair: tuple[Any, Any], http: aiohttp.ClientSession
) -> None:
    """README, "Redis restarted empty": a finished task is gone for the other replicas (its own
    still has it); a running task's claim and record come back with its next write."""
    a, b = pair
    on_a, on_b = await connect(http, a.url), await connect(http, b.url)
    await on_a.auth(ALPHA)
    await on_b.auth(ALPHA)
    finished = task(deliveryMethod="async")
    await on_a.send(finished)
    await on_a.recv()
    record = a.registry.lookup("alpha", finished["taskUUID"])
    await until(lambda: not record.open and not a.replication.pending)
    set_faults(provider, fast=True, latency={"kind": "fixed", "ms": 800})
    running_task = task(deliveryMethod="async", numberResults=2)
    await on_a.send(running_task)
    await on_a.recv()
    await asyncio.sleep(100 * MS)
    assert a.redis is not None
    await a.redis.client.flushdb()  # what a restart without persistence leaves
    for body, code in ((finished, "taskNotFound"),):
        await on_b.send({"taskType": "getResponse", "taskUUID": body["taskUUID"]})
        assert (await on_b.recv())["errors"][0]["code"] == code
    await on_a.send({"taskType": "getResponse", "taskUUID": finished["taskUUID"]})
    assert "data" in await on_a.recv()  # the replica that ran it still has it
    # the running task: its results' writes bring its claim and record back for B
    found: list[dict[str, Any]] = []
    async with asyncio.timeout(5000 * MS):
        while len(found) < 2:
            await asyncio.sleep(50 * MS)
            await on_b.send({"taskType": "getResponse", "taskUUID": running_task["taskUUID"]})
            frame = await on_b.recv()
            found = [i for i in frame.get("data", []) if i.get("status") == "success"]
    await on_b.send(running_task)  # and the claim holds again
    assert (await on_b.recv())["errors"][0]["code"] == "conflictTaskUUID"


async def test_a_session_that_comes_back_to_its_first_replica_gets_its_frames_there(
    provider: LocalProvider, pair: tuple[Any, Any], http: aiohttp.ClientSession
) -> None:
    """A -> B -> A: the first replica, which had handed the session on, takes it back."""
    a, b = pair
    set_faults(provider, fast=True, latency={"kind": "uniform", "ms": 300, "high_ms": 2500})
    on_a = await connect(http, a.url)
    session = await on_a.auth(ALPHA)
    await on_a.send(task(numberResults=4))
    seen: list[str] = []
    await _images(on_a, 1, seen, 5000 * MS)
    await on_a.ws.close()
    on_b = await connect(http, b.url)
    assert await on_b.auth(ALPHA, session) == session
    await asyncio.sleep(100 * MS)
    await on_b.ws.close()
    back = await connect(http, a.url)
    assert await back.auth(ALPHA, session) == session
    await _images(back, 4, seen, 10000 * MS)
    assert len(set(seen)) == len(seen) == 4


async def test_a_fenced_replica_stops_without_failing_the_tasks_another_took(
    provider: LocalProvider, pair: tuple[Any, Any], http: aiohttp.ClientSession
) -> None:
    """Taken over while alive (it lost Redis longer than its lease): its tasks are the other's
    now, so it stops at once, fails none of them, and writes nothing more under its name."""
    a, b = pair
    set_faults(provider, fast=True, latency={"kind": "fixed", "ms": 1500})
    on_a = await connect(http, a.url)
    await on_a.auth(ALPHA)
    body = task(deliveryMethod="async")
    await on_a.send(body)
    await on_a.recv()
    record = a.registry.lookup("alpha", body["taskUUID"])
    a.cluster._fenced_now()  # as its next renewal would find it
    assert a.fenced.is_set()
    async with asyncio.timeout(5000 * MS):
        await a.stop()
    assert record.open  # not failed: the other replica answers for it
    await asyncio.sleep(200 * MS)
    assert (await b.replication.load("alpha", body["taskUUID"])).open


async def test_frames_sent_back_to_back_are_answered_in_their_order(
    pair: tuple[Any, Any], http: aiohttp.ClientSession
) -> None:
    """A socket's frames that wait for their claims together (Intake.claim_then) are dispatched
    in the order they came, a frame that cannot wait with them (a getResponse of a task they
    carry) after them, and a taskUUID twice among them is a conflict the second time."""
    a, _ = pair
    client = await connect(http, a.url)
    await client.auth(ALPHA)
    bodies = [task(deliveryMethod="async") for _ in range(12)]
    sent: list[tuple[str, str]] = []
    for i, body in enumerate(bodies):
        await client.send(body)
        sent.append(("ack", body["taskUUID"]))
        if i % 3 == 2:
            await client.send({"taskType": "getResponse", "taskUUID": body["taskUUID"]})
            sent.append(("poll", body["taskUUID"]))
    await client.send(bodies[0])
    sent.append(("conflictTaskUUID", bodies[0]["taskUUID"]))
    seen: list[tuple[str, str]] = []
    while len(seen) < len(sent):
        frame = await client.recv()
        for item in frame.get("data", []):  # a poll's answer has a status, an ack none
            seen.append(("poll" if "status" in item else "ack", item["taskUUID"]))
        for error in frame.get("errors", []):
            seen.append((error["code"], error["taskUUID"]))
    assert seen == sent


async def test_a_stalled_redis_stops_reading_a_socket_past_its_bound_then_answers_in_order(
    patient_pair: tuple[Any, Any], http: aiohttp.ClientSession, redis_url: str
) -> None:
    """While Redis holds writes (CLIENT PAUSE), a socket's frames queue for their claims up to
    MAX_CLAIMING_FRAMES and no further (its reads stop: TCP pushes back); once Redis answers,
    every frame is answered, in order."""
    a, _ = patient_pair
    client = await connect(http, a.url)
    await client.auth(ALPHA)
    bodies = [task(deliveryMethod="async") for _ in range(MAX_CLAIMING_FRAMES + 16)]
    async with held_writes(redis_url):
        for body in bodies:
            await client.send(body)
        [connection] = a.clients.connections
        await until(lambda: connection.claiming == MAX_CLAIMING_FRAMES, within=4000 * MS)
        await asyncio.sleep(50 * MS)
        assert connection.claiming == MAX_CLAIMING_FRAMES  # and not one frame more
    acked = [(await client.recv())["data"][0]["taskUUID"] for _ in bodies]
    assert acked == [body["taskUUID"] for body in bodies]


async def test_frames_waiting_when_their_key_is_revoked_give_their_claims_back(
    patient_pair: tuple[Any, Any], http: aiohttp.ClientSession, redis_url: str
) -> None:
    """Frames a socket read before its key was revoked, still waiting for their claims, are not
    run: their claims go back, and the tenant's taskUUIDs are free on the other replica."""
    a, b = patient_pair
    client = await connect(http, a.url)
    await client.auth(BETA)
    bodies = [task(deliveryMethod="async") for _ in range(5)]
    async with held_writes(redis_url):
        for body in bodies:
            await client.send(body)
        [connection] = a.clients.connections
        await until(lambda: connection.claiming == len(bodies), within=4000 * MS)
        config = copy.deepcopy(a.config)
        del config.tenants["beta"]
        assert a.reload_tenants(lambda: config) is not None
    await until(lambda: connection.claiming == 0)
    other = await connect(http, b.url)
    await other.auth(BETA)
    for body in bodies:  # each claim goes back in its own round trip, soon after
        await accepted_once_given_back(other, body)


async def test_a_rated_tenants_frames_take_their_tokens_with_their_claim_batch(
    provider: LocalProvider, redis_url: str, http: aiohttp.ClientSession
) -> None:
    """A tenant whose rate Redis counts: its frames sent back to back wait for their claims
    together, the batch takes their tokens in one go, and they are answered in order, the
    burst's worth accepted and the rest refused."""
    config = shared_config(provider, redis_url, f"test-{uuid.uuid4().hex}", "a")
    config.tenants["rated"] = Tenant(keys=["rated-key-123456"], rate=0.01, burst=5)
    async with running(config) as a:
        limits = a.intake.quotas.shared
        take, takes = limits.take, []

        async def counted(tenant: str, count: int, rate: float, burst: int) -> Any:
            takes.append(count)
            return await take(tenant, count, rate, burst)

        limits.take = counted
        client = await connect(http, a.url)
        await client.auth("rated-key-123456")
        bodies = [task(deliveryMethod="async") for _ in range(8)]
        for body in bodies:
            await client.send(body)
        answers = []
        for body in bodies:
            frame = await client.recv()
            [item] = frame.get("data", []) or frame["errors"]
            assert item["taskUUID"] == body["taskUUID"]
            answers.append(item.get("code", "ack"))
        assert answers == ["ack"] * 5 + ["rateLimitExceeded"] * 3
        assert sum(takes) == len(bodies) and len(takes) < len(bodies)  # a take per batch


@pure_python_only(gateway.replication)
async def test_a_rated_frame_whose_tokens_redis_does_not_give_gets_service_unavailable(
    provider: LocalProvider, redis_url: str, http: aiohttp.ClientSession
) -> None:
    """Its claims won in a batch, its tokens not to be had (Redis did not answer that take):
    the frame's tasks are answered serviceUnavailable and their claims go back, so that a retry
    of the same taskUUIDs is accepted, not a conflict."""
    config = shared_config(provider, redis_url, f"test-{uuid.uuid4().hex}", "a")
    config.tenants["rated"] = Tenant(keys=["rated-key-123456"], rate=100.0, burst=100)
    async with running(config) as a:
        limits = a.intake.quotas.shared
        take = limits.take

        async def not_awaited(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("the frame took the awaited path, not the batch's")

        a.replication.claim = not_awaited

        async def unavailable(tenant: str, count: int, rate: float, burst: int) -> Any:
            raise StoreUnavailable("redis: the rate bucket did not answer")

        limits.take = unavailable
        client = await connect(http, a.url)
        await client.auth("rated-key-123456")
        body = task(deliveryMethod="async")
        await client.send(body)
        [error] = (await client.recv())["errors"]
        assert error["code"] == "serviceUnavailable" and error["taskUUID"] == body["taskUUID"]
        limits.take = take
        await accepted_once_given_back(client, body)


async def test_a_poll_read_before_the_frames_tokens_failed_is_answered_as_read(
    provider: LocalProvider, redis_url: str, http: aiohttp.ClientSession
) -> None:
    """A frame's getResponse found no task (Redis answered), then its rate tokens could not be
    taken: the image task is serviceUnavailable, the poll taskNotFound, as it was read."""
    config = shared_config(provider, redis_url, f"test-{uuid.uuid4().hex}", "a")
    config.tenants["rated"] = Tenant(keys=["rated-key-123456"], rate=100.0, burst=100)
    async with running(config) as a:
        limits = a.intake.quotas.shared

        async def unavailable(tenant: str, count: int, rate: float, burst: int) -> Any:
            raise StoreUnavailable("redis: the rate bucket did not answer")

        limits.take = unavailable
        client = await connect(http, a.url)
        await client.auth("rated-key-123456")
        body, unknown = task(deliveryMethod="async"), str(uuid.uuid4())
        await client.send(body, {"taskType": "getResponse", "taskUUID": unknown})
        errors = {e["taskUUID"]: e["code"] for e in (await client.recv())["errors"]}
        assert errors == {body["taskUUID"]: "serviceUnavailable", unknown: "taskNotFound"}


@pure_python_only(gateway.replication)
async def test_claims_that_piled_up_go_in_bounded_batches_frames_whole_and_in_order() -> None:
    """Frames that waited while Redis stalled: their claims go in round trips of about
    CLAIM_BATCH each (a frame's never split), and every frame hears, in the order it came."""

    shared = AllWon()
    replication = replication_over(shared)
    heard: list[int] = []
    sizes = [700, 900, 1, 1500, 300, 2500, 10]
    for n, size in enumerate(sizes):
        frame = [image_task("async") for _ in range(size)]
        replication.claim_then("t", frame, hearing(heard, n), session=None, created=0.0)
    await until(lambda: len(heard) == len(sizes))
    assert heard == list(range(len(sizes)))
    assert CLAIM_BATCH == 2_000
    assert shared.sizes == [3101, 2800, 10]  # each ends with the frame that reached 2,000


@pytest.mark.parametrize("refusals", [0, 3])
@pure_python_only(gateway.replication)
async def test_claims_of_a_batch_whose_answer_was_lost_are_given_back(
    redis_url: str, refusals: int
) -> None:
    """Redis made the batch's claims, and its answer never came (a deadline): the frame heard
    serviceUnavailable, so the claims go back once the deadline has passed; a client sending
    the taskUUID again is then accepted, not told conflictTaskUUID by its own first try. With
    Redis still away past the deadline (``refusals``), the give-back is tried again, with
    backoff, until Redis takes it. Left to lapse (twice ``tasks.timeout``), the claims would
    hold their taskUUIDs against the client's retries, and stay on the replica's open list: a
    takeover would run tasks their client was told were not accepted."""
    store = RedisSharedTasks.from_url(
        redis_url, max_retained=100, deadline=100 * MS, prefix=f"test-{uuid.uuid4().hex}"
    )
    refused = 0

    class AnswerLost:
        deadline = store.deadline
        connection = store.connection

        async def create_batch(self, records: list[Any], replica: str) -> list[bool]:
            await store.create_batch(records, replica)
            raise StoreUnavailable("redis did not answer within 0.2 s")

        async def release(self, *args: Any) -> None:
            nonlocal refused
            if refused < refusals:
                refused += 1
                raise StoreUnavailable("redis: ConnectionError: connection refused")
            await store.release(*args)

    replication = replication_over(AnswerLost())
    try:
        sent = image_task("async")
        heard: list[Any] = []
        replication.claim_then("t", [sent], heard.append, session=None, created=0.0)
        await until(lambda: bool(heard))
        assert heard[0].unavailable is not None
        assert not await store.claim("t", sent.taskUUID, "the-retry")  # its first try holds it
        await until(lambda: replication.giving_back == 0, within=5000 * MS)
        assert refused == refusals
        assert await store.claim("t", sent.taskUUID, "the-retry")  # given back
        assert await store.connection.client.smembers(store.open_key("a")) == set()
    finally:
        await store.close()


@pure_python_only(gateway.replication)
async def test_frames_wait_while_the_lease_is_in_doubt_and_never_go_once_fenced() -> None:
    """Woken from a stall past its lease, a replica relayed results (and wrote them over
    records another replica had taken over) before its renewal told it it was fenced, and the
    taker sent the same images again: frames and writes wait while the lease is in doubt, go
    once it is renewed, and never go once the replica is fenced (the taker sends them)."""
    written: list[list[str]] = []

    class Store:
        deadline = 1.0
        connection = SimpleNamespace(incarnation=Incarnation(b"k"))

        async def write(self, writes: list[Any], **kwargs: Any) -> list[str]:
            written.append([w.record.upstream_uuid for w in writes])
            return []

    replication = replication_over(Store())
    doubt = True
    replication.lease_in_doubt = lambda: doubt
    sent: list[str] = []
    record = TaskRecord(tenant="t", task=image_task("async"), upstream_uuid="u-1", created=0.0)
    replication.changed(record)
    replication.after_write(lambda: sent.append("result"))
    await asyncio.sleep(100 * MS)
    assert (written, sent) == ([], [])  # held
    doubt = False  # renewed
    await until(lambda: sent == ["result"], within=2000 * MS)
    assert written == [["u-1"]]

    doubt = True  # fenced: in doubt for good
    replication.changed(record)
    replication.after_write(lambda: sent.append("another"))
    await asyncio.sleep(100 * MS)
    await replication.close(deliver_held=False)
    assert (written, sent) == ([["u-1"]], ["result"])


@pure_python_only(gateway.replication)
async def test_claims_wait_to_go_back_while_the_lease_is_in_doubt() -> None:
    """A replica maybe taken over during a stall gives nothing back until a renewal answers:
    the claims may be the taker's now (the same tags). Fenced, it never does."""
    released: list[str] = []

    class Store:
        deadline = 1.0

        async def release(self, tenant: str, task_uuid: str, *args: Any) -> None:
            released.append(task_uuid)

    replication = replication_over(Store())
    doubt = True
    replication.lease_in_doubt = lambda: doubt
    record = TaskRecord(tenant="t", task=image_task("async"), upstream_uuid="u-1", created=0.0)
    claims = gateway.replication.FrameClaims("t")
    claims.won[record.task.taskUUID] = record
    replication.release_unused(claims)
    await asyncio.sleep(100 * MS)
    assert released == [] and replication.giving_back == 1
    doubt = False  # renewed
    await until(lambda: replication.giving_back == 0, within=2000 * MS)
    assert released == [record.task.taskUUID]
    await replication.close()


@pure_python_only(gateway.replication)
async def test_claims_to_give_back_are_bounded_the_oldest_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis away for long: what waits to be given back is bounded, the oldest dropped past it
    (its claim lapses with ``open_ttl``) and counted."""
    monkeypatch.setattr(gateway.replication, "MAX_GIVING_BACK", 2)
    released: list[str] = []

    class Away:
        deadline = 1.0
        answering = False

        async def release(self, tenant: str, task_uuid: str, *args: Any) -> None:
            if not self.answering:
                raise StoreUnavailable("redis: ConnectionError: connection refused")
            released.append(task_uuid)

    store = Away()
    replication = replication_over(store)
    records = [
        TaskRecord(tenant="t", task=image_task("async"), upstream_uuid=f"u-{i}", created=0.0)
        for i in range(3)
    ]
    for record in records:
        claims = gateway.replication.FrameClaims("t")
        claims.won[record.task.taskUUID] = record
        replication.release_unused(claims)
    assert (replication.giving_back, replication.gave_up) == (2, 1)
    store.answering = True
    await until(lambda: replication.giving_back == 0, within=5000 * MS)
    assert released == [r.task.taskUUID for r in records[1:]]
    await replication.close()


async def test_records_claimed_before_redis_restarted_are_written_whole_after_it(
    redis_url: str,
) -> None:
    """Redis restarted empty and B took one of A's taskUUIDs meanwhile. A's flush built before
    it is not sent to the new data set, and the next writes each record A had claimed whole
    (which checks whose claim it is), not over its claim: B's open claim keeps its record and
    expiry (a write over it would have put A's there, with A's retention), and A's other
    record comes back."""
    prefix = f"test-{uuid.uuid4().hex}"
    store = RedisSharedTasks.from_url(redis_url, max_retained=100, prefix=prefix)
    b = RedisSharedTasks.from_url(redis_url, max_retained=100, prefix=prefix)
    replication = replication_over(store)
    try:
        mine, kept = await claimed(replication, 2)
        mine.state = kept.state = TaskState.PARTIAL
        await flushed(replication, mine, kept)  # over their claims, in the data set of the claims
        client = store.connection.client
        await client.flushdb()
        await client.client_kill_filter(_type="normal", skipme=True)  # a restart drops them all
        theirs = TaskRecord(tenant="t", task=image_task("async"), upstream_uuid="b-1", created=1.0)
        theirs.task.taskUUID = mine.task.taskUUID
        assert await b.create_batch([theirs], "b") == [True]
        for r in (mine, kept):
            r.state, r.finished = TaskState.DONE, 2.0
        await flushed(replication, mine, kept)
        assert store.connection.incarnation.generation == 1
        assert await client.pttl(store.claim_key("t", mine.task_uuid)) > 60_000  # B's, a day
        assert await store.load("t", mine.task_uuid) == theirs
        assert await store.load("t", kept.task_uuid) == kept
    finally:
        await store.close()
        await b.close()


@pure_python_only(gateway.store.pipe)
async def test_claims_answered_across_a_restart_are_written_whole(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim batch with a conflict takes a second round trip; Redis restarts before it, and a
    flush runs meanwhile. The claims the batch won were of the data set before: they are not
    taken as stored, and the task's next write goes whole (B, which took its taskUUID since,
    keeps its open claim's expiry)."""
    prefix = f"test-{uuid.uuid4().hex}"
    store = RedisSharedTasks.from_url(redis_url, max_retained=100, prefix=prefix)
    b = RedisSharedTasks.from_url(redis_url, max_retained=100, prefix=prefix)
    replication = replication_over(store)
    client, pipe = store.connection.client, store.connection.claims
    exchange = pipe.exchange

    def held_by_b(task_uuid: str, upstream_uuid: str) -> TaskRecord:
        held = TaskRecord(tenant="t", task=image_task("async"), upstream_uuid=upstream_uuid,
                          created=1.0)  # fmt: skip
        held.task.taskUUID = task_uuid
        return held

    try:
        [other] = await claimed(replication, 1)
        taken = image_task("async")
        assert await b.create_batch([held_by_b(taken.taskUUID, "b-0")], "b") == [True]

        restarted = False

        async def restarted_before_the_second(
            data: bytes, replies: int, built: int = -1
        ) -> list[Any]:
            nonlocal restarted
            if not restarted and b"GETRANGE" in data:
                restarted = True
                await client.flushdb()
                await client.client_kill_filter(_type="normal", skipme=True)
                answers: list[Any] = await exchange(data, replies, built)
                other.state = TaskState.PARTIAL  # a flush meanwhile, in the new data set
                await flushed(replication, other)
                return answers
            return await exchange(data, replies, built)

        monkeypatch.setattr(pipe, "exchange", restarted_before_the_second)
        heard: list[Any] = []
        replication.claim_then(
            "t", [image_task("async"), taken], heard.append, session=None, created=0.0
        )
        await until(lambda: bool(heard))
        [mine] = heard[0].won.values()  # won in the data set that is gone
        assert store.connection.incarnation.generation == 1
        assert await b.create_batch([held_by_b(mine.task.taskUUID, "b-1")], "b") == [True]
        mine.state, mine.finished = TaskState.DONE, 2.0
        await flushed(replication, mine)
        assert await client.pttl(store.claim_key("t", mine.task_uuid)) > 60_000
    finally:
        await store.close()
        await b.close()


async def test_a_record_written_whole_stays_whole(redis_url: str) -> None:
    """Redis restarted empty and B took A's taskUUID: A's next write goes whole and writes
    nowhere (B's claim). Its later writes go whole too (each reads first): written over its
    claim, its final write would put A's record over B's, with A's retention."""
    prefix = f"test-{uuid.uuid4().hex}"
    store = RedisSharedTasks.from_url(redis_url, max_retained=100, prefix=prefix)
    b = RedisSharedTasks.from_url(redis_url, max_retained=100, prefix=prefix)
    replication = replication_over(store)
    try:
        [mine] = await claimed(replication, 1)
        mine.state = TaskState.PARTIAL
        await flushed(replication, mine)
        client = store.connection.client
        await client.flushdb()
        await client.client_kill_filter(_type="normal", skipme=True)  # a restart
        theirs = TaskRecord(tenant="t", task=image_task("async"), upstream_uuid="b-1", created=1.0)
        theirs.task.taskUUID = mine.task.taskUUID
        assert await b.create_batch([theirs], "b") == [True]
        await flushed(replication, mine)  # whole, and nowhere: the claim is B's
        mine.state, mine.finished = TaskState.DONE, 2.0
        await flushed(replication, mine)
        claim = store.claim_key("t", mine.task_uuid)
        assert await client.pttl(claim) > 60_000  # B's, a day
        assert await store.load("t", mine.task_uuid) == theirs
        assert await client.llen(store._finished_key) == 0
    finally:
        await store.close()
        await b.close()


async def test_a_deliverys_outcome_after_the_end_keeps_the_record_listed_once(
    redis_url: str,
) -> None:
    """Two finished tasks under ``max_retained`` 2; one's webhook outcome comes after its end
    (app's ``_delivery_outcome``: ``changed``), and is written whole. Both stay: the record is
    not listed finished a second time, which would count it twice against the bound."""
    store = RedisSharedTasks.from_url(redis_url, max_retained=2, prefix=f"test-{uuid.uuid4().hex}")
    replication = replication_over(store)
    try:
        first, second = await claimed(replication, 2)
        for r in (first, second):
            r.state, r.finished = TaskState.DONE, 2.0
            await flushed(replication, r)
        for attempt in (1, 2):
            first.sends = attempt  # any change: a delivery's attempt, its outcome
            await flushed(replication, first)
        assert await store.load("t", second.task_uuid) == second
        assert await store.load("t", first.task_uuid) == first
        assert await store.connection.client.llen(store._finished_key) == 2
    finally:
        await store.close()


@pure_python_only(gateway.store.redis)
async def test_a_final_write_retried_after_a_failure_is_not_listed_again(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis ran a flush, but its reply came past the deadline: the retry writes the
    finished record whole, whose script finds it listed already. Listed twice, it would count
    twice against ``max_retained``, and its first member's pop would delete it early."""
    store = RedisSharedTasks.from_url(redis_url, max_retained=2, prefix=f"test-{uuid.uuid4().hex}")
    replication = replication_over(store)
    write, calls = store.write, 0

    async def late(*args: Any, **kwargs: Any) -> list[str]:
        nonlocal calls
        calls += 1
        written = await write(*args, **kwargs)
        if calls == 1:
            raise StoreUnavailable("redis did not answer within 2 s")
        return written

    monkeypatch.setattr(store, "write", late)
    try:
        first, second = await claimed(replication, 2)
        for r in (first, second):
            r.state, r.finished = TaskState.DONE, 2.0
            await flushed(replication, r)
        assert calls == 3
        assert await store.connection.client.llen(store._finished_key) == 2
        assert await store.load("t", first.task_uuid) == first
    finally:
        await store.close()


async def test_a_rated_tenants_slow_take_holds_up_no_other_tenant(
    provider: LocalProvider, redis_url: str, http: aiohttp.ClientSession
) -> None:
    """While a rated tenant's take is out, the other tenants' frames, of its batch or of later
    ones, are answered; only the rated tenant's wait for it."""
    config = shared_config(provider, redis_url, f"test-{uuid.uuid4().hex}", "a")
    config.tenants["rated"] = Tenant(keys=["rated-key-123456"], rate=100.0, burst=100)
    async with running(config) as a:
        limits = a.intake.quotas.shared
        take, slow, taking = limits.take, asyncio.Event(), asyncio.Event()

        async def slow_take(tenant: str, count: int, rate: float, burst: int) -> Any:
            taking.set()
            await slow.wait()
            return await take(tenant, count, rate, burst)

        limits.take = slow_take
        rated, other = await connect(http, a.url), await connect(http, a.url)
        await rated.auth("rated-key-123456")
        await other.auth(ALPHA)
        waits, goes = task(deliveryMethod="async"), task(deliveryMethod="async")
        await rated.send(waits)
        await asyncio.wait_for(taking.wait(), 5000 * MS)
        await other.send(goes)  # a later batch
        assert (await other.recv())["data"][0]["taskUUID"] == goes["taskUUID"]
        slow.set()
        assert (await rated.recv())["data"][0]["taskUUID"] == waits["taskUUID"]


@pure_python_only(gateway.replication)
async def test_a_tenants_frames_stay_in_order_when_a_reload_takes_its_rate_away() -> None:
    """Frames of a tenant wait for their tokens; its rate goes (a reload) before the take is
    answered: its next frames still wait behind them, not overtake them."""

    replication = replication_over(AllWon())
    rated, answered = {"t": True}, asyncio.Event()
    replication.rated = rated.__getitem__

    async def take(counts: dict[str, int]) -> dict[str, StoreUnavailable]:
        await answered.wait()
        return {}

    replication.take_tokens = take
    heard: list[int] = []
    replication.claim_then("t", [image_task("async")], hearing(heard, 0), session=None, created=0.0)
    await until(lambda: replication._taking is not None)
    rated["t"] = False  # the reload
    replication.claim_then("t", [image_task("async")], hearing(heard, 1), session=None, created=0.0)
    await asyncio.sleep(50 * MS)
    assert heard == []
    answered.set()
    await until(lambda: len(heard) == 2)
    assert heard == [0, 1]
