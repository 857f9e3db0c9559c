"""The gateway end to end on loopback: a raw client, the gateway, the local provider."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.config import Config, ServerSettings
from gateway.provider.server import LocalProvider
from tests.gateway.conftest import ALPHA, BETA, Client, connect, polled_images, set_faults, task
from tests.timing import MS


async def client_of(http: aiohttp.ClientSession, gateway: Gateway, key: str = ALPHA) -> Client:
    client = await connect(http, gateway.url)
    await client.auth(key=key)
    return client


async def quiet(client: Client, within: float = 200 * MS) -> None:
    """Nothing more arrives."""
    with pytest.raises(asyncio.TimeoutError):
        await client.recv(within=within)


# --------------------------------------------------------------------------- session


async def test_auth_and_ping(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    client = await connect(http, gateway.url)
    await client.send({"taskType": "ping", "ping": True})
    assert await client.recv() == {"data": [{"taskType": "ping", "pong": True}]}
    session = await client.auth(key=ALPHA)
    assert uuid.UUID(session).version == 4
    token = str(uuid.uuid4())
    await client.send({"taskType": "ping", "taskUUID": token})
    assert (await client.recv())["data"] == [{"taskType": "ping", "pong": True, "taskUUID": token}]


async def test_client_sockets_have_a_bounded_kernel_send_buffer(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    client = await client_of(http, gateway)
    await client.send({"taskType": "ping"})
    await client.recv()
    assert gateway.clients is not None
    [connection] = gateway.clients.connections
    sock = connection.request.transport.get_extra_info("socket")  # type: ignore[union-attr]
    size = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    wanted = gateway.config.server.socket_send_buffer_bytes
    assert wanted <= size <= 2 * wanted  # Linux doubles it for its own bookkeeping


async def test_bad_key_and_tasks_before_auth(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    client = await connect(http, gateway.url)
    sent = task()
    await client.send(sent)
    [error] = (await client.recv())["errors"]
    assert (error["code"], error["taskUUID"], error["taskType"]) == (
        "missingApiKey",
        sent["taskUUID"],
        "imageInference",
    )
    await client.send({"taskType": "authentication", "apiKey": "nope"})
    [error] = (await client.recv())["errors"]
    assert (error["code"], error["taskType"], error["parameter"]) == (
        "invalidApiKey",
        "authentication",
        "apiKey",
    )


# --------------------------------------------------------------------------- tasks


async def test_sync_results_stream_one_image_per_frame(
    gateway: Gateway, provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    client = await client_of(http, gateway)
    sent = task(numberResults=3, width=1264, height=848)
    await client.send(sent)
    items = [(await client.recv())["data"] for _ in range(3)]
    assert all(len(frame) == 1 for frame in items)
    results = [frame[0] for frame in items]
    assert {r["taskUUID"] for r in results} == {sent["taskUUID"]}
    assert len({r["imageUUID"] for r in results}) == 3
    assert all("cost" not in r and "status" not in r for r in results)
    async with http.get(results[0]["imageURL"]) as response:
        assert response.status == 200 and response.content_type == "image/jpeg"
    await quiet(client)
    # the provider saw only the gateway's own UUID for the task
    assert all(t.task.taskUUID != sent["taskUUID"] for t in provider.tasks)
    record = gateway.registry.lookup("alpha", sent["taskUUID"])
    assert record is not None and provider.tasks.get(_key(provider), record.upstream_uuid)


def _key(provider: LocalProvider) -> str:
    return next(iter(provider.config.keys))


async def test_cost_only_when_asked(
    gateway: Gateway, provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True)
    client = await client_of(http, gateway)
    await client.send(task(includeCost=True, numberResults=2))
    costs = [(await client.recv())["data"][0]["cost"] for _ in range(2)]
    assert costs == [0.195, 0.195]


async def test_async_ack_then_get_response(
    gateway: Gateway, provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True, latency={"kind": "fixed", "ms": 300 * MS * 1000})
    client = await client_of(http, gateway)
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
    deadline = time.monotonic() + 10000 * MS
    while True:
        await asyncio.sleep(50 * MS)
        await client.send(poll)
        items = (await client.recv())["data"]
        if all(i["status"] == "success" for i in items) or time.monotonic() > deadline:
            break
    assert [i["status"] for i in items] == ["success", "success"]
    assert all(
        i["imageUUID"] and i["imageURL"] and i["taskType"] == "imageInference" for i in items
    )
    await quiet(client)  # async results are not pushed


async def test_get_response_for_sync_unknown_and_foreign_tasks(
    gateway: Gateway, provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True)
    alpha = await client_of(http, gateway, ALPHA)
    beta = await client_of(http, gateway, BETA)
    sent = task()
    await alpha.send(sent)
    [result] = (await alpha.recv())["data"]
    await alpha.send({"taskType": "getResponse", "taskUUID": sent["taskUUID"]})
    [polled] = (await alpha.recv())["data"]
    assert polled == {**result, "status": "success"}
    for client, task_uuid in ((beta, sent["taskUUID"]), (alpha, str(uuid.uuid4()))):
        await client.send({"taskType": "getResponse", "taskUUID": task_uuid})
        [error] = (await client.recv())["errors"]
        assert (error["code"], error["taskUUID"], error["taskType"]) == (
            "taskNotFound",
            task_uuid,
            "getResponse",
        )


async def test_conflicts_are_per_tenant(
    gateway: Gateway, provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True)
    alpha = await client_of(http, gateway, ALPHA)
    beta = await client_of(http, gateway, BETA)
    sent = task()
    await alpha.send(sent)
    [mine] = (await alpha.recv())["data"]
    await alpha.send(sent)
    [error] = (await alpha.recv())["errors"]
    assert (error["code"], error["taskUUID"]) == ("conflictTaskUUID", sent["taskUUID"])
    await beta.send(sent)  # the same taskUUID from another tenant is another task
    [theirs] = (await beta.recv())["data"]
    assert theirs["taskUUID"] == sent["taskUUID"] and theirs["imageUUID"] != mine["imageUUID"]
    assert provider.stats.submissions == 2


async def test_two_spellings_of_one_task_uuid_are_one_task_each_answered_in_its_own(
    gateway: Gateway, provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    """UUIDs are case-insensitive (RFC 9562): a taskUUID sent again in another case, in a frame
    of its own or in the same frame, is the same task (conflictTaskUUID, billed once), and each
    answer carries the taskUUID as its frame spelled it: the SDKs match answers by the string
    they sent."""
    set_faults(provider, fast=True)
    client = await client_of(http, gateway)
    lower = str(uuid.uuid4())
    await client.send(task(taskUUID=lower.upper(), deliveryMethod="async"))
    assert (await client.recv())["data"][0]["taskUUID"] == lower.upper()
    await client.send(task(taskUUID=lower, deliveryMethod="async"))
    [error] = (await client.recv())["errors"]
    assert (error["code"], error["taskUUID"]) == ("conflictTaskUUID", lower)
    both = str(uuid.uuid4())
    await client.send(task(taskUUID=both, deliveryMethod="async"), task(taskUUID=both.upper()))
    frames = [await client.recv(), await client.recv()]
    assert [i["taskUUID"] for f in frames for i in f.get("data", [])] == [both]
    assert [(e["code"], e["taskUUID"]) for f in frames for e in f.get("errors", [])] == [
        ("conflictTaskUUID", both.upper())
    ]
    for spelling in (lower, lower.upper()):
        images = await polled_images(client, spelling, tries=200)
        assert [i["taskUUID"] for i in images] == [spelling]
    assert provider.stats.submissions == 2


async def test_mixed_frame_each_task_alone_data_and_errors_apart(
    gateway: Gateway, provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True)
    client = await client_of(http, gateway)
    good, bad, late = task(deliveryMethod="async"), task(numberResults=21), task()
    await client.send(good, bad, {"taskType": "ping"}, late)
    frames = [await client.recv() for _ in range(3)]
    assert all(len(f) == 1 for f in frames)  # never data and errors in one frame
    errors = [e for f in frames for e in f.get("errors", [])]
    assert [(e["code"], e["taskUUID"]) for e in errors] == [
        ("invalidNumberResults", bad["taskUUID"])
    ]
    data = [d for f in frames for d in f.get("data", [])]
    assert {"taskType": "imageInference", "taskUUID": good["taskUUID"]} in data
    assert any(d.get("taskUUID") == late["taskUUID"] and "imageUUID" in d for d in data)


async def test_provider_errors_reach_the_task(
    gateway: Gateway, provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, error_rate=1.0, error_code="timeoutProvider")
    client = await client_of(http, gateway)
    sent = task()
    await client.send(sent)
    [error] = (await client.recv())["errors"]
    assert (error["code"], error["taskUUID"], error["taskType"]) == (
        "timeoutProvider",
        sent["taskUUID"],
        "imageInference",
    )
    await client.send({"taskType": "getResponse", "taskUUID": sent["taskUUID"]})
    [polled] = (await client.recv())["errors"]
    assert polled["status"] == "error" and polled["taskUUID"] == sent["taskUUID"]


# --------------------------------------------------------------------------- REST


async def test_rest_sync_async_and_errors(
    gateway: Gateway, provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True)
    url = f"http://127.0.0.1:{gateway.port}/v1"
    bearer = {"Authorization": f"Bearer {ALPHA}"}
    sync, later = task(numberResults=2), task(deliveryMethod="async")
    async with http.post(url, json=[sync, later], headers=bearer) as response:
        assert response.status == 200
        body = await response.json()
    assert "errors" not in body
    assert {"taskType": "imageInference", "taskUUID": later["taskUUID"]} in body["data"]
    assert len([d for d in body["data"] if d["taskUUID"] == sync["taskUUID"]]) == 2
    # an authentication task as element 0 works as well as the header
    auth = {"taskType": "authentication", "apiKey": ALPHA}
    poll = {"taskType": "getResponse", "taskUUID": later["taskUUID"]}
    async with http.post(url, json=[auth, poll]) as response:
        assert response.status == 200
    async with http.post(url, json=[task(outputQuality=3)], headers=bearer) as response:
        assert response.status == 400
        assert (await response.json())["errors"][0]["code"] == "invalidOutputQuality"
    async with http.post(url, json=[task()]) as response:
        assert response.status == 401
        [error] = (await response.json())["errors"]
        assert (error["code"], error["taskType"]) == ("missingApiKey", "authentication")
    async with http.post(url, json=[task()], headers={"Authorization": "Bearer x"}) as response:
        assert response.status == 401
        assert (await response.json())["errors"][0]["code"] == "invalidApiKey"


async def test_rest_sync_deadline_leaves_the_task_running(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    from tests.gateway.conftest import gateway_config

    gateway = Gateway(gateway_config(provider, rest_sync_deadline=200 * MS))
    await gateway.start()
    try:
        set_faults(provider, fast=True, latency={"kind": "fixed", "ms": 600 * MS * 1000})
        url = f"http://127.0.0.1:{gateway.port}/v1"
        bearer = {"Authorization": f"Bearer {ALPHA}"}
        sent = task()
        async with http.post(url, json=[sent], headers=bearer) as response:
            assert response.status == 504
            [error] = (await response.json())["errors"]
        assert (error["code"], error["taskUUID"]) == ("timeout", sent["taskUUID"])
        await asyncio.sleep(800 * MS)
        poll = {"taskType": "getResponse", "taskUUID": sent["taskUUID"]}
        async with http.post(url, json=[poll], headers=bearer) as response:
            [item] = (await response.json())["data"]
        assert item["status"] == "success"
    finally:
        await gateway.stop()


# --------------------------------------------------------------------------- operations


async def test_health_ready_and_metrics(
    gateway: Gateway, provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True)
    base = f"http://127.0.0.1:{gateway.port}"
    async with http.get(f"{base}/healthz") as response:
        assert response.status == 200
    async with http.get(f"{base}/readyz") as response:
        assert response.status == 200 and (await response.json())["links"] == ["ready"]
    client = await client_of(http, gateway)
    await client.send(task())
    await client.recv()
    async with http.get(f"{base}/metrics") as response:
        text = await response.text()
    assert 'tenebra_tasks_total{state="done"} 1.0' in text
    assert "tenebra_client_connections 1.0" in text
    assert 'tenebra_upstream_ready{link="0"} 1.0' in text
    assert "tenebra_task_latency_seconds_count 1.0" in text
    assert "tenebra_tasks_in_flight 0.0" in text
    assert "tenebra_task_records 1.0" in text  # finished, kept for getResponse
    frames = {
        line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tenebra_frames_total{")
    }
    assert frames['direction="in",side="client"'] >= 2  # the auth and the task
    assert frames['direction="out",side="client"'] >= 2  # the auth reply and the image
    assert frames['direction="in",side="provider"'] >= 1  # the image (auth is read apart)


async def test_not_ready_while_the_provider_refuses_us(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    from tests.gateway.conftest import gateway_config

    set_faults(provider, refuse_auth=True)
    gateway = Gateway(gateway_config(provider))
    await gateway.start()
    try:
        # the link keeps retrying (refused, then authenticating again): never ready meanwhile
        seen = set()
        async with asyncio.timeout(10000 * MS):
            while "refused" not in seen:
                async with http.get(f"http://127.0.0.1:{gateway.port}/readyz") as response:
                    assert response.status == 503
                    seen.update((await response.json())["links"])
                await asyncio.sleep(20 * MS)
        assert seen <= {"down", "connecting", "authenticating", "refused"}
    finally:
        await gateway.stop()


async def test_the_embedded_default(http: aiohttp.ClientSession) -> None:
    config = Config(server=ServerSettings(port=0, drain_deadline=0.5), demo_key="demo")
    gateway = Gateway(config)
    await gateway.start()
    try:
        assert gateway.provider is not None and gateway.pool is not None
        async with asyncio.timeout(10000 * MS):
            await gateway.pool.wait_ready()
        client = await client_of(http, gateway, "demo")
        sent = task(width=848, height=1264, outputFormat="webp")
        await client.send(sent)
        [item] = (await client.recv(within=60000 * MS))["data"]
        assert item["taskUUID"] == sent["taskUUID"] and item["imageURL"].endswith(".webp")
    finally:
        await gateway.stop()


async def test_shutdown_closes_clients_with_1012(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    from tests.gateway.conftest import gateway_config

    gateway = Gateway(gateway_config(provider))
    await gateway.start()
    client = await connect(http, gateway.url)
    await client.auth(key=ALPHA)
    await gateway.stop()
    message = await client.ws.receive(timeout=5000 * MS)
    assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 1012


async def test_a_running_sync_task_sent_again_streams_to_the_new_socket(
    gateway: Gateway, provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True, latency={"kind": "fixed", "ms": 300 * MS * 1000})
    first = await client_of(http, gateway)
    sent = task(numberResults=2)
    await first.send(sent)
    again = await client_of(http, gateway)
    await again.send(sent)  # the same task, as an SDK sends it after a dropped socket
    [error] = (await again.recv())["errors"]
    assert (error["code"], error["taskUUID"]) == ("conflictTaskUUID", sent["taskUUID"])
    theirs = [(await again.recv())["data"][0]["imageUUID"] for _ in range(2)]
    mine = [(await first.recv())["data"][0]["imageUUID"] for _ in range(2)]
    assert theirs == mine
    await first.send(sent)  # the same socket again: still one copy of each image
    assert (await first.recv())["errors"][0]["code"] == "conflictTaskUUID"
    await quiet(first)
    # a different task under a used taskUUID is only a conflict
    other = await client_of(http, gateway)
    await other.send({**task(numberResults=1), "taskUUID": sent["taskUUID"]})
    assert (await other.recv())["errors"][0]["code"] == "conflictTaskUUID"
    await quiet(other)
    assert provider.stats.submissions == 1


async def test_metrics_behind_a_bearer_token_when_one_is_set(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    from tests.gateway.conftest import gateway_config, running

    async with running(gateway_config(provider, metrics_token="s3cret")) as gateway:
        url = f"http://127.0.0.1:{gateway.port}/metrics"
        async with http.get(url) as response:
            assert response.status == 401
        async with http.get(url, headers={"Authorization": "Bearer wrong"}) as response:
            assert response.status == 401
        async with http.get(url, headers={"Authorization": "Bearer s3cret"}) as response:
            assert response.status == 200 and "tenebra_errors" in await response.text()


# shallow: a valid object with no taskType; deep: too deep to decode
NESTING_CODES = ("missingTaskType", "invalidJSON", "invalidTask")


@pytest.mark.parametrize("depth", [1, 100, 1000, 5000])
@pytest.mark.parametrize("opener", ["{", "["])
async def test_deep_nesting_is_invalid_json_at_both_doors(
    gateway: Gateway, http: aiohttp.ClientSession, opener: str, depth: int
) -> None:
    """A few KB nested thousands deep once raised RecursionError: a 500 with a traceback per
    REST request, and a socket closed with no error. Now an error item, and the socket lives."""
    inner = '{"a":' * depth + "1" + "}" * depth if opener == "{" else "[" * depth + "]" * depth
    frame = inner if opener == "{" else f"[{inner}]"
    async with http.post(
        f"http://127.0.0.1:{gateway.port}/v1",
        data=frame,
        headers={"Authorization": f"Bearer {ALPHA}", "Content-Type": "application/json"},
    ) as response:
        assert response.status == 400
        [error] = (await response.json())["errors"]
        assert error["code"] in NESTING_CODES
    client = await client_of(http, gateway)
    await client.ws.send_str(frame)
    [error] = (await client.recv())["errors"]
    assert error["code"] in NESTING_CODES
    await client.send({"taskType": "ping", "ping": True})
    assert (await client.recv())["data"][0]["pong"] is True
