"""Issue 13, "Scale out": two gateway processes, A and B, sharing one redis-server, before one
standalone provider, driven through Runware's WebSocket protocol as clients drive them."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from websockets.exceptions import ConnectionClosed

from tests.cluster.conftest import (
    BURST,
    LEASE,
    LIMITED_KEY,
    RATE,
    Client,
    Cluster,
    Deadline,
    Item,
    make_cluster,
    readyz,
    task,
    wait_ready,
)
from tests.timing import MS


def _images(items: list[Item]) -> list[str]:
    return [item["imageUUID"] for kind, item in items if kind == "data" and "imageUUID" in item]


# --------------------------------------------------------------------------- getResponse


async def test_get_response_on_b_answers_an_async_task_sent_on_a(cluster: Cluster) -> None:
    a = await cluster.client("a")
    b = await cluster.client("b")
    sent = task(deliveryMethod="async", numberResults=2)
    await a.send(sent)
    kind, ack = await a.answer(sent["taskUUID"])
    assert kind == "data" and ack["taskType"] == "imageInference", ack
    assert "imageUUID" not in ack, ack  # an ack, not a result

    done = await b.poll_done(sent["taskUUID"], results=2)
    assert len({item["imageUUID"] for item in done}) == 2, done
    for item in done:
        assert item["taskType"] == "imageInference", item
        assert item["taskUUID"] == sent["taskUUID"], item
        assert item["imageURL"].startswith("http"), item
    # A tells the same story
    assert {i["imageUUID"] for i in await a.poll_done(sent["taskUUID"], results=2)} == {
        i["imageUUID"] for i in done
    }


# --------------------------------------------------------------------------- conflicts


async def test_the_same_task_uuid_on_b_is_a_conflict(cluster: Cluster) -> None:
    a = await cluster.client("a")
    b = await cluster.client("b")
    sent = task(deliveryMethod="async")
    await a.send(sent)
    kind, ack = await a.answer(sent["taskUUID"])
    assert kind == "data", ack

    # while it runs (or just after: the provider is fast) ...
    await b.send(sent)
    kind, error = await b.answer(sent["taskUUID"])
    assert kind == "errors" and error["code"] == "conflictTaskUUID", error
    assert error["taskType"] == "imageInference", error

    # ... and after it is done
    (image,) = await a.poll_done(sent["taskUUID"], results=1)
    await b.send(sent)
    kind, error = await b.answer(sent["taskUUID"])
    assert kind == "errors" and error["code"] == "conflictTaskUUID", error

    # neither copy ran: B's getResponse shows A's one image
    done = await b.poll_done(sent["taskUUID"], results=1)
    assert [item["imageUUID"] for item in done] == [image["imageUUID"]]


# --------------------------------------------------------------------------- a replica killed


async def test_a_client_of_a_killed_replica_resumes_on_the_other(tmp_path: Path) -> None:
    # each image takes 0.5 to 4 s, independently: the 4 arrive spread out over seconds
    slow = ["--fast", "--latency-kind", "uniform"]
    slow += ["--latency-ms", str(500 * MS * 1000), "--latency-high-ms", str(4000 * MS * 1000)]
    async with make_cluster(tmp_path, provider_flags=slow) as cluster:
        a = await cluster.client("a")
        session = a.session
        sent = task(numberResults=4)  # sync: the images stream on the socket
        await a.send(sent)
        first = Deadline(10000 * MS, "a first image on A")
        on_a: list[Item] = []
        while not _images(on_a):
            for kind, item in await a.items(first.left()):
                assert item["taskUUID"] == sent["taskUUID"], item
                assert kind == "data", item
                on_a.append((kind, item))
        await cluster.kill("a")
        killed = time.monotonic()
        on_a += await a.drain(2000 * MS)  # what A wrote before it died
        seen_on_a = _images(on_a)
        assert 1 <= len(seen_on_a) < 4, f"the kill came too late to test anything: {on_a}"

        # as the SDK does: reconnect (to B now) with the session, send the task again
        b = await cluster.client("b", session=session)
        await b.send(sent)
        on_b: list[Item] = []
        deadline = Deadline(LEASE + 4000 * MS + 15000 * MS, "all 4 images after the kill")
        try:
            while len(set(seen_on_a + _images(on_b))) < 4:
                on_b += await b.items(deadline.left())
        except (TimeoutError, ConnectionClosed) as exc:
            raise AssertionError(
                f"not all 4 images {time.monotonic() - killed:.1f} s after the kill ({exc!r}); "
                f"session {session}, B's {b.session}\nA: {on_a}\nB: {on_b}"
            ) from exc
        on_b += await b.drain(1000 * MS)  # a duplicate would come now
        took = time.monotonic() - killed

        images = seen_on_a + _images(on_b)
        twice = [image for image, count in Counter(images).items() if count > 1]
        assert not twice, f"images delivered twice: {twice}\nA: {on_a}\nB: {on_b}"
        assert len(images) == 4, (on_a, on_b)
        for _, item in on_b:
            assert item["taskUUID"] == sent["taskUUID"], item
        # the resend, as the SDK's, is a conflict and nothing more
        errors = [item["code"] for kind, item in on_b if kind == "errors"]
        assert errors == ["conflictTaskUUID"], on_b
        assert b.session == session, "B did not resume the session A held"
        print(f"all 4 images {took:.2f} s after the kill; {len(seen_on_a)} on A")


# --------------------------------------------------------------------------- webhooks


class Receiver:
    """Answers 500 to the first two POSTs of a delivery and 200 after; SIGKILLs gateway A right
    after it answered the second one."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.posts: list[tuple[float, dict[str, str], bytes]] = []  # (when, headers, body)
        self.killed_at: float | None = None
        self.url = ""
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.posts.append((time.monotonic(), dict(request.headers), body))
        self.arrived.set()
        if len(self.posts) == 2:
            # once this 500 is written: A then cannot have tried again before it dies
            asyncio.get_running_loop().call_soon(self._kill_a)
        return web.Response(status=500 if len(self.posts) <= 2 else 200)

    def _kill_a(self) -> None:
        self.cluster.gateways["a"].process.kill()
        self.killed_at = time.monotonic()


@pytest.fixture
async def webhook_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    # A's retries: 0-0.8 s, then 0-1.6 s: a third attempt by A would take that long, while B's
    # (from A's recorded next attempt time, a lease after the kill) comes within a few seconds
    async with make_cluster(
        tmp_path, backoff_initial=800 * MS, backoff_max=1600 * MS, attempts=5
    ) as instance:
        yield instance


async def test_a_webhook_failing_on_a_killed_replica_is_delivered_by_the_other(
    webhook_cluster: Cluster,
) -> None:
    cluster = webhook_cluster
    receiver = Receiver(cluster)
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        receiver.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook?token=t"
        a = await cluster.client("a")
        sent = task(deliveryMethod="async", webhookURL=receiver.url)
        await a.send(sent)
        kind, ack = await a.answer(sent["taskUUID"])
        assert kind == "data", ack

        deadline = Deadline(LEASE + 1600 * MS + 15000 * MS, "a third webhook attempt, from B")
        while len(receiver.posts) < 3:
            receiver.arrived.clear()
            await asyncio.wait_for(receiver.arrived.wait(), deadline.left())
        await asyncio.sleep(500 * MS)  # a fourth would come now
    finally:
        await runner.cleanup()

    assert receiver.killed_at is not None
    assert not cluster.gateways["a"].running
    ids = [headers.get("webhook-id") for _, headers, _ in receiver.posts]
    assert ids[0] and ids == [ids[0]] * 3, f"webhook-ids: {ids}"
    when, _, body = receiver.posts[2]
    assert when > receiver.killed_at, "the third attempt came before A was killed"
    assert body == receiver.posts[0][2], "B sent another body"
    assert sent["taskUUID"].encode() in body, body
    assert len(receiver.posts) == 3, "delivered more than once after the 200"
    print(f"third attempt {when - receiver.killed_at:.2f} s after the kill")


# --------------------------------------------------------------------------- shared limits


async def test_a_tenants_rate_limit_is_shared_by_both_replicas(cluster: Cluster) -> None:
    a = await cluster.client("a", key=LIMITED_KEY)
    b = await cluster.client("b", key=LIMITED_KEY)
    to_a = [task(deliveryMethod="async") for _ in range(4)]
    to_b = [task(deliveryMethod="async") for _ in range(4)]

    async def outcomes(client: Client, tasks: list[dict[str, Any]]) -> list[Item]:
        return [await client.answer(t["taskUUID"]) for t in tasks]

    started = time.monotonic()
    await asyncio.gather(a.send(*to_a), b.send(*to_b))
    answers = await asyncio.gather(outcomes(a, to_a), outcomes(b, to_b))
    elapsed = time.monotonic() - started

    items = answers[0] + answers[1]
    accepted = [item for kind, item in items if kind == "data"]
    refused = [item for kind, item in items if kind == "errors"]
    assert all(item["code"] == "rateLimitExceeded" for item in refused), refused
    bound = math.floor(BURST + RATE * elapsed)  # the bucket refills while the tasks arrive
    assert elapsed < 2.0, f"took {elapsed:.2f} s: too slow to tell one bucket from two"
    assert BURST <= len(accepted) <= bound, (
        f"{len(accepted)} accepted of 8 in {elapsed:.3f} s (A {answers[0]}, B {answers[1]}); "
        f"one bucket of burst {BURST} and rate {RATE}/s allows {BURST} to {bound}"
    )
    print(f"{len(accepted)} of 8 accepted in {elapsed * 1000:.1f} ms")


# --------------------------------------------------------------------------- Redis restarted


CLEAR_CODES = {"serviceUnavailable", "timeoutProvider", "providerError", "rateLimitExceeded"}


async def test_redis_killed_and_restarted_under_load(cluster: Cluster) -> None:
    clients = [
        await cluster.client("a"),
        await cluster.client("b"),
        await cluster.client("a"),
        await cluster.client("b"),
    ]
    total, spread = 60, 2000 * MS
    outcomes: dict[str, Item] = {}
    lost: dict[str, str] = {}  # taskUUID: why it has no answer

    async def load(client: Client, index: int) -> None:
        mine = [task() for _ in range(total // len(clients))]
        waiting = {t["taskUUID"] for t in mine}
        gap = spread / len(mine)
        await asyncio.sleep(gap * index / len(clients))

        async def send_all() -> None:
            for t in mine:
                await client.send(t)
                await asyncio.sleep(gap)

        sender = asyncio.create_task(send_all())
        deadline = Deadline(spread + 25000 * MS, f"{client.name}: every task answered")
        try:
            while waiting and not deadline.passed:
                for kind, item in await client.items(deadline.left()):
                    uuid = str(item.get("taskUUID"))
                    if uuid in waiting:
                        waiting.discard(uuid)
                        outcomes[uuid] = (kind, item)
        except (ConnectionClosed, TimeoutError, AssertionError) as exc:
            for uuid in waiting:
                lost[uuid] = f"{client.name}: {type(exc).__name__} {exc}"
        finally:
            with contextlib.suppress(ConnectionClosed):
                await sender

    async def outage() -> None:
        await asyncio.sleep(spread * 0.4)
        cluster.redis.kill()
        await asyncio.sleep(spread * 0.3)
        await cluster.redis.start_again()

    await asyncio.gather(outage(), *(load(c, i) for i, c in enumerate(clients)))

    assert not lost, f"{len(lost)} tasks never answered: {sorted(lost.items())[:5]}"
    assert len(outcomes) == total
    errors = [item for kind, item in outcomes.values() if kind == "errors"]
    results = [item for kind, item in outcomes.values() if kind == "data"]
    assert results and all(item.get("imageUUID") for item in results), results
    unclear = [e for e in errors if e.get("code") not in CLEAR_CODES or not e.get("message")]
    assert not unclear, unclear
    print(f"{len(results)} results, {len(errors)} errors: {Counter(e['code'] for e in errors)}")

    for name in ("a", "b"):
        await wait_ready(cluster.gateways[name], within=15000 * MS)
        assert await readyz(cluster.gateways[name].port) == 200
        client = await cluster.client(name)
        sent = task()
        await client.send(sent)
        kind, item = await client.answer(sent["taskUUID"], within=15000 * MS)
        assert kind == "data" and item.get("imageUUID"), item
