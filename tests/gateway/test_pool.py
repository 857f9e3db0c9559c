"""Flow control end to end: a provider with a small capacity that refuses the rest, as
Runware's queue does. A burst is queued at the gateway, not failed; tenants share by weight."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.config import Config
from gateway.provider.pool import RenderPool
from gateway.provider.server import LocalProvider, ProviderConfig
from tests.gateway.conftest import (
    ALPHA,
    BETA,
    KEY,
    Client,
    connect,
    fake_config,
    gateway_config,
    set_faults,
    task,
    until,
)
from tests.gateway.fakes import FakeProvider
from tests.timing import MS


@pytest.fixture
async def busy() -> AsyncIterator[FakeProvider]:
    provider = FakeProvider(capacity=16, latency=20 * MS)
    await provider.start()
    yield provider
    await provider.stop()


async def started(cfg: Config) -> Gateway:
    gateway = Gateway(cfg)
    await gateway.start()
    assert gateway.pool is not None
    async with asyncio.timeout(5000 * MS):
        await gateway.pool.wait_ready()
    return gateway


async def outcomes(client: Client, count: int, within: float) -> Counter[str]:
    """Every task's outcome: 'ok' per image, else its error code."""
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + within
    while sum(seen.values()) < count:
        frame = await client.recv(within=max(0.0, deadline - time.monotonic()))
        seen["ok"] += len(frame.get("data", []))
        seen.update(error["code"] for error in frame.get("errors", []))
    return seen


async def burst_of_2000_completes(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    """100 clients send 20 tasks each at once; every task ends with its image, none refused."""
    clients = []
    for _ in range(100):  # each authenticated before the next, as SDKs do
        clients.append(client := await connect(http, gateway.url))
        await client.auth(key=ALPHA)
    for client in clients:
        await client.ws.send_str(json.dumps([task() for _ in range(20)]))
    results = await asyncio.gather(*(outcomes(c, 20, 90000 * MS) for c in clients))
    assert all(result == {"ok": 20} for result in results)


async def test_a_burst_past_the_providers_capacity_is_queued_not_refused(
    busy: FakeProvider, http: aiohttp.ClientSession
) -> None:
    """2,000 tasks from 100 clients at once against a provider that takes 16: all complete,
    no client sees a refusal, and the window has learnt the capacity."""
    gateway = await started(fake_config(busy))
    try:
        await burst_of_2000_completes(gateway, http)
        assert len(busy.submissions) == 2000 == len(set(busy.submissions))
        assert busy.refusals > 0  # the provider did refuse: the gateway absorbed it
        assert busy.most_busy <= 16
        assert gateway.pool is not None
        window = gateway.pool.links[0].window.limit
        assert 8 <= window <= 256
    finally:
        await gateway.stop()


async def test_a_newcomer_does_not_wait_behind_anothers_backlog(
    busy: FakeProvider, http: aiohttp.ClientSession
) -> None:
    """Tenant alpha queues 600 tasks; beta then sends 10 one at a time: each of beta's tasks
    goes to the provider within about one provider turn, and alpha's all complete."""
    gateway = await started(fake_config(busy))
    try:
        alpha, beta = await connect(http, gateway.url), await connect(http, gateway.url)
        await alpha.auth(key=ALPHA)
        await beta.auth(key=BETA)
        for _ in range(3):  # at most 256 tasks a frame
            await alpha.ws.send_str(json.dumps([task() for _ in range(200)]))
        await until(lambda: len(busy.submissions) >= 50)
        assert gateway.pool is not None
        assert gateway.pool.queue.waiting("alpha") > 300
        behind = []
        for _ in range(10):
            sent = task()
            before = len(busy.submissions)
            await beta.send(sent)
            frame = await beta.recv(within=10000 * MS)
            assert frame["data"][0]["taskUUID"] == sent["taskUUID"]
            behind.append(busy.submissions.index(upstream_of(gateway, sent)) - before)
        # one window and the rest of alpha's run (the fair queue's quantum, 8) at most: not 300
        assert max(behind) <= 16 + 8 + 2
        assert await outcomes(alpha, 600, 60000 * MS) == {"ok": 600}
    finally:
        await gateway.stop()


def upstream_of(gateway: Gateway, sent: dict[str, object]) -> str:
    record = gateway.registry.lookup("beta", str(sent["taskUUID"]))
    assert record is not None
    return record.upstream_uuid


async def test_tenant_limits_in_flight_and_queued(
    busy: FakeProvider, http: aiohttp.ClientSession
) -> None:
    gateway = await started(fake_config(busy, max_in_flight=3, max_queued=10))
    try:
        client = await connect(http, gateway.url)
        await client.auth(key=ALPHA)
        await client.ws.send_str(json.dumps([task() for _ in range(15)]))
        # 3 out, 10 waiting, 2 refused at once with the reason
        seen = await outcomes(client, 15, 10000 * MS)
        assert seen == {"ok": 13, "rateLimitExceeded": 2}
        assert busy.most_busy <= 3
        assert gateway.pool is not None
        assert gateway.pool.refused_by_limit["alpha", "tenant_max_queued"] == 2
        async with http.get(f"http://127.0.0.1:{gateway.port}/metrics") as response:
            text = await response.text()
        assert 'tenebra_tenant_admitted_total{tenant="alpha"} 13.0' in text
        assert 'tenebra_provider_window{link="0"}' in text
    finally:
        await gateway.stop()


async def test_a_task_refused_past_its_deadline_gets_the_reason(
    http: aiohttp.ClientSession,
) -> None:
    """A provider that refuses everything: tasks wait, then expire at tasks.timeout with a
    timeoutProvider item that says they waited for capacity."""
    provider = FakeProvider(capacity=0)
    await provider.start()
    cfg = fake_config(provider)
    cfg.tasks.timeout = 300 * MS
    gateway = await started(cfg)
    try:
        client = await connect(http, gateway.url)
        await client.auth(key=ALPHA)
        await client.send(task())
        [error] = (await client.recv(within=5000 * MS))["errors"]
        assert error["code"] == "timeoutProvider"
        assert "provider capacity" in error["message"]
        assert provider.refusals >= 2  # it was tried again, not failed at the first refusal
    finally:
        await gateway.stop()
        await provider.stop()


async def test_the_local_provider_with_room_for_16_images(http: aiohttp.ClientSession) -> None:
    """`tenebra provider --max-queued 16` in process: 2,000 tasks from 100 clients all
    complete, none refused to a client, each image once; the provider refused whole tasks
    (unbilled) and the gateway's window learnt its capacity."""
    provider = LocalProvider(
        ProviderConfig(keys=frozenset({KEY})), pool=RenderPool(workers=1, max_queue=16)
    )
    set_faults(provider, fast=True, latency={"kind": "uniform", "ms": 5, "high_ms": 15})
    await provider.start()
    cfg = gateway_config(provider)
    cfg.provider.backoff_initial, cfg.provider.backoff_max = 5 * MS, 50 * MS
    gateway = await started(cfg)
    try:
        await burst_of_2000_completes(gateway, http)
        assert provider.stats.submissions == 2000 and provider.stats.images == 2000
        assert provider.stats.refusals > 0
        assert gateway.pool is not None
        assert gateway.pool.links[0].window.limit < 256
    finally:
        await gateway.stop()
        await provider.stop()
