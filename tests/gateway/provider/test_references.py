"""Reference images fetched by URL go through the egress guard, and a failed fetch says
nothing about the network: the same words for a refused, closed, open, slow or wrong target."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from gateway.provider.pool import RenderPool
from gateway.provider.server import LocalProvider, ProviderConfig
from tests.gateway.conftest import KEY, connect, task
from tests.gateway.provider.conftest import PictureServer

GENERIC = "The reference image could not be fetched."
LOOPBACK = {"127.0.0.1", "::1"}

# Every socket connect of the process while a test watches; a connect anywhere but loopback
# is stopped before it leaves (an audit hook runs before the system call).
_watch: list[list[Any]] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event != "socket.connect" or not _watch:
        return
    address = args[1]
    _watch[-1].append(address)
    if isinstance(address, tuple) and address[0] not in LOOPBACK:
        raise PermissionError(f"test: a connect to {address} was attempted")


sys.addaudithook(_audit)


@pytest.fixture
def connects() -> Iterator[list[Any]]:
    seen: list[Any] = []
    _watch.append(seen)
    yield seen
    _watch.remove(seen)


async def provider_with(render_pool: RenderPool, **config: Any) -> LocalProvider:
    provider = LocalProvider(ProviderConfig(keys=frozenset({KEY}), **config), pool=render_pool)
    await provider.start()
    return provider


@pytest.fixture
async def guarded(render_pool: RenderPool) -> AsyncIterator[LocalProvider]:
    provider = await provider_with(render_pool)
    yield provider
    await provider.stop()


async def reference_answer(
    provider: LocalProvider, http: aiohttp.ClientSession, url: str
) -> dict[str, Any]:
    client = await connect(http, provider.url)
    await client.auth()
    sent = task(referenceImages=[url])
    await client.send(sent)
    frame = await client.recv()
    await client.ws.close()
    items = frame.get("errors") or frame["data"]
    assert items[0]["taskUUID"] == sent["taskUUID"]
    item: dict[str, Any] = items[0]
    return item


REFUSED = {
    "loopback, open port": "http://127.0.0.1:{port}/ref.png",
    "loopback, closed port": "http://127.0.0.1:{closed}/ref.png",
    "loopback in hex": "http://0x7f000001:{port}/ref.png",
    "loopback in short form": "http://127.1:{port}/ref.png",
    "IPv4-mapped loopback": "http://[::ffff:127.0.0.1]:{port}/ref.png",
    "cloud metadata": "http://169.254.169.254/latest/meta-data/",
    "a name for loopback": "http://localhost:{port}/ref.png",
}


@pytest.mark.parametrize("template", REFUSED.values(), ids=REFUSED.keys())
async def test_private_destinations_are_refused_alike_and_never_reached(
    guarded: LocalProvider,
    http: aiohttp.ClientSession,
    picture_server: PictureServer,
    closed_port: int,
    connects: list[Any],
    template: str,
) -> None:
    url = template.format(port=picture_server.port, closed=closed_port)
    error = await reference_answer(guarded, http, url)
    assert (error["code"], error["message"]) == ("invalidReferenceImages", GENERIC)
    assert picture_server.requests == []
    targets = {(address[0], address[1]) for address in connects if isinstance(address, tuple)}
    assert not targets & {
        ("127.0.0.1", picture_server.port),
        ("127.0.0.1", closed_port),
        ("::1", picture_server.port),
    }
    assert not any(host not in LOOPBACK for host, _ in targets)


async def test_an_allowed_destination_is_fetched(
    render_pool: RenderPool, http: aiohttp.ClientSession, picture_server: PictureServer
) -> None:
    provider = await provider_with(render_pool, allow=["127.0.0.1/32"])
    try:
        item = await reference_answer(provider, http, picture_server.url())
        assert item["imageUUID"]
        assert picture_server.requests == ["/ref.png"]
    finally:
        await provider.stop()


async def test_failures_past_the_guard_say_the_same_as_a_refusal(
    render_pool: RenderPool,
    http: aiohttp.ClientSession,
    picture_server: PictureServer,
    closed_port: int,
) -> None:
    provider = await provider_with(render_pool, allow=["127.0.0.1/32"], reference_max_bytes=64)
    try:
        for url in (
            f"http://127.0.0.1:{closed_port}/ref.png",  # nothing listens
            picture_server.url("/missing"),  # 404
            picture_server.url("/text"),  # 200, not a picture
            picture_server.url("/redirect"),  # never followed
            picture_server.url("/ref.png"),  # over reference_max_bytes
        ):
            error = await reference_answer(provider, http, url)
            assert (error["code"], error["message"]) == ("invalidReferenceImages", GENERIC), url
        assert picture_server.requests == ["/missing", "/text", "/redirect", "/ref.png"]
    finally:
        await provider.stop()
