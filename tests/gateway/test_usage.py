"""The usage ledger (gateway/usage.py): per tenant, key id and UTC day; in memory, and in Redis
where it survives a restart; ``GET /v1/usage`` for a tenant's own figures or everyone's."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.app import Gateway
from gateway.config import StoreSettings, Tenant
from gateway.provider.server import LocalProvider
from gateway.store.base import TaskRecord
from gateway.store.connection import RedisConnection
from gateway.store.shared import StoreUnavailable
from gateway.usage import DAY, OTHER_KEY, Usage, day_text, parse_day
from tests.gateway.conftest import ALPHA, BETA, Clock, gateway_config, running, task, until
from tests.gateway.store.test_connection import BUSY
from tests.timing import MS

ADMIN = "admin-key-for-the-usage-tests"
ALPHA_2 = "alpha-second-key"


def kid(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def config_for(provider: LocalProvider, monkeypatch: pytest.MonkeyPatch) -> Any:
    config = gateway_config(provider)
    config.tenants["alpha"] = Tenant(keys=[ALPHA, ALPHA_2])
    config.admin.keys = [ADMIN]
    return config


async def send(gateway: Gateway, http: aiohttp.ClientSession, key: str, **fields: Any) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    url = f"http://127.0.0.1:{gateway.port}/v1"
    async with http.post(url, json=[task(**fields)], headers=headers) as response:
        assert response.status == 200, await response.text()


async def usage(
    gateway: Gateway, http: aiohttp.ClientSession, key: str | None, query: str = ""
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = f"http://127.0.0.1:{gateway.port}/v1/usage{query}"
    async with http.get(url, headers=headers) as response:
        return response.status, await response.json()


async def test_a_tenant_sees_its_own_usage_per_key_and_an_admin_everyones(
    provider: LocalProvider, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(config_for(provider, monkeypatch)) as gateway:
        await send(gateway, http, ALPHA, numberResults=2)
        await send(gateway, http, ALPHA_2)
        await send(gateway, http, BETA, numberResults=3)
        status, body = await usage(gateway, http, ALPHA)
        assert status == 200
        today = day_text(gateway.usage.today())
        assert (body["from"], body["to"], body["tenant"]) == (today, today, "alpha")
        rows = {(r["tenant"], r["key_id"]): r for r in body["usage"]}
        assert set(rows) == {("alpha", kid(ALPHA)), ("alpha", kid(ALPHA_2))}
        assert (rows["alpha", kid(ALPHA)]["images"], rows["alpha", kid(ALPHA)]["tasks"]) == (2, 1)
        assert rows["alpha", kid(ALPHA)]["spend"] > 0  # the provider's cost, not asked to show
        assert body["totals"]["alpha"]["images"] == 3
        assert set(body["totals"]) == {"alpha"}
        status, body = await usage(gateway, http, ADMIN, f"?from={today}&to={today}")
        assert status == 200 and body["tenant"] is None
        assert {(r["tenant"], r["images"]) for r in body["usage"]} == {
            ("alpha", 2),
            ("alpha", 1),
            ("beta", 3),
        }
        assert ALPHA not in str(body)


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("?from=2025-13-01", "from"),
        ("?from=yesterday", "from"),
        ("?to=2025-1-2", "to"),
        ("?from=2025-02-01&to=2025-01-01", "from"),
        ("?from=2024-01-01&to=2025-01-01", "to"),  # 367 days
    ],
)
async def test_dates_are_checked_with_a_clear_400(
    gateway: Gateway, http: aiohttp.ClientSession, query: str, parameter: str
) -> None:
    status, body = await usage(gateway, http, ALPHA, query)
    assert status == 400
    (error,) = body["errors"]
    assert error["parameter"] == parameter
    assert (
        "YYYY-MM-DD" in error["message"]
        or "days" in error["message"]
        or "after" in error["message"]
    )


async def test_a_full_year_is_the_widest_range(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    status, body = await usage(gateway, http, ALPHA, "?from=2024-01-01&to=2024-12-31")
    assert status == 200 and body["usage"] == []


async def test_without_a_right_key_no_figures(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    status, body = await usage(gateway, http, None)
    assert (status, body["errors"][0]["code"]) == (401, "missingApiKey")
    status, body = await usage(gateway, http, "not-a-key")
    assert (status, body["errors"][0]["code"]) == (401, "invalidApiKey")


def record(tenant: str, key: str | None, cost: float, images: int) -> TaskRecord:
    """What the ledger reads of a finished record, and nothing else."""
    made = SimpleNamespace(tenant=tenant, key_id=key, cost=cost, results=[None] * images)
    return cast(TaskRecord, made)


async def test_the_memory_ledger_keeps_its_days_and_pairs_bounded(clock: Clock) -> None:
    clock.now = 20_000 * DAY
    ledger = Usage(wall_clock=clock, days_kept=3, max_pairs_per_day=2)
    for key in ("k1", "k2", "k3", "k4"):
        ledger.add(record("t", key, 0.5, 1))
    rows = await ledger.rows(0, 30_000, None)
    assert [(r.key_id, r.tasks) for r in rows] == [("k1", 1), ("k2", 1), (OTHER_KEY, 2)]
    for _ in range(3):
        clock.advance(DAY)
        ledger.add(record("t", "k1", 0.25, 2))
    rows = await ledger.rows(0, 30_000, None)
    assert [r.day for r in rows] == [day_text(20_000 + d) for d in (1, 2, 3)]  # 3 days kept
    assert rows[0].spend == 0.25 and rows[0].images == 2
    assert parse_day(rows[0].day) == 20_001


async def test_usage_in_redis_survives_a_gateway_restart(
    provider: LocalProvider,
    http: aiohttp.ClientSession,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = f"test-{uuid.uuid4().hex}"

    def shared() -> Any:
        config = config_for(provider, monkeypatch)
        config.store = StoreSettings(
            url=redis_url, prefix=prefix, replica="a", timeout=300 * MS, lease=1000 * MS
        )
        return config

    async with running(shared()) as gateway:
        await send(gateway, http, ALPHA, numberResults=2)
        await send(gateway, http, BETA)
        # read before any flush: this replica's figures not yet in Redis count too
        status, body = await usage(gateway, http, ALPHA)
        assert status == 200 and body["totals"]["alpha"]["images"] == 2
        spent = body["totals"]["alpha"]["spend"]
        await until(lambda: not gateway.usage._days and not gateway.usage._unconfirmed)
    async with running(shared()) as again:
        status, body = await usage(again, http, ALPHA)
        assert status == 200
        assert body["totals"]["alpha"] == {"spend": spent, "images": 2, "tasks": 1}
        await send(again, http, ALPHA)
        status, body = await usage(again, http, ADMIN)
        assert body["totals"]["alpha"]["tasks"] == 2
        assert body["totals"]["beta"]["tasks"] == 1
    async with running(shared()) as third:  # the last figures were flushed as it stopped
        status, body = await usage(third, http, ADMIN)
        assert body["totals"]["alpha"]["tasks"] == 2


async def test_a_flush_whose_answer_came_late_is_counted_once(redis_url: str) -> None:
    """Redis busy past the deadline while a flush waits: the flush fails, yet Redis ran it;
    sent again, it is not added a second time (the ledger counted the task twice)."""
    redis = RedisConnection.from_url(redis_url, deadline=200 * MS, prefix=f"t-{uuid.uuid4().hex}")
    ledger = Usage(wall_clock=time.time, redis=redis)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        ledger.add(record("alpha", "k", 0.5, 1))
        await ledger.flush()  # connected, its script known to Redis
        ledger.add(record("alpha", "k", 1.0, 1))
        stall = asyncio.ensure_future(admin.eval(BUSY, 0, round(4 * 200 * MS * 1e6)))
        await asyncio.sleep(30 * MS)  # the busy script runs
        with pytest.raises(StoreUnavailable):
            await ledger.flush()
        await stall
        await ledger.flush()
        [row] = await ledger.rows(ledger.today(), ledger.today(), "alpha")
        assert (row.tasks, row.images, row.spend) == (2, 2, 1.5)
    finally:
        await admin.aclose()
        await redis.close()
