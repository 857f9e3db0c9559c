"""Deliveries as durable jobs (gateway/delivery/jobs.py, holds.py): replicas are Deliveries
objects with their own Redis connections to a real redis-server, and one receiver on loopback.
A replica is "killed" by cancelling its tasks and closing its connection: nothing is acked."""

from __future__ import annotations

import asyncio
import base64
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
import standardwebhooks
from aiohttp import web
from structlog.testing import capture_logs

from gateway.config import DeliverySettings, Tenant
from gateway.delivery.deliveries import Deliveries
from gateway.delivery.egress import EgressGuard
from gateway.delivery.jobs import DeliveryJob, DeliveryJobs, RedisJobs
from gateway.metrics import Metrics
from gateway.store.base import Delivery, TaskRecord
from gateway.store.connection import RedisConnection
from gateway.store.shared import StoreUnavailable
from protocol.frames import NO_SAFETY, ImageResult, ImageTask
from tests.gateway.conftest import until
from tests.redis_server import free_port
from tests.timing import MS

SECRET = "whsec_" + base64.b64encode(b"a-secret-of-thirty-two-bytes-len").decode()
IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
LEASE = 300 * MS


class Ceiling(random.Random):
    """Full jitter at its ceiling: backoffs are known, so a test knows where each replica is."""

    def uniform(self, a: float, b: float) -> float:
        return b


@dataclass
class Receiver:
    """Answers PUT/POST from a script (then 200) and serves the image to upload at GET."""

    url: str = ""
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    fetches: int = 0
    script: list[int] = field(default_factory=list)
    delay: float = 0.0
    in_flight: int = 0
    most_in_flight: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            self.fetches += 1
            return web.Response(body=IMAGE, content_type="image/png")
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            body = await request.read()
            headers = {k.lower(): v for k, v in request.headers.items()}
            self.requests.append((request.method, request.path_qs, headers, body))
            if self.delay:
                await asyncio.sleep(self.delay)
            return web.Response(status=self.script.pop(0) if self.script else 200)
        finally:
            self.in_flight -= 1


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    target = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", target.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    target.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield target
    await runner.cleanup()


@dataclass
class Replica:
    deliveries: Deliveries
    conn: RedisConnection | None
    metrics: Metrics
    outcomes: list[Delivery] = field(default_factory=list)  # snapshots, in order

    def last(self, delivery_id: str) -> Delivery | None:
        mine = [d for d in self.outcomes if d.id == delivery_id]
        return mine[-1] if mine else None


MakeReplica = Callable[..., Awaitable[Replica]]


def delivery_settings(**changes: Any) -> DeliverySettings:
    settings = DeliverySettings(
        attempts=5,
        backoff_initial=100 * MS,
        backoff_max=400 * MS,
        timeout=1000 * MS,
        allow=["127.0.0.1/32"],
    )
    for name, value in changes.items():
        setattr(settings, name, value)
    return settings


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[MakeReplica]:
    """``await make(name, url=..., durable=True, **delivery settings)``: a started replica over
    this test's own prefix; all stopped after the test."""
    prefix = f"test-{uuid.uuid4().hex}"
    made: list[Replica] = []

    async def make(
        name: str,
        *,
        url: str | None = None,
        durable: bool = True,
        max_jobs: int = 4096,
        **changes: Any,
    ) -> Replica:
        settings = delivery_settings(**changes)
        conn = None
        jobs: DeliveryJobs | None = None
        if durable:
            conn = RedisConnection.from_url(url or redis_url, deadline=200 * MS, prefix=prefix)
            jobs = RedisJobs(conn)
        metrics = Metrics()
        deliveries = Deliveries(
            settings,
            EgressGuard(settings.allow),
            metrics,
            {"alpha": Tenant(webhook_secret=SECRET)},
            rng=Ceiling(),
            jobs=jobs,
            replica=name,
            lease=LEASE,
            max_jobs=max_jobs,
        )
        replica = Replica(deliveries, conn, metrics)
        deliveries.on_outcome = lambda tenant, task_uuid, delivery: replica.outcomes.append(
            msgspec.structs.replace(delivery)
        )
        await deliveries.start()
        made.append(replica)
        return replica

    yield make
    for replica in made:
        await replica.deliveries.close()
        if replica.conn is not None:
            await replica.conn.close()


async def kill(replica: Replica) -> None:
    """As a SIGKILL leaves it: tasks stopped where they are, no ack, no drain."""
    deliveries = replica.deliveries
    tasks = [*deliveries._running, *([deliveries._keeper] if deliveries._keeper else [])]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert replica.conn is not None
    await replica.conn.close()


def record(**task: Any) -> TaskRecord:
    image_task = ImageTask(
        taskUUID=str(uuid.uuid4()),
        model="m",
        positivePrompt="pp",
        width=64,
        height=64,
        outputType="URL",
        outputFormat="PNG",
        outputQuality=95,
        numberResults=1,
        deliveryMethod="sync",
        includeCost=False,
        safety=NO_SAFETY,
        **task,
    )
    return TaskRecord(tenant="alpha", task=image_task, upstream_uuid=str(uuid.uuid4()), created=0.0)


def with_result(target: TaskRecord, receiver: Receiver) -> TaskRecord:
    target.results = (
        ImageResult(
            taskType="imageInference",
            taskUUID=target.task_uuid,
            imageUUID=str(uuid.uuid4()),
            imageURL=f"{receiver.url}/image.png",
        ),
    )
    return target


def a_job(delivery_id: str, url: str) -> DeliveryJob:
    """A webhook job as another replica made it."""
    return DeliveryJob(
        kind="webhook", id=delivery_id, tenant="alpha", task_uuid="t", upstream_uuid="u", url=url
    )


async def stream_state(redis_url: str, replica: Replica) -> tuple[int, int]:
    """(entries in the stream, entries pending in the group), read on a connection of our own."""
    assert replica.conn is not None
    jobs = replica.deliveries.holds.jobs
    assert isinstance(jobs, RedisJobs)
    conn = RedisConnection.from_url(redis_url, prefix=replica.conn.prefix)
    try:
        length = await conn.client.xlen(jobs.stream)
        pending = (await conn.client.xpending(jobs.stream, "deliveries"))["pending"]
        return int(length), int(pending)
    finally:
        await conn.close()


# --------------------------------------------------------------------------- taken over


async def test_a_webhook_failing_twice_on_a_is_delivered_by_b_with_the_same_id(
    replicas: MakeReplica, receiver: Receiver, redis_url: str
) -> None:
    receiver.script = [500, 500]
    a = await replicas("a")
    sent = with_result(record(webhookURL=f"{receiver.url}/hook?token=t1"), receiver)
    a.deliveries.deliver(sent, b"")
    [delivery] = sent.deliveries
    # reported after the progress is in Redis: A dies in its backoff before attempt 3
    await until(lambda: [d.attempts for d in a.outcomes] == [1, 2])
    await kill(a)
    assert len(receiver.requests) == 2
    b = await replicas("b")
    await until(lambda: b.outcomes and b.outcomes[-1].state != "pending", within=3000 * MS)
    assert [(d.id, d.state, d.attempts, d.last_status) for d in b.outcomes] == [
        (delivery.id, "delivered", 3, 200)
    ]
    verifier = standardwebhooks.Webhook(SECRET)
    assert len(receiver.requests) == 3
    for method, path, headers, body in receiver.requests:
        assert (method, path, headers["webhook-id"]) == ("POST", "/hook?token=t1", delivery.id)
        verifier.verify(body, headers)  # raises on a bad signature
    assert len({body for *_, body in receiver.requests}) == 1
    assert await stream_state(redis_url, b) == (0, 0)  # acked and deleted
    assert b.metrics.deliveries.labels("webhook", "delivered")._value.get() == 1
    # the dead replica's consumer goes, ten leases after its last word
    assert b.conn is not None
    client, stream = b.conn.client, b.conn.key("deliveries")
    names = [c["name"] for c in await client.xinfo_consumers(stream, "deliveries")]
    assert b"a" in names or "a" in names
    for _ in range(40):
        names = [c["name"] for c in await client.xinfo_consumers(stream, "deliveries")]
        if names in ([b"b"], ["b"]):
            break
        await asyncio.sleep(LEASE / 2)
    assert names in ([b"b"], ["b"])


async def test_an_upload_continues_on_b(
    replicas: MakeReplica, receiver: Receiver, redis_url: str
) -> None:
    receiver.script = [500, 503]
    a = await replicas("a")
    endpoint = f"{receiver.url}/put/{{imageUUID}}.png?X-Amz-Signature=s3cr3t"
    sent = with_result(record(uploadEndpoint=endpoint), receiver)
    a.deliveries.deliver(sent, b"")
    [delivery] = sent.deliveries
    assert "s3cr3t" not in delivery.target
    await until(lambda: [d.attempts for d in a.outcomes] == [1, 2])
    await kill(a)
    b = await replicas("b")
    await until(lambda: b.outcomes and b.outcomes[-1].state != "pending", within=3000 * MS)
    assert [(d.state, d.attempts) for d in b.outcomes] == [("delivered", 3)]
    path = f"/put/{sent.results[0].imageUUID}.png?X-Amz-Signature=s3cr3t"
    assert [(m, p, h["content-type"], body) for m, p, h, body in receiver.requests] == [
        ("PUT", path, "image/png", IMAGE)
    ] * 3
    assert receiver.fetches == 2  # once per replica that ran it
    assert await stream_state(redis_url, b) == (0, 0)


async def test_a_job_finished_on_a_is_never_delivered_again_by_b(
    replicas: MakeReplica, receiver: Receiver, redis_url: str
) -> None:
    receiver.script = [500]
    a = await replicas("a")
    b = await replicas("b")
    sent = with_result(record(webhookURL=f"{receiver.url}/hook"), receiver)
    a.deliveries.deliver(sent, b"")
    await until(lambda: sent.deliveries[0].state == "delivered")
    await until(lambda: a.deliveries.pending == 0)
    assert await stream_state(redis_url, a) == (0, 0)
    await kill(a)
    await asyncio.sleep(3 * LEASE)  # several claims by B
    assert b.outcomes == [] and len(receiver.requests) == 2


async def test_a_slow_live_replica_keeps_its_job(replicas: MakeReplica, receiver: Receiver) -> None:
    receiver.script = [500]
    backoff = 4 * LEASE  # A waits four leases between its attempts, refreshing its hold
    a = await replicas("a", backoff_initial=backoff, backoff_max=backoff)
    b = await replicas("b")
    sent = with_result(record(webhookURL=f"{receiver.url}/hook"), receiver)
    a.deliveries.deliver(sent, b"")
    await until(lambda: sent.deliveries[0].state == "delivered", within=backoff + 2000 * MS)
    assert [(d.state, d.attempts) for d in a.outcomes] == [("pending", 1), ("delivered", 2)]
    assert b.outcomes == [] and len(receiver.requests) == 2


async def test_jobs_left_at_drain_stay_for_another_replica(
    replicas: MakeReplica, receiver: Receiver, redis_url: str
) -> None:
    receiver.script = [500]
    a = await replicas("a", backoff_initial=LEASE, backoff_max=LEASE)
    sent = with_result(record(webhookURL=f"{receiver.url}/hook"), receiver)
    a.deliveries.deliver(sent, b"")
    await until(lambda: len(a.outcomes) == 1)
    await a.deliveries.drain(10 * MS)  # shorter than the backoff: the job is left
    await a.deliveries.close()
    assert await stream_state(redis_url, a) == (1, 1)  # not acked
    b = await replicas("b")
    await until(lambda: b.outcomes and b.outcomes[-1].state != "pending", within=3000 * MS)
    assert [(d.state, d.attempts) for d in b.outcomes] == [("delivered", 2)]


# --------------------------------------------------------------------------- bounds, outages


async def test_past_max_jobs_a_new_job_waits_in_redis_for_the_claimers(
    replicas: MakeReplica, receiver: Receiver, redis_url: str
) -> None:
    receiver.delay = 100 * MS
    a = await replicas("a", max_jobs=1)
    first, second = (
        with_result(record(webhookURL=f"{receiver.url}/hook"), receiver) for _ in range(2)
    )
    a.deliveries.deliver(first, b"")
    await until(lambda: len(a.deliveries.holds.entries) == 1)
    a.deliveries.deliver(second, b"")
    await until(lambda: a.deliveries.pending == 0)
    # left in Redis, unheld: the record's delivery stays pending until a claimer runs it
    assert second.deliveries[0].state == "pending"
    assert await stream_state(redis_url, a) == (1, 1)
    await until(lambda: (a.last(second.deliveries[0].id) or second.deliveries[0]).state
                == "delivered", within=3000 * MS)  # fmt: skip
    assert receiver.most_in_flight == 1 and len(receiver.requests) == 2
    assert await stream_state(redis_url, a) == (0, 0)


async def test_redis_unavailable_at_creation_delivers_in_memory_and_counts_it(
    replicas: MakeReplica, receiver: Receiver
) -> None:
    receiver.script = [500]
    with capture_logs() as logs:
        a = await replicas("a", url=f"redis://127.0.0.1:{free_port()}/0")
        sent = [with_result(record(webhookURL=f"{receiver.url}/hook"), receiver) for _ in range(2)]
        for one in sent:
            a.deliveries.deliver(one, b"")
        await until(lambda: all(s.deliveries[0].state == "delivered" for s in sent))
    assert [s.deliveries[0].attempts for s in sent] == [2, 1]
    assert a.metrics.registry.get_sample_value("tenebra_delivery_not_durable_total") == 2
    outage = [e for e in logs if e["event"] == "deliveries not durable: redis unavailable"]
    assert len(outage) == 1  # once per outage, not once per delivery
    keeper = a.deliveries._keeper
    assert keeper is not None and not keeper.done()  # it backs off and goes on


async def test_the_memory_backend_behaves_as_before(
    replicas: MakeReplica, receiver: Receiver
) -> None:
    receiver.script = [500, 503]
    a = await replicas("a", durable=False)
    sent = with_result(record(webhookURL=f"{receiver.url}/hook"), receiver)
    a.deliveries.deliver(sent, b"")
    [delivery] = sent.deliveries
    await until(lambda: delivery.state != "pending")
    assert (delivery.state, delivery.attempts, delivery.last_status) == ("delivered", 3, 200)
    assert {h["webhook-id"] for _, _, h, _ in receiver.requests} == {delivery.id}
    assert [(d.state, d.attempts) for d in a.outcomes] == [
        ("pending", 1),
        ("pending", 2),
        ("delivered", 3),
    ]
    assert a.deliveries._keeper is None
    assert a.metrics.registry.get_sample_value("tenebra_delivery_not_durable_total") == 0


async def test_a_job_another_replica_took_stops_here(
    replicas: MakeReplica, receiver: Receiver, redis_url: str
) -> None:
    receiver.script = [500]
    a = await replicas("a", backoff_initial=10 * LEASE, backoff_max=10 * LEASE)
    sent = with_result(record(webhookURL=f"{receiver.url}/hook"), receiver)
    a.deliveries.deliver(sent, b"")
    await until(lambda: len(a.outcomes) == 1)
    [entry] = a.deliveries.holds.entries.values()
    jobs = a.deliveries.holds.jobs
    assert isinstance(jobs, RedisJobs) and a.conn is not None
    # as a claimer does once A has been silent for a lease (a partition, a long pause)
    await a.conn.client.xclaim(jobs.stream, "deliveries", "elsewhere", 0, [entry], justid=True)
    await until(lambda: a.deliveries.pending == 0, within=3000 * MS)  # A's next refresh
    assert len(receiver.requests) == 1 and len(a.outcomes) == 1
    assert await stream_state(redis_url, a) == (1, 1)  # left to its new holder


async def test_an_ack_redis_missed_is_retried_and_the_job_is_not_redone(
    replicas: MakeReplica, receiver: Receiver, redis_url: str
) -> None:
    a = await replicas("a")
    jobs = a.deliveries.holds.jobs
    finish = jobs.finish
    failed = 0

    async def unavailable_once(entry: str, job: Any, linger: float) -> None:
        nonlocal failed
        if not failed:
            failed += 1
            raise StoreUnavailable("redis: a blip")
        await finish(entry, job, linger)

    jobs.finish = unavailable_once  # type: ignore[method-assign]
    b = await replicas("b")
    sent = with_result(record(webhookURL=f"{receiver.url}/hook"), receiver)
    a.deliveries.deliver(sent, b"")
    await until(lambda: sent.deliveries[0].state == "delivered")
    assert failed == 1 and list(a.deliveries.holds.unacked) == [sent.deliveries[0].id]
    await until(lambda: not a.deliveries.holds.unacked, within=3000 * MS)
    assert await stream_state(redis_url, a) == (0, 0)
    await asyncio.sleep(2 * LEASE)
    assert b.outcomes == [] and len(receiver.requests) == 1


# --------------------------------------------------------------------------- Redis lost it


async def test_a_job_redis_forgot_under_its_holder_still_delivers_in_memory(
    replicas: MakeReplica, receiver: Receiver, redis_url: str
) -> None:
    receiver.script = [500]  # the first job's first attempt; 200 after: the receiver recovers
    backoff = 4 * LEASE  # several refreshes between the attempts
    a = await replicas("a", backoff_initial=backoff, backoff_max=backoff)
    first = with_result(record(webhookURL=f"{receiver.url}/first"), receiver)
    a.deliveries.deliver(first, b"")
    await until(lambda: len(a.outcomes) == 1)
    [delivery] = first.deliveries
    assert a.conn is not None
    # Redis restarted without persistence, and a new job recreated the stream and its group
    # before A's next refresh (in one transaction, so that no refresh comes in between, as it
    # may in production); then a new job through A
    async with a.conn.client.pipeline(transaction=True) as pipe:
        pipe.flushdb()
        pipe.xgroup_create(a.conn.key("deliveries"), "deliveries", "0", mkstream=True)
        await pipe.execute()
    second = with_result(record(webhookURL=f"{receiver.url}/second"), receiver)
    with capture_logs() as logs:
        a.deliveries.deliver(second, b"")
        await until(lambda: first.deliveries[0].state != "pending", within=backoff + 3000 * MS)
        await until(lambda: second.deliveries[0].state != "pending")
    assert (delivery.state, delivery.attempts) == ("delivered", 2)
    assert second.deliveries[0].state == "delivered"
    assert [(p, h["webhook-id"]) for _, p, h, _ in receiver.requests if p == "/first"] == [
        ("/first", delivery.id)
    ] * 2
    assert [e["delivery"] for e in logs if e["event"].startswith("delivery forgotten")] == [
        delivery.id
    ]
    assert a.metrics.registry.get_sample_value("tenebra_delivery_not_durable_total") == 1
    await until(lambda: a.deliveries.pending == 0)
    assert await stream_state(redis_url, a) == (0, 0)  # the second acked; nothing of the first
    assert a.deliveries.holds.entries == {} and a.deliveries.holds.unacked == {}


async def test_a_job_another_replica_finished_stops_here(
    replicas: MakeReplica, receiver: Receiver, redis_url: str
) -> None:
    """Taken, not forgotten: its entry is in no pending list, but its tombstone says why."""
    receiver.script = [500]
    a = await replicas("a", backoff_initial=10 * LEASE, backoff_max=10 * LEASE)
    sent = with_result(record(webhookURL=f"{receiver.url}/hook"), receiver)
    a.deliveries.deliver(sent, b"")
    await until(lambda: len(a.outcomes) == 1)
    [(delivery_id, entry)] = a.deliveries.holds.entries.items()
    jobs = a.deliveries.holds.jobs
    assert isinstance(jobs, RedisJobs) and a.conn is not None
    # as a replica that claimed it while A was silent, and delivered it, does
    elsewhere = RedisJobs(a.conn)
    await elsewhere.finish(entry, a_job(delivery_id, f"{receiver.url}/hook"), 10 * LEASE)
    await until(lambda: a.deliveries.pending == 0, within=3000 * MS)  # A's next refresh
    assert len(receiver.requests) == 1 and len(a.outcomes) == 1
    assert a.metrics.registry.get_sample_value("tenebra_delivery_not_durable_total") == 0
    assert await stream_state(redis_url, a) == (0, 0)


async def test_a_jobs_hash_expires_but_not_before_it_could_still_be_tried(
    replicas: MakeReplica, receiver: Receiver, redis_url: str
) -> None:
    receiver.script = [500]
    backoff = 4 * LEASE
    a = await replicas("a", backoff_initial=backoff, backoff_max=backoff, attempts=3)
    sent = with_result(record(webhookURL=f"{receiver.url}/hook"), receiver)
    a.deliveries.deliver(sent, b"")
    await until(lambda: len(a.deliveries.holds.entries) == 1)
    [delivery_id] = a.deliveries.holds.entries
    jobs = a.deliveries.holds.jobs
    assert isinstance(jobs, RedisJobs) and a.conn is not None
    key = jobs.job_key(delivery_id)
    settings = a.deliveries.settings
    # the longest the job can still take: every attempt, every backoff at its ceiling
    longest = settings.attempts * (settings.timeout + settings.backoff_max)
    ttl = await a.conn.client.pttl(key)
    assert 2 * longest * 1000 < ttl < 3600 * 1000  # expires: not -1
    await until(lambda: len(a.outcomes) == 1)  # the progress write starts it again
    assert await a.conn.client.hexists(key, "progress")
    assert await a.conn.client.pttl(key) > 2 * longest * 1000
    await until(lambda: sent.deliveries[0].state == "delivered", within=backoff + 3000 * MS)
    # a tombstone now, for ten leases: what tells a lagging holder the job ended elsewhere
    assert await a.conn.client.hgetall(key) in ({b"done": b"1"}, {"done": "1"})
    assert 0 < await a.conn.client.pttl(key) <= 10 * LEASE * 1000
    assert await stream_state(redis_url, a) == (0, 0)


# --------------------------------------------------------------------------- nothing dies silently


async def test_jobs_that_cannot_run_fail_logged_and_the_keeper_goes_on(
    replicas: MakeReplica, receiver: Receiver, redis_url: str
) -> None:
    """Jobs from another version, claimed: one with a URL that does not parse (which the keeper
    shows), one that raises in its attempt. Each fails, with a traceback logged for the second,
    and is acked: not a keeper that dies, nor a job claimed and crashing again every lease."""
    a = await replicas("a")
    assert a.conn is not None
    dead = RedisJobs(a.conn)
    unparsed = a_job("msg_unparsed", "http://[::1/hook")
    raising = msgspec.structs.replace(
        a_job("msg_raising", f"{receiver.url}/put"),
        kind="upload",
        image_base64=base64.b64encode(IMAGE).decode(),
        content_type="image/png\r\nX-Injected: 1",  # aiohttp refuses it: ValueError
    )
    with capture_logs() as logs:
        for job in (unparsed, raising):
            assert await dead.add(job, "dead", 60.0) is not None
        await until(lambda: a.last("msg_unparsed") and a.last("msg_raising"), within=3000 * MS)
        await until(lambda: a.deliveries.pending == 0)
    outcomes = [a.last("msg_unparsed"), a.last("msg_raising")]
    assert [(d.state, d.attempts, d.last_error) for d in outcomes if d] == [
        ("failed", 1, "egress refused: the URL does not parse"),
        ("failed", 1, "internal error: ValueError"),
    ]
    [logged] = [e for e in logs if e["event"] == "delivery attempt failed unexpectedly"]
    assert logged["log_level"] == "error" and logged["exc_info"] is True
    assert await stream_state(redis_url, a) == (0, 0)
    assert receiver.requests == []
    keeper = a.deliveries._keeper
    assert keeper is not None and not keeper.done()
    # and the keeper still claims
    await dead.add(a_job("msg_later", f"{receiver.url}/later"), "dead", 60.0)
    await until(lambda: [d.state for d in a.outcomes if d.id == "msg_later"] == ["delivered"],
                within=3000 * MS)  # fmt: skip


async def test_the_keeper_survives_what_it_did_not_expect(replicas: MakeReplica) -> None:
    a = await replicas("a")
    keep = a.deliveries.holds.keep
    calls = 0

    async def broken_twice(claiming: bool) -> Any:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("a bug")
        return await keep(claiming)

    a.deliveries.holds.keep = broken_twice  # type: ignore[method-assign]
    with capture_logs() as logs:
        await until(lambda: calls >= 4, within=3000 * MS)
    failed = [e for e in logs if e["event"] == "delivery jobs: keeping failed"]
    assert len(failed) == 2 and all(e["exc_info"] is True for e in failed)
    keeper = a.deliveries._keeper
    assert keeper is not None and not keeper.done()


async def test_per_host_semaphores_do_not_outlive_their_deliveries(
    replicas: MakeReplica, receiver: Receiver
) -> None:
    receiver.script = [500]
    a = await replicas("a", durable=False)
    sent = [with_result(record(webhookURL=f"{receiver.url}/hook"), receiver) for _ in range(3)]
    for one in sent:
        a.deliveries.deliver(one, b"")
    await until(lambda: all(s.deliveries[0].state == "delivered" for s in sent))
    await until(lambda: a.deliveries.pending == 0)
    assert a.deliveries._hosts == {}  # else one semaphore per host ever delivered to
