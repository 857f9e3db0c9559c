"""Webhooks and uploads end to end: the gateway, the local provider, a receiver on loopback,
and a real S3 API (moto) with presigned PUT URLs."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import boto3
import pytest
import standardwebhooks
from aiohttp import web
from moto.server import ThreadedMotoServer

from gateway.app import Gateway
from gateway.provider.server import LocalProvider, ProviderConfig
from tests.gateway.conftest import (
    ALPHA,
    BETA,
    KEY,
    Clock,
    connect,
    gateway_config,
    running,
    set_faults,
    task,
    until,
)
from tests.timing import MS

SECRET = "whsec_" + base64.b64encode(b"a-secret-of-thirty-two-bytes-len").decode()


@dataclass
class Receiver:
    """A webhook and upload receiver that answers from a script, and records everything."""

    url: str = ""
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    script: list[int] = field(default_factory=list)  # statuses to answer, then 200
    delay: float = 0.0
    in_flight: int = 0
    most_in_flight: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            body = await request.read()
            self.requests.append((request.method, request.path_qs, dict(request.headers), body))
            if self.delay:
                await asyncio.sleep(self.delay)
            status = self.script.pop(0) if self.script else 200
            if status == 302:
                raise web.HTTPFound("http://127.0.0.1:1/elsewhere?sig=secret")
            return web.Response(status=status)
        finally:
            self.in_flight -= 1


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    target = Receiver()
    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", "/{tail:.*}", target.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    target.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield target
    await runner.cleanup()


def delivery_config(provider: LocalProvider, **delivery: Any) -> Any:
    config = gateway_config(provider)
    config.delivery.allow = ["127.0.0.1/32"]
    config.delivery.attempts = 3
    config.delivery.backoff_initial = 20 * MS
    config.delivery.backoff_max = 50 * MS
    config.delivery.timeout = 1000 * MS
    for name, value in delivery.items():
        setattr(config.delivery, name, value)
    config.tenants["alpha"].webhook_secret = SECRET
    config.tenants["beta"].webhook_envelope = True
    return config


@pytest.fixture
async def gateway(provider: LocalProvider) -> AsyncIterator[Gateway]:
    async with running(delivery_config(provider)) as instance:
        yield instance


async def settled_deliveries(gateway: Gateway, tenant: str, task_uuid: str, n: int) -> list[Any]:
    await until(lambda: gateway.registry.lookup(tenant, task_uuid) is not None)
    record = gateway.registry.lookup(tenant, task_uuid)
    assert record is not None
    await until(lambda: len(record.deliveries) == n and all(
        d.state != "pending" for d in record.deliveries))  # fmt: skip
    return list(record.deliveries)


# --------------------------------------------------------------------------- webhooks


async def test_one_signed_post_per_result_and_the_socket_still_gets_them(
    gateway: Gateway, provider: LocalProvider, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True)
    client = await connect(http, gateway.url)
    await client.auth(key=ALPHA)
    sent = task(numberResults=3, webhookURL=f"{receiver.url}/hook?token=t1")
    await client.send(sent)
    on_socket = [(await client.recv())["data"][0] for _ in range(3)]
    await settled_deliveries(gateway, "alpha", sent["taskUUID"], 3)
    assert len(receiver.requests) == 3
    verifier = standardwebhooks.Webhook(SECRET)
    posted = []
    for method, path, headers, body in receiver.requests:
        assert (method, path) == ("POST", "/hook?token=t1")
        assert headers["Content-Type"] == "application/json"
        lowered = {k.lower(): v for k, v in headers.items()}
        verifier.verify(body, lowered)  # raises on a bad signature
        posted.append(json.loads(body))
    # the flat form: each POST is one result item, the same the socket got
    assert sorted(p["imageUUID"] for p in posted) == sorted(i["imageUUID"] for i in on_socket)
    assert all(p["taskUUID"] == sent["taskUUID"] and p["taskType"] == "imageInference"
               for p in posted)  # fmt: skip
    assert len({h["webhook-id"] for _, _, h, _ in receiver.requests}) == 3


async def test_envelope_tenant_unsigned_and_async_ack(
    gateway: Gateway, provider: LocalProvider, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True)
    client = await connect(http, gateway.url)
    await client.auth(key=BETA)
    sent = task(deliveryMethod="async", webhookURL=f"{receiver.url}/b")
    await client.send(sent)
    assert (await client.recv())["data"] == [
        {"taskType": "imageInference", "taskUUID": sent["taskUUID"]}
    ]
    await settled_deliveries(gateway, "beta", sent["taskUUID"], 1)
    [(_, _, headers, body)] = receiver.requests
    assert "webhook-signature" not in {k.lower() for k in headers}
    assert [i["taskUUID"] for i in json.loads(body)["data"]] == [sent["taskUUID"]]


async def test_retries_keep_the_webhook_id(
    gateway: Gateway, provider: LocalProvider, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True)
    receiver.script = [500, 503]
    client = await connect(http, gateway.url)
    await client.auth(key=ALPHA)
    sent = task(webhookURL=f"{receiver.url}/hook")
    await client.send(sent)
    [delivery] = await settled_deliveries(gateway, "alpha", sent["taskUUID"], 1)
    assert (delivery.state, delivery.attempts, delivery.last_status) == ("delivered", 3, 200)
    ids = {h["webhook-id"] for _, _, h, _ in receiver.requests}
    assert len(receiver.requests) == 3 and ids == {delivery.id}


@pytest.mark.parametrize(
    ("script", "attempts", "error"),
    [
        ([410], 1, "410 Gone"),
        ([302], 1, "redirect to http://127.0.0.1:1/elsewhere not followed"),
        ([500, 500, 500], 3, "HTTP 500"),
    ],
)
async def test_gone_redirects_and_giving_up(
    gateway: Gateway,
    provider: LocalProvider,
    receiver: Receiver,
    http: aiohttp.ClientSession,
    script: list[int],
    attempts: int,
    error: str,
) -> None:
    set_faults(provider, fast=True)
    receiver.script = list(script)
    client = await connect(http, gateway.url)
    await client.auth(key=ALPHA)
    sent = task(webhookURL=f"{receiver.url}/hook")
    await client.send(sent)
    [delivery] = await settled_deliveries(gateway, "alpha", sent["taskUUID"], 1)
    assert (delivery.state, delivery.attempts) == ("failed", attempts)
    assert error in (delivery.last_error or "")
    assert "sig=secret" not in (delivery.last_error or "")


async def test_a_task_failure_is_posted_too(
    gateway: Gateway, provider: LocalProvider, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, error_rate=1.0)
    client = await connect(http, gateway.url)
    await client.auth(key=ALPHA)
    sent = task(webhookURL=f"{receiver.url}/hook")
    await client.send(sent)
    await settled_deliveries(gateway, "alpha", sent["taskUUID"], 1)
    [(_, _, _, body)] = receiver.requests
    posted = json.loads(body)
    assert (posted["code"], posted["taskUUID"]) == ("timeoutProvider", sent["taskUUID"])


async def test_one_slow_host_does_not_take_more_than_its_share(
    provider: LocalProvider, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True)
    receiver.delay = 100 * MS
    gateway = Gateway(delivery_config(provider, per_host=2))
    await gateway.start()
    try:
        client = await connect(http, gateway.url)
        await client.auth(key=ALPHA)
        sent = task(numberResults=8, webhookURL=f"{receiver.url}/slow")
        await client.send(sent)
        await settled_deliveries(gateway, "alpha", sent["taskUUID"], 8)
        assert receiver.most_in_flight == 2
    finally:
        await gateway.stop()


async def test_deliveries_are_visible(
    gateway: Gateway,
    provider: LocalProvider,
    receiver: Receiver,
    http: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    set_faults(provider, fast=True)
    receiver.script = [500]
    client = await connect(http, gateway.url)
    await client.auth(key=ALPHA)
    with_userinfo = receiver.url.replace("http://", "http://hook-user:s3cr3t-pw@")
    sent = task(webhookURL=f"{with_userinfo}/hook?token=hidden")
    await client.send(sent)
    await settled_deliveries(gateway, "alpha", sent["taskUUID"], 1)
    base = f"http://127.0.0.1:{gateway.port}"
    async with http.get(
        f"{base}/v1/tasks/{sent['taskUUID']}", headers={"Authorization": f"Bearer {ALPHA}"}
    ) as response:
        view = await response.json()
    assert view["state"] == "done" and len(view["results"]) == 1
    [delivery] = view["deliveries"]
    assert delivery["state"] == "delivered" and delivery["attempts"] == 2
    # no query, no userinfo: no secrets in views or logs
    assert delivery["target"] == f"{receiver.url}/hook"
    assert "s3cr3t-pw" not in capsys.readouterr().out
    async with http.get(
        f"{base}/v1/tasks/{sent['taskUUID']}", headers={"Authorization": f"Bearer {BETA}"}
    ) as response:
        assert response.status == 404  # another tenant's task does not exist for it
    async with http.get(f"{base}/metrics") as response:
        assert 'tenebra_deliveries_total{kind="webhook",outcome="delivered"} 1.0' in (
            await response.text()
        )


# --------------------------------------------------------------------------- the guard


async def test_private_destinations_are_refused(
    provider: LocalProvider, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True)
    gateway = Gateway(delivery_config(provider, allow=[]))  # loopback is private again
    await gateway.start()
    try:
        client = await connect(http, gateway.url)
        await client.auth(key=ALPHA)
        for parameter, code in (
            ("webhookURL", "invalidWebhookURL"),
            ("uploadEndpoint", "invalidUploadEndpoint"),
        ):
            sent = task(**{parameter: "http://169.254.169.254/latest/meta-data"})
            await client.send(sent)
            [error] = (await client.recv())["errors"]
            assert (error["code"], error["parameter"], error["taskUUID"]) == (
                code,
                parameter,
                sent["taskUUID"],
            )
            assert "not a global address" in error["message"]
        refs = {"referenceImages": ["http://10.0.0.8/x.png"]}
        await client.send(task(**refs))
        assert (await client.recv())["errors"][0]["code"] == "invalidReferenceImages"
        # a name that resolves to a private address is refused when the request connects
        sent = task(webhookURL=f"{receiver.url.replace('127.0.0.1', 'localhost')}/hook")
        await client.send(sent)
        await client.recv()
        [delivery] = await settled_deliveries(gateway, "alpha", sent["taskUUID"], 1)
        assert delivery.state == "failed" and "egress refused" in (delivery.last_error or "")
        assert delivery.attempts == 1  # a refusal is final: no retries towards it
        assert "127.0.0.1" not in (delivery.last_error or "")  # what it resolved to stays ours
        assert receiver.requests == []
    finally:
        await gateway.stop()


# --------------------------------------------------------------------------- uploads


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[Any, str]]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket="pictures")
    yield client, f"http://{host}:{port}"
    server.stop()


def presigned(s3_client: Any, key: str, content_type: str) -> str:
    url: str = s3_client.generate_presigned_url(
        "put_object",
        Params={"Bucket": "pictures", "Key": key, "ContentType": content_type},
        ExpiresIn=600,
    )
    return url


@pytest.mark.parametrize(
    ("output_format", "content_type"), [("JPG", "image/jpeg"), ("PNG", "image/png")]
)
async def test_uploads_to_a_presigned_s3_url(
    gateway: Gateway,
    http: aiohttp.ClientSession,
    s3: tuple[Any, str],
    output_format: str,
    content_type: str,
) -> None:
    client_s3, _ = s3
    key = f"out/{uuid.uuid4()}.{output_format.lower()}"
    client = await connect(http, gateway.url)
    await client.auth(key=ALPHA)
    sent = task(outputFormat=output_format, uploadEndpoint=presigned(client_s3, key, content_type))
    await client.send(sent)
    [item] = (await client.recv(within=30000 * MS))["data"]
    [delivery] = await settled_deliveries(gateway, "alpha", sent["taskUUID"], 1)
    assert delivery.state == "delivered", delivery
    assert "X-Amz-Signature" not in delivery.target
    stored = client_s3.get_object(Bucket="pictures", Key=key)
    async with http.get(item["imageURL"]) as response:
        original = await response.read()
    assert stored["Body"].read() == original
    assert stored["ContentType"] == content_type


async def test_uploads_fill_placeholders_and_take_base64_output(
    gateway: Gateway,
    provider: LocalProvider,
    http: aiohttp.ClientSession,
    s3: tuple[Any, str],
) -> None:
    client_s3, endpoint = s3
    set_faults(provider, fast=False)
    client = await connect(http, gateway.url)
    await client.auth(key=ALPHA)
    prefix = uuid.uuid4()
    sent = task(
        numberResults=2,
        outputType="base64Data",
        uploadEndpoint=f"{endpoint}/pictures/{prefix}/{{index}}-{{imageUUID}}.jpg",
    )
    await client.send(sent)
    items = [(await client.recv(within=30000 * MS))["data"][0] for _ in range(2)]
    await settled_deliveries(gateway, "alpha", sent["taskUUID"], 2)
    listed = client_s3.list_objects_v2(Bucket="pictures", Prefix=str(prefix))
    names = sorted(o["Key"].split("/")[-1] for o in listed["Contents"])
    record = gateway.registry.lookup("alpha", sent["taskUUID"])
    assert record is not None
    expected = sorted(f"{i}-{r.imageUUID}.jpg" for i, r in enumerate(record.results))
    assert names == expected
    by_uuid = {i["imageUUID"]: base64.b64decode(i["imageBase64Data"]) for i in items}
    for name in names:
        image_uuid = name.split("-", 1)[1].removesuffix(".jpg")
        stored = client_s3.get_object(Bucket="pictures", Key=f"{prefix}/{name}")
        assert stored["Body"].read() == by_uuid[image_uuid]


# --------------------------------------------------------------------------- ttl and drain


async def test_an_image_url_lives_for_its_ttl(
    render_pool: Any, http: aiohttp.ClientSession, clock: Clock
) -> None:
    provider = LocalProvider(ProviderConfig(keys=frozenset({KEY})), clock=clock, pool=render_pool)
    await provider.start()
    gateway = Gateway(gateway_config(provider))
    await gateway.start()
    try:
        client = await connect(http, gateway.url)
        await client.auth(key=ALPHA)
        await client.send(task(ttl=90))
        [item] = (await client.recv(within=30000 * MS))["data"]
        async with http.get(item["imageURL"]) as response:
            assert response.status == 200
        clock.advance(89)
        async with http.get(item["imageURL"]) as response:
            assert response.status == 200
        clock.advance(1)
        async with http.get(item["imageURL"]) as response:
            assert response.status == 404
    finally:
        await gateway.stop()
        await provider.stop()


async def test_pending_deliveries_are_drained_at_shutdown(
    provider: LocalProvider, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True)
    receiver.delay = 300 * MS
    gateway = Gateway(delivery_config(provider))
    await gateway.start()
    client = await connect(http, gateway.url)
    await client.auth(key=ALPHA)
    sent = task(numberResults=3, webhookURL=f"{receiver.url}/hook")
    await client.send(sent)
    for _ in range(3):
        await client.recv()
    assert gateway.deliveries.pending > 0
    await gateway.stop()
    record = gateway.registry.lookup("alpha", sent["taskUUID"])
    assert record is not None
    assert [d.state for d in record.deliveries] == ["delivered"] * 3


async def test_an_upload_fetches_its_image_once_for_all_its_attempts(
    gateway: Gateway, provider: LocalProvider, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True)
    receiver.script = [500, 503]
    fetches = 0
    fetch = gateway.deliveries._image_bytes

    async def counted(job: Any) -> bytes:
        nonlocal fetches
        fetches += 1
        return await fetch(job)

    gateway.deliveries._image_bytes = counted  # type: ignore[method-assign]
    client = await connect(http, gateway.url)
    await client.auth(key=ALPHA)
    sent = task(uploadEndpoint=f"{receiver.url}/put/{{imageUUID}}.jpg")
    await client.send(sent)
    [delivery] = await settled_deliveries(gateway, "alpha", sent["taskUUID"], 1)
    assert (delivery.state, delivery.attempts) == ("delivered", 3)
    assert fetches == 1
    bodies = {body for method, _, _, body in receiver.requests if method == "PUT"}
    assert len(receiver.requests) == 3 and len(bodies) == 1
