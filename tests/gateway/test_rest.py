"""``POST /v1`` through the shared dispatch: its errors are counted, its polls are bounded."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.config import Tenant
from gateway.provider.server import LocalProvider
from tests.gateway.conftest import (
    ALPHA,
    BETA,
    Clock,
    connect,
    gateway_config,
    running,
    set_faults,
    task,
)
from tests.gateway.test_clients import from_address
from tests.timing import MS


def errors_counted(text: str) -> dict[str, float]:
    return {
        line.split('code="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tenebra_errors_total{")
    }


async def test_rest_errors_are_counted_like_the_websocket_doors(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    url = f"http://127.0.0.1:{gateway.port}/v1"
    bearer = {"Authorization": f"Bearer {ALPHA}"}
    async with http.post(url, json=[task()]) as response:
        assert response.status == 401
    async with http.post(url, data=b"{not json", headers=bearer) as response:
        assert response.status == 400
    poll = {"taskType": "getResponse", "taskUUID": str(uuid.uuid4())}
    async with http.post(url, json=[task(outputQuality=3), poll], headers=bearer) as response:
        assert response.status == 400
    async with http.get(f"http://127.0.0.1:{gateway.port}/metrics") as response:
        counted = errors_counted(await response.text())
    assert counted == {
        "missingApiKey": 1.0,
        "invalidJSON": 1.0,
        "invalidOutputQuality": 1.0,
        "taskNotFound": 1.0,
    }


async def test_rest_task_view_finds_a_task_by_either_spelling_and_says_the_one_asked(
    gateway: Gateway, provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    """UUIDs are case-insensitive (RFC 9562): ``GET /v1/tasks/<uuid>`` finds a task sent in
    upper case by its lower-case spelling and answers in the spelling asked, and ``POST /v1``
    of the other spelling is a conflict."""
    set_faults(provider, fast=True)
    url, bearer = f"http://127.0.0.1:{gateway.port}/v1", {"Authorization": f"Bearer {ALPHA}"}
    lower = str(uuid.uuid4())
    async with http.post(url, json=[task(taskUUID=lower.upper())], headers=bearer) as response:
        assert response.status == 200
    async with http.post(url, json=[task(taskUUID=lower)], headers=bearer) as response:
        assert response.status == 400
        [error] = (await response.json())["errors"]
        assert (error["code"], error["taskUUID"]) == ("conflictTaskUUID", lower)
    for spelling in (lower, lower.upper()):
        async with http.get(f"{url}/tasks/{spelling}", headers=bearer) as response:
            assert response.status == 200
            view = await response.json()
        assert view["state"] == "done", view
        assert [view["taskUUID"], *(r["taskUUID"] for r in view["results"])] == [spelling] * 2
    assert provider.stats.submissions == 1


async def test_rest_get_responses_per_request_are_bounded(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    async with running(gateway_config(provider, get_response_burst=2)) as gateway:
        url = f"http://127.0.0.1:{gateway.port}/v1"
        polls = [str(uuid.uuid4()) for _ in range(3)]
        body = [{"taskType": "getResponse", "taskUUID": p} for p in polls]
        async with http.post(url, json=body, headers={"Authorization": f"Bearer {ALPHA}"}) as r:
            errors = (await r.json())["errors"]
        assert [(e["code"], e["taskUUID"]) for e in errors] == [
            ("taskNotFound", polls[0]),
            ("taskNotFound", polls[1]),
            ("rateLimitExceeded", polls[2]),
        ]


async def test_rest_429_and_402_say_when_to_retry(
    provider: LocalProvider, http: aiohttp.ClientSession, clock: Clock
) -> None:
    set_faults(provider, fast=True)
    config = gateway_config(provider)
    config.tenants["alpha"] = Tenant(keys=[ALPHA], rate=0.5, burst=1)
    config.tenants["beta"] = Tenant(keys=[BETA], budget_per_day=0.0)
    wall = Clock()  # 1000 s past 00:00 UTC
    async with running(config, clock=clock, wall_clock=wall) as gateway:
        url = f"http://127.0.0.1:{gateway.port}/v1"

        async def post(key: str, body: Any) -> tuple[int, str | None, str]:
            async with http.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
                errors = (await r.json()).get("errors", [{}])
                return r.status, r.headers.get("Retry-After"), errors[0].get("code", "")

        assert await post(ALPHA, [task(deliveryMethod="async")]) == (200, None, "")
        assert await post(ALPHA, [task(deliveryMethod="async")]) == (
            429, "2", "rateLimitExceeded",  # a token every 2 s
        )  # fmt: skip
        clock.advance(1.5)
        assert (await post(ALPHA, [task(deliveryMethod="async")]))[:2] == (429, "1")  # 0.5 s
        clock.advance(0.5)
        assert (await post(ALPHA, [task(deliveryMethod="async")]))[0] == 200
        assert await post(BETA, [task(deliveryMethod="async")]) == (
            402, str(86400 - 1000), "insufficientCredits",  # the budget comes back at 00:00 UTC
        )  # fmt: skip
        assert await post(BETA, [task(outputQuality=3)]) == (400, None, "invalidOutputQuality")


async def test_rest_failed_keys_are_slowed_then_the_address_refused(
    provider: LocalProvider, http: aiohttp.ClientSession, clock: Clock
) -> None:
    set_faults(provider, fast=True)
    config = gateway_config(
        provider, auth_failure_delay=100 * MS, auth_failures_before_refusal=2, auth_refusal=60.0
    )
    async with running(config, clock=clock) as gateway, from_address("127.0.0.2") as other:
        url = f"http://127.0.0.1:{gateway.port}/v1"
        loop = asyncio.get_running_loop()

        async def post(client: aiohttp.ClientSession, key: str) -> tuple[int, str | None]:
            headers = {"Authorization": f"Bearer {key}"}
            async with client.post(url, json=[task(deliveryMethod="async")], headers=headers) as r:
                return r.status, r.headers.get("Retry-After")

        started = loop.time()
        assert await post(http, "guess") == (401, None)
        assert loop.time() - started >= 100 * MS
        started = loop.time()
        assert await post(http, "guess") == (401, None)
        assert loop.time() - started >= 200 * MS  # doubled; the address is refused now
        assert await post(http, ALPHA) == (429, "60")  # the key is not even looked at
        async with http.get(f"{url}/tasks/{uuid.uuid4()}", headers={"Authorization": "x"}) as r:
            assert r.status == 429
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:  # one count, both doors
            await connect(http, gateway.url)
        assert refused.value.status == 429
        assert await post(other, ALPHA) == (200, None)  # another address is not refused
        clock.advance(60.0)
        assert await post(http, ALPHA) == (200, None)


async def raw_request(port: int, head: str, body: bytes = b"") -> bytes:
    """What the gateway answers to a request written by hand (the body may be short)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode() + b"\r\n\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(5000 * MS):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


async def test_rest_refuses_a_wrong_bearer_unread_and_reads_a_body_within_its_deadline(
    provider: LocalProvider,
) -> None:
    config = gateway_config(provider, auth_failure_delay=10 * MS, request_read_timeout=300 * MS)
    async with running(config) as gateway:
        head = "POST /v1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        head += "Content-Length: 1000\r\nAuthorization: Bearer "
        # no body is sent: a wrong key is answered without it, a right one waits for it
        assert (await raw_request(gateway.port, head + "guess")).startswith(b"HTTP/1.1 401")
        started = asyncio.get_running_loop().time()
        answer = await raw_request(gateway.port, head + ALPHA, b'[{"taskType":')
        assert answer.startswith(b"HTTP/1.1 408")
        assert asyncio.get_running_loop().time() - started >= 300 * MS


async def test_rest_bodies_read_before_a_key_count_as_unauthenticated(
    provider: LocalProvider,
) -> None:
    """Without a bearer header the body is read before anyone is known: such requests count
    against the address's unauthenticated bound (they could each hold a 32 MiB body)."""
    config = gateway_config(
        provider, max_unauthenticated_per_address=2, request_read_timeout=2000 * MS
    )
    async with running(config) as gateway:
        head = "POST /v1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        head += "Content-Length: 100000"
        slow = []
        for _ in range(2):  # two bodies that never finish arriving
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(head.encode() + b"\r\n\r\n[")
            slow.append((reader, writer))
        await asyncio.sleep(100 * MS)
        assert (await raw_request(gateway.port, head, b"[")).startswith(b"HTTP/1.1 429")
        bearer = head + f"\r\nAuthorization: Bearer {ALPHA}"
        body = b"[" + b" " * 99998 + b"]"
        assert (await raw_request(gateway.port, bearer, body)).startswith(b"HTTP/1.1 200")
        for _, writer in slow:
            writer.close()


async def test_a_keyless_rest_body_is_bounded(provider: LocalProvider) -> None:
    """Before a key is known a request carries at most max_keyless_request_bytes (a 30 MB body
    once took 60 MB of the gateway's memory for a 401); with a bearer header, the usual bound."""
    config = gateway_config(provider, max_keyless_request_bytes=1024)
    async with running(config) as gateway:
        head = "POST /v1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        big = b"[" + b" " * 4000 + b"]"
        answer = await raw_request(gateway.port, head + f"Content-Length: {len(big)}", big)
        assert answer.startswith(b"HTTP/1.1 413")
        chunked = head + "Transfer-Encoding: chunked"  # no length to judge by: counted as read
        body = b"%x\r\n" % len(big) + big + b"\r\n0\r\n\r\n"
        assert (await raw_request(gateway.port, chunked, body)).startswith(b"HTTP/1.1 413")
        auth = b'[{"taskType":"authentication","apiKey":"%s"}]' % ALPHA.encode()
        answer = await raw_request(gateway.port, head + f"Content-Length: {len(auth)}", auth)
        assert answer.startswith(b"HTTP/1.1 200")
        bearer = head + f"Authorization: Bearer {ALPHA}\r\nContent-Length: {len(big)}"
        assert (await raw_request(gateway.port, bearer, big)).startswith(b"HTTP/1.1 200")
