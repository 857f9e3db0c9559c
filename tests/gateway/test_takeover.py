"""A dead replica's work taken over by a live one (gateway/takeover.py), with two gateways in
one process and a real redis-server. The process-level tests (SIGKILL) are in tests/cluster/."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis

import gateway.replication
from gateway.provider.server import LocalProvider
from gateway.replication import links_key
from gateway.store.base import TaskRecord, TaskState
from gateway.store.shared import StoreUnavailable
from tests.compiled import pure_python_only
from tests.gateway.conftest import connect, running, set_faults, shared_config, until
from tests.gateway.test_dispatch import image_task
from tests.protocol.conftest import MODEL
from tests.timing import MS


@pure_python_only(gateway.replication)
async def test_a_takeover_that_fails_after_adopting_is_not_run_again_by_another(
    provider: LocalProvider, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A adopts the dead replica's task, then its takeover fails (Redis away a moment) and its
    lock lapses; B takes the dead replica over next and finds nothing to run: the task runs on
    A alone (it was sent to the provider twice, and finished on both)."""
    prefix = f"test-{uuid.uuid4().hex}"
    set_faults(provider, fast=True, latency={"kind": "fixed", "ms": 4000})
    async with (
        running(shared_config(provider, redis_url, prefix, "a")) as a,
        running(shared_config(provider, redis_url, prefix, "b")) as b,
    ):
        b.cluster._takeovers_paused = True  # A is the first taker
        body = msgspec.structs.replace(image_task("async"), model=MODEL, width=1024, height=1024)
        record = TaskRecord(
            tenant="alpha", task=body, upstream_uuid=str(uuid.uuid4()), created=time.time()
        )
        failed: list[float] = []

        async def redis_away_once(deadline: float) -> None:  # the step after the adoption
            if not failed:
                failed.append(deadline)
                raise StoreUnavailable("redis: ConnectionError: Connection refused")

        monkeypatch.setattr(a.replication, "drain", redis_away_once)
        # the dead replica "d": one open task, listed as its own, its lease long over
        assert await a.replication.shared.create_batch([record], "d") == [True]
        await a.redis.client.zadd(f"{prefix}:replicas", {"d": 1})
        await until(lambda: bool(failed), 10000 * MS)
        assert a.registry.lookup("alpha", body.taskUUID) is not None
        a.cluster._takeovers_paused = True  # B takes the next turn at the lapsed lock
        b.cluster._takeovers_paused = False

        async def recorded() -> bool:
            return await a.redis.client.zscore(f"{prefix}:replicas", "d") is None

        deadline = time.monotonic() + 15000 * MS
        while not await recorded():
            assert time.monotonic() < deadline, "B did not take d over"
            await asyncio.sleep(50 * MS)
        assert b.registry.lookup("alpha", body.taskUUID) is None


async def test_provider_sessions_are_recorded_again_after_redis_lost_them(
    provider: LocalProvider, redis_url: str
) -> None:
    """Redis restarted empty (or flushed) under a running replica: its provider sessions are
    recorded again within a lease renewal, not only when a link authenticates anew. Without
    them, a takeover would take the replica's tasks for never sent and submit them again:
    the provider refuses each (its taskUUID is running there) and the task fails."""
    prefix = f"test-{uuid.uuid4().hex}"
    async with running(shared_config(provider, redis_url, prefix, "a")) as a:
        client, key = a.redis.client, links_key(a.redis, a.replica)

        async def recorded() -> dict[bytes, bytes]:
            return dict(await client.hgetall(key))

        deadline = time.monotonic() + 10000 * MS
        while not (before := await recorded()):
            assert time.monotonic() < deadline, "no provider session recorded"
            await asyncio.sleep(20 * MS)
        await client.flushdb()
        deadline = time.monotonic() + 10000 * MS  # a renewal is every third of the lease
        while not (after := await recorded()):
            assert time.monotonic() < deadline, "provider sessions not recorded again"
            await asyncio.sleep(20 * MS)
        assert after == before


async def test_a_takeover_without_provider_sessions_polls_a_task_the_provider_has(
    provider: LocalProvider, redis_url: str, http: aiohttp.ClientSession
) -> None:
    """The dead replica's provider sessions are not known (it died before it could record them
    again after Redis lost them), so its task goes out again, though the dead one had sent it:
    the provider's conflictTaskUUID then says it has the task (an upstream UUID is the
    gateway's own), and it is polled until it ends, not failed with the conflict."""
    prefix = f"test-{uuid.uuid4().hex}"
    set_faults(provider, fast=True, latency={"kind": "fixed", "ms": 1500})
    body = msgspec.structs.replace(image_task("async"), model=MODEL, width=1024, height=1024)
    upstream = str(uuid.uuid4())
    sent = await connect(http, provider.url)  # the dead replica's send
    await sent.auth()
    await sent.send(
        json.loads(msgspec.json.encode(msgspec.structs.replace(body, taskUUID=upstream)))
    )
    async with running(shared_config(provider, redis_url, prefix, "a")) as a:
        record = TaskRecord(tenant="alpha", task=body, upstream_uuid=upstream, created=time.time())
        assert await a.replication.shared.create_batch([record], "d") == [True]
        await a.redis.client.zadd(f"{prefix}:replicas", {"d": 1})  # its lease long over

        def ended() -> bool:
            taken = a.registry.lookup("alpha", body.taskUUID)
            return taken is not None and taken.finished is not None

        await until(ended, within=15000 * MS)
        taken = a.registry.lookup("alpha", body.taskUUID)
        assert taken is not None
        assert (taken.state, taken.error) == (TaskState.DONE, None)
        assert len(taken.results) == body.numberResults
    await sent.ws.close()


async def test_a_replica_that_stops_cleanly_leaves_no_provider_sessions_behind(
    provider: LocalProvider, redis_url: str
) -> None:
    """Its provider sessions are recorded for a takeover; a clean stop (nothing to hand over)
    deletes them, as a takeover would (every start has a name of its own: they added up)."""
    prefix = f"test-{uuid.uuid4().hex}"
    async with running(shared_config(provider, redis_url, prefix, "a")) as a:
        client, key = a.redis.client, links_key(a.redis, a.replica)

        async def recorded() -> bool:
            return bool(await client.exists(key))

        deadline = time.monotonic() + 5000 * MS
        while not await recorded():
            assert time.monotonic() < deadline, "the provider session was not recorded"
            await asyncio.sleep(20 * MS)
        admin = aioredis.Redis.from_url(redis_url)
    try:
        assert await admin.exists(key) == 0
    finally:
        await admin.aclose()
