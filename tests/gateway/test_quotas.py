"""Tenants' limits at the intake: each at its bound and past it, by WebSocket and REST, with the
gateway's clocks injected (the token bucket's, the budget's UTC day)."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.admission import FairQueue
from gateway.app import Gateway
from gateway.config import Tenant
from gateway.provider.server import LocalProvider
from gateway.quotas import DAY, BudgetLedger, TenantQuotas, TokenBucket
from gateway.store.base import TaskRecord
from gateway.store.connection import RedisConnection
from gateway.store.limits import LocalFigures, SharedLimits
from gateway.tenants import TenantPolicy
from protocol.codec import decode_client_frame
from protocol.frames import ErrorItem, ImageTask
from protocol.models import default_catalogue
from tests.gateway.conftest import (
    ALPHA,
    BETA,
    Client,
    Clock,
    connect,
    gateway_config,
    running,
    set_faults,
    task,
    until,
)
from tests.timing import MS

PRICE = 0.195  # a 1K image of the catalogue's model


def test_the_bucket_gives_its_burst_then_its_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(2.0, 3, lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.wait() == pytest.approx(0.5)
    now[0] = 0.5
    assert bucket.take() and not bucket.take()
    now[0] = 100.0
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]  # never past burst


def test_the_ledger_counts_spend_by_utc_day_and_holds_prices_until_the_end() -> None:
    spend: dict[str, float] = {"a": 5.0}  # before the gateway's day began: not today's
    wall = Clock()
    ledger = BudgetLedger(spend, wall)
    assert ledger.spent_today("a") == 0.0
    spend["a"] += 0.25
    assert ledger.spent_today("a") == pytest.approx(0.25)
    record = TaskRecord(tenant="a", task=None, upstream_uuid="u1", created=0.0)  # type: ignore[arg-type]
    ledger.hold(record, 0.5)
    assert ledger.reserved == {"a": 0.5}
    ledger.release(record)
    ledger.release(record)  # once only
    assert ledger.reserved == {}
    assert ledger.seconds_to_next_day() == DAY - 1000.0
    wall.advance(DAY - 1000.0)  # 00:00 UTC
    assert ledger.spent_today("a") == 0.0
    assert ledger.spend_by_tenant() == {"a": 0.0}


def test_connections_are_counted_per_tenant_across_limit_changes() -> None:
    quotas = TenantQuotas(default_catalogue(), BudgetLedger({}, Clock()), Counter(), clock=Clock())
    capped = TenantPolicy.of("a", Tenant(max_connections=2))
    assert quotas.connect("a", None) is None  # no limit yet, but counted
    refused = quotas.connect("a", capped)
    assert refused is None
    refused = quotas.connect("a", capped)
    assert refused is not None and refused.code == "rateLimitExceeded"
    assert refused.taskType == "authentication" and "2 connections" in refused.message
    assert quotas.refused == Counter({("a", "tenant_max_connections"): 1})
    quotas.disconnect("a")
    assert quotas.connect("a", capped) is None
    assert quotas.connections("a") == 2


# --------------------------------------------------------------------------- across replicas


def image(**overrides: Any) -> ImageTask:
    [decoded] = decode_client_frame(json.dumps([task(**overrides)]), default_catalogue())
    assert isinstance(decoded, ImageTask)
    return decoded


def refusal(checked: ErrorItem | float) -> str:
    return checked.code if isinstance(checked, ErrorItem) else "ok"


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[tuple[SharedLimits, SharedLimits]]:
    """Replicas "a" and "b" of one gateway; refreshed by hand (the loop is not started)."""
    prefix = f"test-{uuid.uuid4().hex}"
    pair = tuple(
        SharedLimits(RedisConnection.from_url(redis_url, deadline=500 * MS, prefix=prefix), name)
        for name in ("a", "b")
    )
    yield pair[0], pair[1]
    for shared in pair:
        await shared.stop()
        await shared.redis.close()


def quotas_of(
    shared: SharedLimits, spend: dict[str, float] | None = None, clock: Clock | None = None
) -> TenantQuotas:
    ledger = BudgetLedger({} if spend is None else spend, Clock())
    return TenantQuotas(
        default_catalogue(), ledger, Counter(), clock=clock or Clock(), shared=shared
    )


async def test_replicas_take_the_rate_from_one_bucket(
    replicas: tuple[SharedLimits, SharedLimits],
) -> None:
    a, b = replicas
    clock = Clock()
    quotas = quotas_of(a, clock=clock)
    policy = TenantPolicy.of("alpha", Tenant(rate=0.01, burst=3))
    assert (await b.take("alpha", 1, 0.01, 3)).tokens == 1  # the other replica takes one
    await quotas.prepare("alpha", policy, 3)  # the frame's three tasks: two tokens left
    assert [refusal(quotas.check(policy, image())) for _ in range(3)] == [
        "ok",
        "ok",
        "rateLimitExceeded",
    ]
    refused = quotas.check(policy, image())
    assert isinstance(refused, ErrorItem)
    assert "0.01 tasks per second (bursts of 3). Retry in" in refused.message
    assert quotas.retry_after("alpha", "rateLimitExceeded") == 100  # the shared bucket's wait
    clock.advance(1000.0)  # no local bucket to refill
    assert refusal(quotas.check(policy, image())) == "rateLimitExceeded"
    await quotas.prepare("alpha", policy, 1)
    assert refusal(quotas.check(policy, image())) == "rateLimitExceeded"  # the bucket is empty
    # a tenant checked without prepare() has no token: a door that forgot refuses
    other = TenantPolicy.of("beta", Tenant(rate=100.0, burst=100))
    assert refusal(quotas.check(other, image())) == "rateLimitExceeded"
    await quotas.prepare("beta", other, 3)
    assert refusal(quotas.check(other, image())) == "ok"
    await quotas.prepare("beta", other, 1)  # the frame before left two: dropped
    assert [refusal(quotas.check(other, image())) for _ in range(2)] == ["ok", "rateLimitExceeded"]
    assert quotas.refused == Counter({("alpha", "tenant_rate"): 4, ("beta", "tenant_rate"): 2})


async def test_the_budget_counts_the_other_replicas_spend_and_held(
    replicas: tuple[SharedLimits, SharedLimits],
) -> None:
    a, b = replicas
    spend: dict[str, float] = {}
    quotas = quotas_of(a, spend)
    policy = TenantPolicy.of("alpha", Tenant(budget_per_day=1.0))
    b.local = lambda: {"alpha": LocalFigures(in_flight=1, held=0.3)}
    b.add_spend("alpha", 0.5)
    await b.refresh()
    await a.refresh()
    assert refusal(quotas.check(policy, image())) == "ok"  # 0.5 + 0.3 + PRICE <= 1
    spend["alpha"] = 0.1  # this replica's provider cost, counted before it is fed
    refused = quotas.check(policy, image())
    assert isinstance(refused, ErrorItem) and refused.code == "insufficientCredits"
    assert "$0.6000 spent today and $0.3000 held" in refused.message
    assert quotas.ledger.spent_today("alpha") == pytest.approx(0.6)
    await a.refresh()  # fed to Redis once, and no longer counted as its own
    await b.refresh()
    assert b.spent_today("alpha") == pytest.approx(0.6)
    assert quotas.ledger.spent_today("alpha") == pytest.approx(0.6)
    assert quotas.ledger.spend_by_tenant() == {"alpha": pytest.approx(0.6)}


async def test_connections_are_counted_across_replicas(
    replicas: tuple[SharedLimits, SharedLimits],
) -> None:
    a, b = replicas
    quotas = quotas_of(a)
    capped = TenantPolicy.of("alpha", Tenant(max_connections=2))
    b.local = lambda: {"alpha": LocalFigures(connections=1)}
    await b.refresh()
    await a.refresh()
    assert quotas.connect("alpha", capped) is None
    refused = quotas.connect("alpha", capped)
    assert refused is not None and "2 connections" in refused.message


def test_a_replica_reports_its_own_figures() -> None:
    quotas = TenantQuotas(default_catalogue(), BudgetLedger({}, Clock()), Counter(), clock=Clock())
    queue: FairQueue[str] = FairQueue(10)
    for item in ("t1", "t2", "t3"):
        queue.push("alpha", item)
    assert queue.pop() == ("alpha", "t1")
    quotas.connect("alpha", None)
    quotas.connect("beta", None)
    record = TaskRecord(tenant="alpha", task=None, upstream_uuid="u1", created=0.0)  # type: ignore[arg-type]
    quotas.ledger.hold(record, 0.25)
    assert quotas.local_figures(queue) == {
        "alpha": LocalFigures(in_flight=1, queued=2, connections=1, held=0.25),
        "beta": LocalFigures(connections=1),
    }


# --------------------------------------------------------------------------- through a gateway


@pytest.fixture
def wall() -> Clock:
    return Clock()  # 1970-01-01 00:16:40 UTC


@pytest.fixture
async def limited(provider: LocalProvider, clock: Clock, wall: Clock) -> AsyncIterator[Gateway]:
    """alpha with every intake limit; beta with none."""
    set_faults(provider, fast=True)
    config = gateway_config(provider)
    config.tenants["alpha"] = Tenant(
        keys=[ALPHA],
        rate=1.0,
        burst=3,
        budget_per_day=5 * PRICE,
        max_number_results=2,
        allow_webhooks=False,
        allow_uploads=False,
    )
    async with running(config, clock=clock, wall_clock=wall) as gateway:
        yield gateway


async def answer(client: Client, sent: dict[str, Any]) -> dict[str, Any]:
    """One async task, one frame: its ack, or its error."""
    await client.send(sent)
    frame = await client.recv()
    [item] = frame.get("data") or frame["errors"]
    assert item["taskUUID"] == sent["taskUUID"]
    return dict(item)


def code(item: dict[str, Any]) -> str:
    return str(item.get("code", "ack"))


async def rest(http: aiohttp.ClientSession, gateway: Gateway, sent: dict[str, Any]) -> Any:
    url = f"http://127.0.0.1:{gateway.port}/v1"
    async with http.post(url, json=[sent], headers={"Authorization": f"Bearer {ALPHA}"}) as r:
        return r.status, await r.json()


async def refused_counts(http: aiohttp.ClientSession, gateway: Gateway) -> dict[str, float]:
    async with http.get(f"http://127.0.0.1:{gateway.port}/metrics") as response:
        text = await response.text()
    return {
        line.split('limit="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('tenebra_tenant_refused_total{limit="')
        or line.startswith('tenebra_tenant_refused_total{tenant="alpha"')
    }


def async_task(**overrides: Any) -> dict[str, Any]:
    return task(deliveryMethod="async", **overrides)


async def test_rate_and_burst(limited: Gateway, http: aiohttp.ClientSession, clock: Clock) -> None:
    alpha, beta = await connect(http, limited.url), await connect(http, limited.url)
    await alpha.auth(ALPHA)
    await beta.auth(BETA)
    assert [code(await answer(alpha, async_task())) for _ in range(3)] == ["ack"] * 3  # burst
    refused = await answer(alpha, async_task())
    assert code(refused) == "rateLimitExceeded"
    assert "1 tasks per second (bursts of 3)" in refused["message"]
    status, body = await rest(http, limited, async_task())  # the same bucket by REST
    assert status == 429 and body["errors"][0]["code"] == "rateLimitExceeded"
    assert limited.intake is not None
    assert limited.intake.retry_after("alpha", "rateLimitExceeded") == 1
    # beta has no limit, and alpha's do not touch it
    assert [code(await answer(beta, async_task())) for _ in range(6)] == ["ack"] * 6
    assert "beta" not in limited.intake.checked
    clock.advance(1.0)  # one token back
    assert code(await answer(alpha, async_task())) == "ack"
    assert code(await answer(alpha, async_task())) == "rateLimitExceeded"
    assert (await refused_counts(http, limited))["tenant_rate"] == 3


async def test_what_a_task_may_ask(limited: Gateway, http: aiohttp.ClientSession) -> None:
    client = await connect(http, limited.url)
    await client.auth(ALPHA)
    assert code(await answer(client, async_task(numberResults=2))) == "ack"  # at the bound
    refused = await answer(client, async_task(numberResults=3))
    assert (refused["code"], refused["parameter"]) == ("invalidNumberResults", "numberResults")
    assert "at most 2 results" in refused["message"]
    hook = "https://example.com/hook"
    refused = await answer(client, async_task(webhookURL=hook))
    assert (refused["code"], refused["parameter"]) == ("unsupportedParameter", "webhookURL")
    refused = await answer(client, async_task(uploadEndpoint="https://example.com/put"))
    assert (refused["code"], refused["parameter"]) == ("unsupportedParameter", "uploadEndpoint")
    status, body = await rest(http, limited, async_task(numberResults=3))
    assert status == 400 and body["errors"][0]["parameter"] == "numberResults"
    counts = await refused_counts(http, limited)
    assert counts["tenant_max_number_results"] == 2
    assert counts["tenant_allow_webhooks"] == counts["tenant_allow_uploads"] == 1
    assert "tenant_rate" not in counts  # refused for what they asked, they took no token


async def test_the_daily_budget(
    limited: Gateway, http: aiohttp.ClientSession, clock: Clock, wall: Clock
) -> None:
    """5 x PRICE a day: the prices of tasks in flight count before their cost arrives, the
    provider's cost counts once they end, and the budget comes back at 00:00 UTC."""
    client = await connect(http, limited.url)
    await client.auth(ALPHA)
    assert code(await answer(client, async_task(numberResults=2))) == "ack"
    assert code(await answer(client, async_task())) == "ack"
    clock.advance(10.0)  # the rate is not what this test is about
    assert code(await answer(client, async_task())) == "ack"
    assert code(await answer(client, async_task())) == "ack"  # 5 x PRICE: at the bound
    refused = await answer(client, async_task())
    assert refused["code"] == "insufficientCredits"
    await until(lambda: limited.store.open_count == 0)
    assert limited.budgets.spent_today("alpha") == pytest.approx(5 * PRICE)  # the provider's
    assert limited.budgets.reserved == {}
    refused = await answer(client, async_task())
    assert refused["code"] == "insufficientCredits"
    assert "$0.9750 (UTC day): $0.9750 spent today and $0.0000 held" in refused["message"]
    assert "this task's $0.1950" in refused["message"]
    status, body = await rest(http, limited, async_task())
    assert status == 402 and body["errors"][0]["code"] == "insufficientCredits"
    assert limited.intake is not None
    assert limited.intake.retry_after("alpha", "insufficientCredits") == DAY - 1000
    async with http.get(f"http://127.0.0.1:{limited.port}/metrics") as response:
        text = await response.text()
    assert 'tenebra_tenant_spent_today_usd{tenant="alpha"} 0.975' in text
    assert 'limit="tenant_budget_per_day"' in text
    wall.advance(DAY - 1000.0)  # 00:00 UTC the next day
    assert code(await answer(client, async_task())) == "ack"
