"""Traces (gateway/telemetry.py) through the SDK's in-memory exporter: a task's span tree, a
client's ``traceparent`` continued, and nothing at all while tracing is off."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.provider.server import LocalProvider
from gateway.telemetry import Telemetry, from_env
from tests.gateway.conftest import (
    ALPHA,
    Client,
    connect,
    gateway_config,
    running,
    set_faults,
    task,
    until,
)
from tests.gateway.delivery.test_deliveries import Receiver, delivery_config, receiver

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

__all__ = ["receiver"]  # a fixture, used by name

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def telemetry(exporter: InMemorySpanExporter) -> Telemetry:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Telemetry(provider)


def tree(spans: tuple[ReadableSpan, ...]) -> dict[str, list[str]]:
    """Each span's name -> the names of its children, sorted."""
    by_id = {s.context.span_id: s for s in spans if s.context is not None}
    children: dict[str, list[str]] = {s.name: [] for s in spans}
    for span in spans:
        if span.parent is not None and span.parent.span_id in by_id:
            children[by_id[span.parent.span_id].name].append(span.name)
    return {name: sorted(names) for name, names in children.items()}


@pytest.fixture
async def traced(provider: LocalProvider, spans: InMemorySpanExporter) -> AsyncIterator[Gateway]:
    async with running(delivery_config(provider), telemetry=telemetry(spans)) as gateway:
        yield gateway


async def test_the_span_tree_of_a_two_image_task_with_a_webhook_continues_rest_traceparent(
    traced: Gateway,
    spans: InMemorySpanExporter,
    receiver: Receiver,
    http: aiohttp.ClientSession,
) -> None:
    receiver.script = [500]  # the first webhook is tried twice: two attempts, two spans
    body = task(numberResults=2, webhookURL=f"{receiver.url}/hook")
    headers = {"Authorization": f"Bearer {ALPHA}", "traceparent": TRACEPARENT}
    async with http.post(f"http://127.0.0.1:{traced.port}/v1", json=[body], headers=headers) as r:
        assert r.status == 200, await r.text()
    await until(lambda: len(receiver.requests) == 3)
    await until(lambda: sum(s.name == "delivery.attempt" for s in spans.get_finished_spans()) == 3)
    finished = spans.get_finished_spans()
    assert tree(finished) == {
        "task": ["delivery.attempt"] * 3 + ["intake", "provider", "queued"],
        "intake": [],
        "queued": [],
        "provider": ["provider.first_result", "provider.result"],
        "provider.first_result": [],
        "provider.result": [],
        "delivery.attempt": [],
    }
    (root,) = [s for s in finished if s.name == "task"]
    assert root.context is not None and root.parent is not None
    # the client's trace, continued: the same trace id, its span the task's parent
    assert f"{root.context.trace_id:032x}" == TRACE_ID
    assert f"{root.parent.span_id:016x}" == PARENT_ID
    assert {s.context.trace_id for s in finished if s.context} == {root.context.trace_id}
    attributes: dict[str, Any] = dict(root.attributes or {})
    assert attributes["tenebra.tenant"] == "alpha"
    assert attributes["tenebra.task_uuid"] == body["taskUUID"]
    assert attributes["tenebra.state"] == "done"
    assert attributes["tenebra.images"] == 2
    assert len(attributes["tenebra.key_id"]) == 12
    statuses = sorted(
        int(dict(s.attributes or {})["http.response.status_code"])  # type: ignore[arg-type]
        for s in finished
        if s.name == "delivery.attempt"
    )
    assert statuses == [200, 200, 500]
    # phases in order: intake, then queued, then the provider; results within it
    by_name = {s.name: s for s in finished}
    intake, queued, at = by_name["intake"], by_name["queued"], by_name["provider"]
    assert intake.end_time is not None and queued.start_time is not None
    assert root.start_time == intake.start_time
    assert intake.end_time <= queued.start_time
    assert queued.end_time is not None and at.start_time is not None
    assert queued.end_time <= at.start_time
    first = by_name["provider.first_result"]
    assert first.end_time is not None and at.end_time is not None
    assert first.end_time <= at.end_time


async def test_a_websocket_upgrade_traceparent_is_continued_by_its_tasks(
    traced: Gateway, spans: InMemorySpanExporter, http: aiohttp.ClientSession
) -> None:
    ws = await http.ws_connect(traced.url, headers={"traceparent": TRACEPARENT})
    client = Client(ws)
    await client.auth(ALPHA)
    await client.send(task())
    assert "data" in await client.recv()
    await until(lambda: any(s.name == "task" for s in spans.get_finished_spans()))
    (root,) = [s for s in spans.get_finished_spans() if s.name == "task"]
    assert root.context is not None and root.parent is not None
    assert f"{root.context.trace_id:032x}" == TRACE_ID
    assert f"{root.parent.span_id:016x}" == PARENT_ID
    await ws.close()


async def test_without_traceparent_each_task_is_a_trace_of_its_own(
    traced: Gateway, spans: InMemorySpanExporter, http: aiohttp.ClientSession
) -> None:
    client = await connect(http, traced.url)
    await client.auth(ALPHA)
    await client.send(task(), task())
    for _ in range(2):
        assert "data" in await client.recv()
    await until(lambda: sum(s.name == "task" for s in spans.get_finished_spans()) == 2)
    roots = [s for s in spans.get_finished_spans() if s.name == "task"]
    assert all(s.parent is None for s in roots)
    assert len({s.context.trace_id for s in roots if s.context}) == 2


async def test_a_failed_task_ends_its_trace_as_an_error(
    traced: Gateway,
    provider: LocalProvider,
    spans: InMemorySpanExporter,
    http: aiohttp.ClientSession,
) -> None:
    set_faults(provider, error_rate=1.0, error_code="timeoutProvider")
    client = await connect(http, traced.url)
    await client.auth(ALPHA)
    await client.send(task())
    assert (await client.recv())["errors"][0]["code"] == "timeoutProvider"
    await until(lambda: any(s.name == "task" for s in spans.get_finished_spans()))
    (root,) = [s for s in spans.get_finished_spans() if s.name == "task"]
    assert root.status.status_code.name == "ERROR"
    attributes = dict(root.attributes or {})
    assert (attributes["tenebra.state"], attributes["tenebra.error"]) == (
        "failed",
        "timeoutProvider",
    )
    assert tree(spans.get_finished_spans())["provider"] == []


async def test_tracing_off_sets_no_hook_and_marks_no_record(
    provider: LocalProvider, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    async with running(gateway_config(provider)) as gateway:
        assert gateway.telemetry is None
        assert gateway.registry.moved is None
        client = await connect(http, gateway.url)
        await client.auth(ALPHA)
        body = task()
        await client.send(body)
        assert "data" in await client.recv()
        record = gateway.registry.lookup("alpha", body["taskUUID"])
        assert record is not None and record.trace is None


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
    ],
)
def test_tracing_is_on_only_where_the_otel_variables_ask_for_an_exporter(
    env: dict[str, str], on: bool
) -> None:
    made = from_env(env)
    assert (made is not None) == on
    if made is not None:
        made.shutdown()
