"""``POST /v1`` through the shared dispatch: its errors are counted, its polls are bounded."""

from __future__ import annotations

import uuid

import aiohttp

from gateway.app import Gateway
from gateway.provider.server import LocalProvider
from tests.gateway.conftest import ALPHA, gateway_config, running, task


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
