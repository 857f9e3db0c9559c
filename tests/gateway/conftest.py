from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from gateway.provider.pool import RenderPool
from gateway.provider.server import LocalProvider, ProviderConfig
from tests.gateway.fakes import FakeProvider
from tests.timing import MS

KEY = "provider-test-key"
MODEL = "exactly:photo@extreme-contrast"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def render_pool() -> Iterator[RenderPool]:
    pool = RenderPool(workers=2, max_queue=4096)  # room for every test; one test makes its own
    yield pool
    pool.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def provider(render_pool: RenderPool) -> AsyncIterator[LocalProvider]:
    instance = LocalProvider(
        ProviderConfig(keys=frozenset({KEY})), rng=random.Random(7), pool=render_pool
    )
    await instance.start()
    yield instance
    await instance.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20000 * MS)) as session:
        yield session


class Client:
    """A raw WebSocket client of the Runware protocol, for asserting frames one by one."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def send(self, *tasks: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(list(tasks)))

    async def recv(self, within: float = 20000 * MS) -> dict[str, Any]:
        message = await self.ws.receive(timeout=within)
        assert message.type == aiohttp.WSMsgType.TEXT, message
        frame: dict[str, Any] = json.loads(message.data)
        return frame

    async def auth(self, key: str = KEY, session: str | None = None) -> str:
        task: dict[str, Any] = {"taskType": "authentication", "apiKey": key}
        if session is not None:
            task["connectionSessionUUID"] = session
        await self.send(task)
        reply = await self.recv()
        assert "errors" not in reply, reply
        uuid: str = reply["data"][0]["connectionSessionUUID"]
        return uuid


async def polled_images(
    client: Client, task_uuid: str, want: int = 1, tries: int = 100
) -> list[dict[str, Any]]:
    """``getResponse`` for ``task_uuid`` every 20 ms until ``want`` images are in (at most
    ``tries`` times, no error item allowed): the last answer's images."""
    images: list[dict[str, Any]] = []
    for _ in range(tries):
        await client.send({"taskType": "getResponse", "taskUUID": task_uuid})
        frame = await client.recv()
        assert "errors" not in frame, frame
        images = [i for i in frame["data"] if i.get("status") == "success"]
        if len(images) >= want:
            break
        await asyncio.sleep(20 * MS)
    return images


async def connect(http: aiohttp.ClientSession, url: str) -> Client:
    return Client(await http.ws_connect(url, max_msg_size=0))


def set_faults(provider: LocalProvider, **changes: Any) -> None:
    provider.faults = provider.faults.updated(changes)


# --------------------------------------------------------------------------- the gateway

ALPHA, BETA = "alpha-key", "beta-key"


def gateway_config(provider: LocalProvider, **server: Any) -> Any:
    from gateway.config import Config, ProviderSettings, ServerSettings, Tenant

    return Config(
        server=ServerSettings(**{"port": 0, "drain_deadline": 0.5, **server}),
        provider=ProviderSettings(
            url=provider.url, api_key=KEY, ping_interval=1.0, pong_timeout=2.0
        ),
        tenants={"alpha": Tenant(keys=[ALPHA]), "beta": Tenant(keys=[BETA])},
    )


@contextlib.asynccontextmanager
async def running(config: Any, **options: Any) -> AsyncIterator[Any]:
    """A started gateway whose provider link is ready; stopped on the way out. ``options`` go
    to the Gateway (its clocks)."""
    from gateway.app import Gateway

    instance = Gateway(config, **options)
    await instance.start()
    try:
        assert instance.pool is not None
        async with asyncio.timeout(10000 * MS):
            await instance.pool.wait_ready()
        yield instance
    finally:
        await instance.stop()


def shared_config(
    provider: LocalProvider,
    url: str,
    prefix: str,
    replica: str,
    *,
    timeout: float = 300 * MS,
    lease: float = 1000 * MS,
) -> Any:
    """A gateway's configuration as a replica named ``replica`` on the Redis store at ``url``."""
    from gateway.config import StoreSettings

    config = gateway_config(provider)
    config.store = StoreSettings(
        url=url, prefix=prefix, replica=replica, timeout=timeout, lease=lease
    )
    return config


@pytest.fixture
async def pair(provider: LocalProvider, redis_url: str) -> AsyncIterator[tuple[Any, Any]]:
    """Two replicas sharing one Redis store (a prefix of their own) and one provider."""
    prefix = f"test-{uuid.uuid4().hex}"
    async with (
        running(shared_config(provider, redis_url, prefix, "a")) as a,
        running(shared_config(provider, redis_url, prefix, "b")) as b,
    ):
        yield a, b


@pytest.fixture
async def gateway(provider: LocalProvider) -> AsyncIterator[Any]:
    async with running(gateway_config(provider)) as instance:
        yield instance


def fake_config(fake: FakeProvider, **alpha_limits: Any) -> Any:
    """A gateway on the scripted provider (tests/gateway/fakes.py), with short deadlines;
    ``alpha_limits`` are tenant alpha's."""
    from gateway.config import Config, ProviderSettings, ServerSettings, Tenant

    return Config(
        server=ServerSettings(port=0, drain_deadline=200 * MS),
        provider=ProviderSettings(
            url=fake.url,
            api_key="k",
            ping_interval=200 * MS,
            pong_timeout=300 * MS,
            auth_timeout=500 * MS,
            backoff_initial=5 * MS,
            backoff_max=20 * MS,
            recovery_interval=100 * MS,
        ),
        tenants={"alpha": Tenant(keys=[ALPHA], **alpha_limits), "beta": Tenant(keys=[BETA])},
    )


def resilient_config(provider: LocalProvider, **server: Any) -> Any:
    """Short deadlines, so that faults are detected and recovered within a test's time."""
    config = gateway_config(provider, **server)
    config.provider.ping_interval = 200 * MS
    config.provider.pong_timeout = 300 * MS
    config.provider.auth_timeout = 500 * MS
    config.provider.backoff_initial = 20 * MS
    config.provider.backoff_max = 200 * MS
    config.provider.recovery_interval = 100 * MS
    return config


def task(**overrides: Any) -> dict[str, Any]:
    """A valid 1K imageInference task with ``overrides`` applied (fresh taskUUID each time)."""
    from tests.protocol.conftest import image_task

    return image_task(**{"width": 1024, "height": 1024, **overrides})


async def until(predicate: Any, within: float = 20000 * MS) -> None:
    """Wait, bounded, until ``predicate()`` holds."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(10 * MS)


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    """A scripted provider (tests/gateway/fakes.py), for what the local one never does."""
    provider = FakeProvider()
    await provider.start()
    yield provider
    await provider.stop()
