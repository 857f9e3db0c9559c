"""The local provider over a raw WebSocket: every protocol behaviour and every fault switch."""

from __future__ import annotations

import asyncio
import base64
import io
import random
import time
import uuid

import aiohttp
import pytest
from PIL import Image

from gateway.provider.pool import RenderPool
from gateway.provider.server import LocalProvider, ProviderConfig
from tests.gateway.conftest import KEY, Client, Clock, connect, set_faults, task, until
from tests.gateway.provider.conftest import PictureServer
from tests.timing import MS


async def authed(http: aiohttp.ClientSession, provider: LocalProvider) -> Client:
    client = await connect(http, provider.url)
    await client.auth()
    return client


# --------------------------------------------------------------------------- auth and ping


async def test_auth_reply_is_the_next_frame(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    client = await connect(http, provider.url)
    session = await client.auth()
    assert uuid.UUID(session).version == 4


async def test_a_bad_key_is_refused_and_the_socket_stays_usable(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    client = await connect(http, provider.url)
    await client.send({"taskType": "authentication", "apiKey": "wrong"})
    [error] = (await client.recv())["errors"]
    assert error["code"] == "invalidApiKey"
    assert error["taskType"] == "authentication" and error["parameter"] == "apiKey"
    await client.auth()


async def test_tasks_before_auth_get_missing_api_key(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    client = await connect(http, provider.url)
    first, second = task(), {"taskType": "getResponse", "taskUUID": str(uuid.uuid4())}
    await client.send(first, second)
    errors = (await client.recv())["errors"]
    assert [(e["code"], e["taskType"], e["taskUUID"]) for e in errors] == [
        ("missingApiKey", "imageInference", first["taskUUID"]),
        ("missingApiKey", "getResponse", second["taskUUID"]),
    ]
    assert provider.stats.submissions == 0


async def test_ping_pong_echoes_the_task_uuid(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    client = await connect(http, provider.url)
    await client.send({"taskType": "ping", "ping": True})
    assert await client.recv() == {"data": [{"taskType": "ping", "pong": True}]}
    ping_uuid = str(uuid.uuid4())
    await client.send({"taskType": "ping", "taskUUID": ping_uuid})
    assert await client.recv() == {
        "data": [{"taskType": "ping", "pong": True, "taskUUID": ping_uuid}]
    }


async def test_idle_connections_are_closed(
    render_pool: RenderPool, http: aiohttp.ClientSession
) -> None:
    provider = LocalProvider(
        ProviderConfig(keys=frozenset({KEY}), idle_timeout=300 * MS), pool=render_pool
    )
    await provider.start()
    try:
        client = await connect(http, provider.url)
        message = await client.ws.receive(timeout=5000 * MS)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert client.ws.close_code == 1000
    finally:
        await provider.stop()


# --------------------------------------------------------------------------- images


async def test_sync_results_one_image_per_frame(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    client = await authed(http, provider)
    sent = task(numberResults=3, width=1264, height=848)
    await client.send(sent)
    items = []
    for _ in range(3):
        frame = await client.recv()
        assert len(frame["data"]) == 1
        items.append(frame["data"][0])
    assert {i["taskUUID"] for i in items} == {sent["taskUUID"]}
    assert {i["taskType"] for i in items} == {"imageInference"}
    assert len({i["imageUUID"] for i in items}) == 3
    assert (
        sorted(i["seed"] for i in items) == [items[0]["seed"] + k for k in range(3)]
        or len({i["seed"] for i in items}) == 3
    )
    for item in items:
        assert "cost" not in item and "NSFWContent" not in item and "status" not in item
        async with http.get(item["imageURL"]) as response:
            assert response.status == 200
            assert response.content_type == "image/jpeg"
            image = Image.open(io.BytesIO(await response.read()))
            assert image.size == (1264, 848)


async def test_async_ack_then_cumulative_get_response(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, latency={"kind": "fixed", "ms": 400 * MS * 1000})
    client = await authed(http, provider)
    sent = task(deliveryMethod="async", numberResults=2)
    await client.send(sent)
    assert await client.recv() == {
        "data": [{"taskType": "imageInference", "taskUUID": sent["taskUUID"]}]
    }
    poll = {"taskType": "getResponse", "taskUUID": sent["taskUUID"]}
    await client.send(poll)
    early = (await client.recv())["data"]
    assert [i["status"] for i in early] == ["processing", "processing"]
    assert {i["taskType"] for i in early} == {"imageInference"}
    while True:
        await asyncio.sleep(100 * MS)
        await client.send(poll)
        items = (await client.recv())["data"]
        if all(i["status"] == "success" for i in items):
            break
    assert len(items) == 2 and all(i["imageUUID"] and i["imageURL"] for i in items)
    # async results are never pushed on the socket
    with pytest.raises(asyncio.TimeoutError):
        await client.recv(within=200 * MS)


async def test_conflicting_task_uuid(provider: LocalProvider, http: aiohttp.ClientSession) -> None:
    client = await authed(http, provider)
    sent = task()
    await client.send(sent)
    await client.recv()
    await client.send(sent)
    [error] = (await client.recv())["errors"]
    assert (error["code"], error["taskUUID"], error["parameter"]) == (
        "conflictTaskUUID",
        sent["taskUUID"],
        "taskUUID",
    )
    assert provider.stats.submissions == 1 and provider.stats.conflicts == 1


async def test_cost_and_safety_fields(provider: LocalProvider, http: aiohttp.ClientSession) -> None:
    set_faults(provider, fast=True)
    client = await authed(http, provider)
    await client.send(task(includeCost=True, safety={"checkContent": True}))
    [item] = (await client.recv())["data"]
    assert item["cost"] == 0.195 and item["NSFWContent"] is False
    await client.send(task(includeCost=True, width=4096, height=4096))
    [item] = (await client.recv())["data"]
    assert item["cost"] == 0.338 and "NSFWContent" not in item


@pytest.mark.parametrize(
    ("output_type", "output_format", "field", "pil_format"),
    [
        ("base64Data", "PNG", "imageBase64Data", "PNG"),
        ("dataURI", "WEBP", "imageDataURI", "WEBP"),
        ("URL", "WEBP", "imageURL", "WEBP"),
    ],
)
async def test_output_types(
    provider: LocalProvider,
    http: aiohttp.ClientSession,
    output_type: str,
    output_format: str,
    field: str,
    pil_format: str,
) -> None:
    client = await authed(http, provider)
    await client.send(
        task(outputType=output_type, outputFormat=output_format.lower(), width=896, height=1200)
    )
    [item] = (await client.recv())["data"]
    value = item[field]
    if output_type == "URL":
        assert value.endswith(".webp")
        async with http.get(value) as response:
            assert response.content_type == "image/webp"
            data = await response.read()
    elif output_type == "dataURI":
        prefix, _, encoded = value.partition(",")
        assert prefix == "data:image/webp;base64"
        data = base64.b64decode(encoded)
    else:
        data = base64.b64decode(value)
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.size) == (pil_format, (896, 1200))


async def test_a_bad_task_fails_alone(provider: LocalProvider, http: aiohttp.ClientSession) -> None:
    set_faults(provider, fast=True)
    client = await authed(http, provider)
    good, bad = task(), task(outputQuality=7)
    await client.send(bad, good)
    frames = [await client.recv(), await client.recv()]
    errors = next(f["errors"] for f in frames if "errors" in f)
    data = next(f["data"] for f in frames if "data" in f)
    assert [(e["code"], e["taskUUID"]) for e in errors] == [
        ("invalidOutputQuality", bad["taskUUID"])
    ]
    assert data[0]["taskUUID"] == good["taskUUID"]


async def test_image_urls_expire_with_their_ttl(
    render_pool: RenderPool, http: aiohttp.ClientSession, clock: Clock
) -> None:
    provider = LocalProvider(ProviderConfig(keys=frozenset({KEY})), clock=clock, pool=render_pool)
    await provider.start()
    try:
        client = await authed(http, provider)
        await client.send(task(ttl=60, outputFormat="PNG"))
        [item] = (await client.recv())["data"]
        url = item["imageURL"]
        async with http.get(url) as response:
            assert response.status == 200
        async with http.get(url.replace(".png", ".jpg")) as response:
            assert response.status == 404
        clock.advance(60)
        async with http.get(url) as response:
            assert response.status == 404
    finally:
        await provider.stop()


async def test_a_task_past_the_render_queue_is_refused_whole_and_may_come_again(
    http: aiohttp.ClientSession,
) -> None:
    """Room for a task's images is held when it is accepted; a task with more images than
    there is room for is refused whole, before it is recorded: unbilled, and the same taskUUID
    is accepted once there is room (no conflictTaskUUID)."""
    provider = LocalProvider(
        ProviderConfig(keys=frozenset({KEY})), pool=RenderPool(workers=1, max_queue=2)
    )
    set_faults(provider, fast=True, latency={"kind": "fixed", "ms": 200 * MS * 1000})
    await provider.start()
    try:
        client = await authed(http, provider)
        first, second = task(numberResults=2), task()
        await client.send(first, second)
        [error] = (await client.recv())["errors"]
        assert (error["code"], error["taskUUID"]) == ("rateLimitExceeded", second["taskUUID"])
        for _ in range(2):
            assert (await client.recv())["data"][0]["taskUUID"] == first["taskUUID"]
        await client.send(second)
        assert (await client.recv())["data"][0]["taskUUID"] == second["taskUUID"]
        assert (provider.stats.submissions, provider.stats.refusals) == (2, 1)
        assert provider.pool.in_hand == 0
    finally:
        await provider.stop()


# --------------------------------------------------------------------------- reference images


async def test_reference_images_in_every_form(
    render_pool: RenderPool, http: aiohttp.ClientSession, picture_server: PictureServer
) -> None:
    url, png = picture_server.url(), picture_server.body
    config = ProviderConfig(keys=frozenset({KEY}), allow=["127.0.0.1/32"])
    provider = LocalProvider(config, pool=render_pool)
    await provider.start()
    try:
        await _every_form(provider, http, url, png)
    finally:
        await provider.stop()


async def _every_form(
    provider: LocalProvider, http: aiohttp.ClientSession, url: str, png: bytes
) -> None:
    client = await authed(http, provider)
    await client.send(task(width=1264, height=848))
    [first] = (await client.recv())["data"]
    b64 = base64.b64encode(png).decode()
    for image in (first["imageUUID"], url, f"data:image/png;base64,{b64}", b64):
        sent = task(inputs={"referenceImages": [{"image": image, "type": "reference"}]})
        await client.send(sent)
        frame = await client.recv()
        assert "data" in frame, (image[:40], frame)
        assert frame["data"][0]["taskUUID"] == sent["taskUUID"]


async def test_an_unknown_reference_uuid_fails_the_task(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    client = await authed(http, provider)
    sent = task(referenceImages=[str(uuid.uuid4())])
    await client.send(sent)
    [error] = (await client.recv())["errors"]
    assert (error["code"], error["taskUUID"]) == ("invalidReferenceImages", sent["taskUUID"])


# --------------------------------------------------------------------------- sessions


async def test_resume_delivers_missed_frames_in_order_after_the_auth_reply(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True, latency={"kind": "fixed", "ms": 150 * MS * 1000})
    client = await connect(http, provider.url)
    session = await client.auth()
    sent = [task(numberResults=2) for _ in range(3)]
    await client.send(*sent)
    await client.ws.close()
    await until(lambda: provider.stats.images == 6)
    again = await connect(http, provider.url)
    assert await again.auth(session=session) == session
    missed = [(await again.recv())["data"][0] for _ in range(6)]
    assert sorted(i["taskUUID"] for i in missed) == sorted(
        t["taskUUID"] for t in sent for _ in (0, 1)
    )
    assert len({i["imageUUID"] for i in missed}) == 6
    # exactly once: nothing more follows
    with pytest.raises(asyncio.TimeoutError):
        await again.recv(within=200 * MS)
    assert provider.stats.resumed == 1


async def test_unknown_or_expired_sessions_get_a_fresh_one(
    render_pool: RenderPool, http: aiohttp.ClientSession, clock: Clock
) -> None:
    provider = LocalProvider(ProviderConfig(keys=frozenset({KEY})), clock=clock, pool=render_pool)
    await provider.start()
    try:
        unknown = str(uuid.uuid4())
        client = await connect(http, provider.url)
        fresh = await client.auth(session=unknown)
        assert fresh != unknown
        await client.ws.close()
        await until(lambda: provider.stats.open_connections == 0)
        clock.advance(121)
        again = await connect(http, provider.url)
        assert await again.auth(session=fresh) != fresh
    finally:
        await provider.stop()


async def test_a_session_belongs_to_its_key(
    render_pool: RenderPool, http: aiohttp.ClientSession
) -> None:
    provider = LocalProvider(ProviderConfig(keys=frozenset({KEY, "other"})), pool=render_pool)
    await provider.start()
    try:
        client = await connect(http, provider.url)
        session = await client.auth()
        await client.ws.close()
        thief = await connect(http, provider.url)
        assert await thief.auth(key="other", session=session) != session
    finally:
        await provider.stop()


# --------------------------------------------------------------------------- faults


async def test_latency_fault(provider: LocalProvider, http: aiohttp.ClientSession) -> None:
    set_faults(provider, fast=True, latency={"kind": "fixed", "ms": 300 * MS * 1000})
    client = await authed(http, provider)
    started = time.monotonic()
    await client.send(task())
    await client.recv()
    assert time.monotonic() - started >= 300 * MS


async def test_error_rate_fault(provider: LocalProvider, http: aiohttp.ClientSession) -> None:
    set_faults(provider, error_rate=1.0, error_code="timeoutProvider")
    client = await authed(http, provider)
    sent = task(numberResults=3)
    await client.send(sent)
    [error] = (await client.recv())["errors"]
    assert (error["code"], error["taskUUID"], error["taskType"]) == (
        "timeoutProvider",
        sent["taskUUID"],
        "imageInference",
    )
    await client.send({"taskType": "getResponse", "taskUUID": sent["taskUUID"]})
    [polled] = (await client.recv())["errors"]
    assert polled["status"] == "error" and polled["code"] == "timeoutProvider"


async def test_drop_after_frames_fault(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True, drop_after_frames=2)
    client = await connect(http, provider.url)
    await client.auth()  # frame 1
    await client.send(task(numberResults=3))
    await client.recv()  # frame 2, then the provider drops the connection
    message = await client.ws.receive(timeout=5000 * MS)
    assert message.type in (
        aiohttp.WSMsgType.CLOSE,
        aiohttp.WSMsgType.CLOSED,
        aiohttp.WSMsgType.ERROR,
    )
    assert provider.stats.dropped_connections == 1


async def test_drop_probability_fault(provider: LocalProvider, http: aiohttp.ClientSession) -> None:
    set_faults(provider, drop_probability=1.0)
    client = await connect(http, provider.url)
    await client.auth()
    message = await client.ws.receive(timeout=5000 * MS)
    assert message.type in (
        aiohttp.WSMsgType.CLOSE,
        aiohttp.WSMsgType.CLOSED,
        aiohttp.WSMsgType.ERROR,
    )


async def test_stall_fault_answers_nothing_until_lifted(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    client = await authed(http, provider)
    set_faults(provider, stall=True)
    await client.send({"taskType": "ping", "ping": True})
    with pytest.raises(asyncio.TimeoutError):
        await client.recv(within=300 * MS)
    assert not client.ws.closed  # TCP stays open
    set_faults(provider, stall=False)
    await client.send({"taskType": "ping", "ping": True})
    assert (await client.recv())["data"][0]["pong"] is True


async def test_refuse_auth_fault(provider: LocalProvider, http: aiohttp.ClientSession) -> None:
    set_faults(provider, refuse_auth=True)
    client = await connect(http, provider.url)
    await client.send({"taskType": "authentication", "apiKey": KEY})
    assert (await client.recv())["errors"][0]["code"] == "invalidApiKey"


async def test_send_delay_fault(provider: LocalProvider, http: aiohttp.ClientSession) -> None:
    set_faults(provider, send_delay_ms=200 * MS * 1000)
    client = await connect(http, provider.url)
    started = time.monotonic()
    await client.send({"taskType": "ping"}, {"taskType": "ping"})
    await client.recv()
    assert time.monotonic() - started >= 200 * MS


async def test_fast_mode_serves_one_prerendered_image(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True)
    client = await authed(http, provider)
    await client.send(task(numberResults=2))
    urls = [(await client.recv())["data"][0]["imageURL"] for _ in range(2)]
    assert all("/images/fast/" in url for url in urls) and urls[0] != urls[1]
    bodies = []
    for url in urls:
        async with http.get(url) as response:
            assert response.content_type == "image/jpeg"
            bodies.append(await response.read())
    assert bodies[0] == bodies[1]


async def test_faults_use_the_injected_randomness(http: aiohttp.ClientSession) -> None:
    async def failures(seed: int) -> list[bool]:
        provider = LocalProvider(ProviderConfig(keys=frozenset({KEY})), rng=random.Random(seed))
        set_faults(provider, fast=True, error_rate=0.5)
        await provider.start()
        try:
            client = await authed(http, provider)
            outcome = []
            for _ in range(12):
                await client.send(task())
                outcome.append("errors" in await client.recv())
            return outcome
        finally:
            await provider.stop()

    first = await failures(3)
    assert first == await failures(3)
    assert any(first) and not all(first)
