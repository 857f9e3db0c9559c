"""The audit lines (gateway/audit.py): a finished task, a failed authentication, a limit hit, a
finished delivery; the key only ever as its key id; off when configured off."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from gateway.app import Gateway
from gateway.audit import Audit, _tenths, key_id, quota_limit
from gateway.config import Tenant
from gateway.provider.server import LocalProvider
from gateway.store.base import Delivery, TaskRecord, TaskState
from protocol.codec import decode_client_frame
from protocol.errors import error_item
from protocol.frames import ImageResult, ImageTask
from protocol.models import default_catalogue
from tests.gateway.conftest import (
    ALPHA,
    BETA,
    connect,
    gateway_config,
    running,
    task,
    until,
)
from tests.gateway.delivery.test_deliveries import Receiver, delivery_config, receiver

__all__ = ["receiver"]  # a fixture, used by name

ALPHA_ID = hashlib.sha256(ALPHA.encode()).hexdigest()[:12]


class Lines(list[dict[str, Any]]):
    """The audit lines written, parsed."""

    def write(self, data: bytes) -> None:
        assert data.endswith(b"\n")  # whole lines only
        self.extend(json.loads(line) for line in data.splitlines())

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [line for line in self if line["audit"] == kind]


@pytest.fixture
def lines() -> Lines:
    return Lines()


@pytest.fixture
async def audited(provider: LocalProvider, lines: Lines) -> AsyncIterator[Gateway]:
    config = delivery_config(provider)
    config.tenants["limited"] = Tenant(keys=["limited-key"], rate=0.001, burst=1)
    async with running(config) as gateway:
        assert gateway.audit is not None  # on by default
        gateway.audit.write = lines.write
        yield gateway


def test_key_id_is_a_prefix_of_the_keys_sha256() -> None:
    digest = hashlib.sha256(b"some-key").digest()
    assert key_id(digest) == digest.hex()[:12]


def checked(body: dict[str, Any]) -> ImageTask:
    (outcome,) = decode_client_frame(msgspec.json.encode([body]), default_catalogue())
    assert isinstance(outcome, ImageTask)
    return outcome


def test_a_task_line_has_every_field_and_is_one_json_line(lines: Lines) -> None:
    audit = Audit(lines.write, wall_clock=lambda: 1_700_000_000.25)
    record = TaskRecord(
        tenant="acme",
        task=checked(task(taskUUID="6f1c7a52-8d2e-4c35-b1f0-1f6c5f2b8a01")),
        upstream_uuid="u",
        created=10.0,
        finished=10.8125,
        state=TaskState.DONE,
        key_id="0123456789ab",
        cost=0.1 + 0.2,
        results=(ImageResult(taskType="imageInference", taskUUID="t", imageUUID="i"),),
        deliveries=(
            Delivery(id="a", kind="webhook", target="x", state="delivered"),
            Delivery(id="b", kind="webhook", target="x"),
            Delivery(id="c", kind="upload", target="y", state="failed"),
        ),
    )
    audit.task(record)
    assert lines == [
        {
            "event": "task finished",
            "audit": "task",
            "tenant": "acme",
            "key_id": "0123456789ab",
            "taskUUID": "6f1c7a52-8d2e-4c35-b1f0-1f6c5f2b8a01",
            "state": "done",
            "images": 1,
            "cost": 0.30000000000000004,  # as the provider's costs add up
            "latency_ms": 812.5,
            "deliveries": {"webhook": {"delivered": 1, "pending": 1}, "upload": {"failed": 1}},
            "level": "info",
            "timestamp": "2023-11-14T22:13:20.250Z",
        }
    ]


def test_without_a_writer_lines_go_through_structlog() -> None:
    with structlog.testing.capture_logs() as captured:
        Audit().auth_failed("10.0.0.1", "invalidApiKey", "rest")
    assert captured == [
        {
            "event": "authentication failed",
            "audit": "auth",
            "address": "10.0.0.1",
            "reason": "invalidApiKey",
            "door": "rest",
            "log_level": "info",
        }
    ]


def test_each_quota_refusal_names_its_limit() -> None:
    cases = {
        ("rateLimitExceeded", None): "tenant_rate",
        ("insufficientCredits", None): "tenant_budget_per_day",
        ("invalidNumberResults", "numberResults"): "tenant_max_number_results",
        ("unsupportedParameter", "webhookURL"): "tenant_allow_webhooks",
        ("unsupportedParameter", "uploadEndpoint"): "tenant_allow_uploads",
    }
    for (code, parameter), limit in cases.items():
        assert quota_limit(error_item(code, parameter=parameter)) == limit


async def test_a_finished_task_writes_one_line_with_its_key_id_never_its_key(
    audited: Gateway, lines: Lines, http: aiohttp.ClientSession
) -> None:
    client = await connect(http, audited.url)
    await client.auth(ALPHA)
    body = task(numberResults=2)
    await client.send(body)
    for _ in range(2):
        assert "data" in await client.recv()
    await until(lambda: bool(lines.of("task")))
    (line,) = lines.of("task")
    assert line["tenant"] == "alpha"
    assert line["key_id"] == ALPHA_ID
    assert line["taskUUID"] == body["taskUUID"]
    record = audited.registry.lookup("alpha", body["taskUUID"])
    assert record is not None and record.cost > 0  # the provider's, though not asked to show it
    assert (line["state"], line["images"], line["cost"]) == ("done", 2, record.cost)
    assert line["latency_ms"] > 0
    assert "deliveries" not in line
    assert ALPHA not in json.dumps(list(lines))


async def test_rest_tasks_carry_the_bearer_key_id(
    audited: Gateway, lines: Lines, http: aiohttp.ClientSession
) -> None:
    headers = {"Authorization": f"Bearer {BETA}"}
    async with http.post(f"http://127.0.0.1:{audited.port}/v1", json=[task()], headers=headers):
        pass
    await until(lambda: bool(lines.of("task")))
    assert lines.of("task")[0]["key_id"] == hashlib.sha256(BETA.encode()).hexdigest()[:12]


async def test_failed_authentications_are_lines_with_address_and_reason(
    audited: Gateway, lines: Lines, http: aiohttp.ClientSession
) -> None:
    client = await connect(http, audited.url)
    await client.send({"taskType": "authentication", "apiKey": "wrong-key"})
    assert (await client.recv())["errors"][0]["code"] == "invalidApiKey"
    headers = {"Authorization": "Bearer also-wrong"}
    async with http.post(f"http://127.0.0.1:{audited.port}/v1", json=[task()], headers=headers):
        pass
    await until(lambda: len(lines.of("auth")) == 2)  # written together, within 0.1 s
    assert [(x["door"], x["reason"], x["address"]) for x in lines.of("auth")] == [
        ("websocket", "invalidApiKey", "127.0.0.1"),
        ("rest", "invalidApiKey", "127.0.0.1"),
    ]
    assert "wrong" not in json.dumps(list(lines))


async def test_a_limit_hit_is_a_line_with_tenant_limit_and_code(
    audited: Gateway, lines: Lines, http: aiohttp.ClientSession
) -> None:
    client = await connect(http, audited.url)
    await client.auth("limited-key")
    first, second = task(), task()
    await client.send(first, second)  # a burst of 1: the second is over the rate
    frames = [await client.recv() for _ in range(2)]
    assert any("errors" in f for f in frames)
    await until(lambda: bool(lines.of("limit")))
    (line,) = lines.of("limit")
    assert (line["tenant"], line["limit"], line["code"]) == (
        "limited",
        "tenant_rate",
        "rateLimitExceeded",
    )
    assert line["taskUUID"] == second["taskUUID"]
    assert line["key_id"] == hashlib.sha256(b"limited-key").hexdigest()[:12]


async def test_a_finished_delivery_is_a_line_and_the_task_line_lists_its_deliveries(
    audited: Gateway, lines: Lines, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    client = await connect(http, audited.url)
    await client.auth(ALPHA)
    await client.send(task(deliveryMethod="async", webhookURL=f"{receiver.url}/hook"))
    await client.recv()  # the ack
    await until(lambda: bool(lines.of("delivery")))
    (task_line,) = lines.of("task")
    assert task_line["deliveries"] == {"webhook": {"pending": 1}}  # as it stood at the end
    (line,) = lines.of("delivery")
    assert (line["tenant"], line["kind"], line["state"], line["attempts"]) == (
        "alpha",
        "webhook",
        "delivered",
        1,
    )
    assert line["last_status"] == 200


async def test_audit_off_adds_no_hook(provider: LocalProvider) -> None:
    config = gateway_config(provider, audit=False)
    async with running(config) as gateway:
        assert gateway.audit is None
        assert gateway.intake is not None and gateway.intake.audit is None
        assert gateway.pool is not None and gateway.pool.on_limit is None
        hooks = [*gateway.registry.on_final, *gateway.registry.on_final_batch]
        assert all(getattr(h, "__self__", None) is not Audit for h in hooks)


@given(st.floats(min_value=0.0, max_value=1e7))
def test_a_latency_is_written_to_the_nearest_tenth(value: float) -> None:
    tenths = _tenths(value)
    assert abs(tenths - value) <= 0.05 + 1e-9 * value
    assert tenths == round(tenths, 1)  # no digits past the first decimal in the line


def test_a_latency_that_is_not_a_finite_one_of_this_clock_is_rounded_as_it_was() -> None:
    """NaN, infinite or negative (a record another replica started on its own clock): what
    round(x, 1) made of it, never an error that would lose the batch's lines."""
    assert math.isnan(_tenths(math.nan))
    assert _tenths(math.inf) == math.inf
    assert _tenths(-3.14) == -3.1
