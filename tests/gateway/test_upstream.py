"""The provider link against a provider that misbehaves in ways the local one never does: every
frame it sends may be garbage, of the wrong shape, or about a task the gateway never sent. The
link logs and counts what it cannot use, drops it, and reconnects if it must; it never dies."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import uuid

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gateway.upstream
from gateway.app import Gateway
from gateway.config import ProviderSettings
from gateway.pool import UpstreamPool
from gateway.store.base import TaskRecord, TaskState
from gateway.upstream import LinkState
from protocol.codec import decode_client_frame
from protocol.frames import ImageTask
from protocol.models import default_catalogue
from tests.compiled import pure_python_only
from tests.gateway.conftest import ALPHA, Client, connect, fake_config, task, until
from tests.gateway.fakes import FakeProvider
from tests.timing import MS


async def started(fake: FakeProvider) -> Gateway:
    gateway = Gateway(fake_config(fake))
    await gateway.start()
    return gateway


async def ready(gateway: Gateway) -> UpstreamPool:
    """The gateway's pool, once a provider link is ready."""
    assert gateway.pool is not None
    async with asyncio.timeout(5000 * MS):
        await gateway.pool.wait_ready()
    return gateway.pool


async def one_task_completes(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    client: Client = await connect(http, gateway.url)
    await client.auth(key=ALPHA)
    sent = task(numberResults=2)
    await client.send(sent)
    for _ in range(2):
        frame = await client.recv(within=5000 * MS)
        assert frame["data"][0]["taskUUID"] == sent["taskUUID"], frame
    await client.ws.close()


def failures(gateway: Gateway) -> float:
    total = 0.0
    for metric in gateway.metrics.upstream_failures.collect():
        total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


MALFORMED_AUTH_REPLIES = [
    b"not json",
    b'{"data": 5}',
    b"[]",
    b"null",
    b'{"data": [5]}',
    b'{"errors": [{"x": 1}]}',
    b'{"data": [{"taskType": "authentication"}]}',
    b"[" * 5000 + b"]" * 5000,
]


@pytest.mark.parametrize("reply", MALFORMED_AUTH_REPLIES)
async def test_a_malformed_authentication_reply_is_survived(
    fake: FakeProvider, http: aiohttp.ClientSession, reply: bytes
) -> None:
    fake.auth_answers.extend([reply, reply])
    gateway = await started(fake)
    try:
        await ready(gateway)  # the link came back once the provider behaved
        assert fake.connections >= 3
        assert failures(gateway) >= 2
        await one_task_completes(gateway, http)
    finally:
        await gateway.stop()  # and the failures do not surface at shutdown


async def test_an_item_for_a_task_not_yet_sent_is_dropped(
    fake: FakeProvider, http: aiohttp.ClientSession
) -> None:
    """Upstream UUIDs are predictable; an item about a task still waiting at the gateway
    (received or queued, never sent) must not move it, nor kill the link."""
    gateway = await started(fake)
    try:
        pool = await ready(gateway)
        (checked,) = decode_client_frame(json.dumps([task()]), gateway.catalogue)
        assert isinstance(checked, ImageTask)
        record = gateway.registry.register("alpha", checked, None)
        assert isinstance(record, TaskRecord)
        stray = {
            "taskType": "imageInference",
            "taskUUID": record.upstream_uuid,
            "imageUUID": str(uuid.uuid4()),
            "imageURL": "http://127.0.0.1:9/x.jpg",
        }
        error = {"code": "providerError", "message": "?", "taskUUID": record.upstream_uuid}
        link = pool.links[0]
        link._route(json.dumps({"data": [stray]}).encode())
        link._route(json.dumps({"errors": [error]}).encode())
        assert record.state == TaskState.RECEIVED and record.open
        assert link.state == LinkState.READY
        await one_task_completes(gateway, http)
        assert gateway.metrics.stray_items._value.get() == 2
    finally:
        await gateway.stop()


async def test_a_failed_link_leaves_no_exception_current_for_other_coroutines(
    fake: FakeProvider,
) -> None:
    """The link cleans up after a failure (its parts, its socket) and reconnects. Built with
    mypyc (make unit-compiled), awaiting that clean-up inside the exception's handler left the
    link's ConnectionError current for every other coroutine: later Redis calls raised it."""
    gateway = await started(fake)
    try:
        link = (await ready(gateway)).links[0]
        seen: list[object] = []
        for _ in range(2):
            connects = link.connects
            await fake.drop()
            async with asyncio.timeout(5000 * MS):  # through the clean-up and the reconnect
                while link.connects == connects or link.state != LinkState.READY:
                    seen.append(sys.exc_info()[1])
                    await asyncio.sleep(1 * MS)
            for _ in range(20):  # and after
                seen.append(sys.exc_info()[1])
                await asyncio.sleep(1 * MS)
        assert seen and all(current is None for current in seen)
    finally:
        await gateway.stop()


@pure_python_only(gateway.upstream)  # patches a method of a link
async def test_a_link_that_fails_unexpectedly_reconnects_and_close_does_not_raise(
    fake: FakeProvider, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever escapes a connection (a bug included) is logged, counted, and followed by a
    reconnect with backoff; close() at shutdown does not re-raise it."""
    gateway = await started(fake)
    try:
        link = (await ready(gateway)).links[0]
        calls = 0
        original = link._recover

        def broken(resumed: bool) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug in recovery")
            original(resumed)

        monkeypatch.setattr(link, "_recover", broken)
        await fake.drop()
        await until(lambda: calls >= 2 and link.state == LinkState.READY, 5000 * MS)
        assert failures(gateway) >= 2
        await one_task_completes(gateway, http)
    finally:
        await gateway.stop()


ITEM = st.one_of(
    st.integers(),
    st.none(),
    st.text(max_size=20),
    st.dictionaries(
        st.sampled_from(["taskType", "taskUUID", "imageUUID", "code", "message", "pong", "x"]),
        st.one_of(st.text(max_size=40), st.integers(), st.none(), st.booleans()),
        max_size=5,
    ),
)
FRAME = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda v: json.dumps(v).encode(), st.recursive(ITEM, st.lists, max_leaves=8)),
    st.builds(
        lambda d, e: json.dumps({"data": d, "errors": e}).encode(),
        st.lists(ITEM, max_size=4),
        st.lists(ITEM, max_size=4),
    ),
)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(at_auth=st.lists(FRAME, max_size=2), after_auth=st.lists(FRAME, max_size=6))
async def test_fuzzed_provider_frames_never_kill_the_link(
    at_auth: list[bytes], after_auth: list[bytes]
) -> None:
    fake = FakeProvider()
    await fake.start()
    fake.auth_answers.extend(at_auth)
    fake.after_auth.extend(after_auth)
    try:
        gateway = await started(fake)
        try:
            assert gateway.pool is not None
            await until(
                lambda: not (fake.auth_answers or fake.after_auth) and gateway.pool.ready,
                5000 * MS,
            )
            async with aiohttp.ClientSession() as http:
                await one_task_completes(gateway, http)
        finally:
            await gateway.stop()
    finally:
        await fake.stop()


async def test_a_resend_waiting_in_a_broken_links_outbox_stays_with_that_link() -> None:
    """A task resent after taskNotFound may be at the provider after all: if the link breaks
    before the resend leaves, it must not go to another link (billed twice there), but stay
    this link's for the next recovery to ask about. A task never sent may go anywhere."""
    from gateway.metrics import Metrics
    from gateway.store.memory import MemoryTaskStore
    from gateway.tasks import TaskRegistry
    from gateway.upstream import UpstreamLink

    metrics = Metrics()
    registry = TaskRegistry(
        MemoryTaskStore(retention=60, max_finished=100), max_open=10, clock=lambda: 0.0,
        metrics=metrics,
    )  # fmt: skip
    records = []
    for _ in range(2):
        (checked,) = decode_client_frame(json.dumps([task()]), default_catalogue())
        assert isinstance(checked, ImageTask)
        record = registry.register("alpha", checked, None)
        assert isinstance(record, TaskRecord)
        records.append(record)
    resend, fresh = records
    handed_back: list[TaskRecord] = []
    async with aiohttp.ClientSession() as http:
        link = UpstreamLink(
            0, "ws://127.0.0.1:9/v1", "k", ProviderSettings(), registry, metrics, http,
            rng=random.Random(1), on_state=lambda _: None, on_unsent=handed_back.append,
            on_refused=lambda *_: None,
        )  # fmt: skip
        link.recovery.sent(resend.upstream_uuid)  # out once; its resend waits in the outbox
        link.outbox.extend([resend, fresh])
        link._requeue_unsent()
    assert handed_back == [fresh]
    assert resend.upstream_uuid in link.recovery.in_flight
    assert link.recovery.reconnected(resumed=True).poll_now == [resend.upstream_uuid]
