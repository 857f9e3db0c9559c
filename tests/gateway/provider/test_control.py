"""The test controls over HTTP: off without a control key, behind it with one."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from gateway.provider.pool import RenderPool
from gateway.provider.server import LocalProvider, ProviderConfig
from tests.gateway.conftest import KEY, connect, set_faults, task
from tests.timing import MS

CONTROL_KEY = "control-test-key"
BEARER = {"Authorization": f"Bearer {CONTROL_KEY}"}
ROUTES = [("GET", "faults"), ("POST", "faults"), ("POST", "forget"), ("GET", "stats")]


@pytest.fixture
async def keyed(render_pool: RenderPool) -> AsyncIterator[LocalProvider]:
    config = ProviderConfig(keys=frozenset({KEY}), control_key=CONTROL_KEY)
    provider = LocalProvider(config, pool=render_pool)
    await provider.start()
    yield provider
    await provider.stop()


@pytest.mark.parametrize(("method", "route"), ROUTES)
async def test_without_a_control_key_the_controls_do_not_exist(
    provider: LocalProvider, http: aiohttp.ClientSession, method: str, route: str
) -> None:
    url = f"http://127.0.0.1:{provider.port}/control/{route}"
    async with http.request(method, url, json={"stall": True}, headers=BEARER) as response:
        assert response.status == 404
    assert not provider.faults.stall


@pytest.mark.parametrize(("method", "route"), ROUTES)
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": CONTROL_KEY}],
    ids=["none", "wrong", "not bearer"],
)
async def test_the_controls_need_the_key(
    keyed: LocalProvider,
    http: aiohttp.ClientSession,
    method: str,
    route: str,
    headers: dict[str, str],
) -> None:
    url = f"http://127.0.0.1:{keyed.port}/control/{route}"
    async with http.request(method, url, json={"stall": True}, headers=headers) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert not keyed.faults.stall


async def test_control_endpoint(keyed: LocalProvider, http: aiohttp.ClientSession) -> None:
    base = f"http://127.0.0.1:{keyed.port}/control"
    async with http.post(
        f"{base}/faults", json={"error_rate": 0.5, "stall": True}, headers=BEARER
    ) as response:
        assert response.status == 200
        assert (await response.json())["error_rate"] == 0.5
    assert keyed.faults.stall
    async with http.post(f"{base}/faults", json={"nonsense": 1}, headers=BEARER) as response:
        assert response.status == 400
    async with http.get(f"{base}/stats", headers=BEARER) as response:
        assert (await response.json())["connections"] == 0


async def test_forget_is_a_restart(keyed: LocalProvider, http: aiohttp.ClientSession) -> None:
    set_faults(keyed, fast=True)
    client = await connect(http, keyed.url)
    session = await client.auth()
    sent = task()
    await client.send(sent)
    await client.recv()
    url = f"http://127.0.0.1:{keyed.port}/control/forget"
    async with http.post(url, headers=BEARER) as response:
        assert response.status == 204
    message = await client.ws.receive(timeout=5000 * MS)
    assert message.type in (
        aiohttp.WSMsgType.CLOSE,
        aiohttp.WSMsgType.CLOSED,
        aiohttp.WSMsgType.ERROR,
    )
    again = await connect(http, keyed.url)
    assert await again.auth(session=session) != session
    await again.send({"taskType": "getResponse", "taskUUID": sent["taskUUID"]})
    assert (await again.recv())["errors"][0]["code"] == "taskNotFound"
