"""Faults on purpose: the provider drops, stalls, forgets and refuses; clients vanish, stall and
come back; the gateway is stopped under load. Nothing is lost, nothing is delivered twice, and
no task the provider accepted is sent to it again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from gateway.app import Gateway
from gateway.provider.server import LocalProvider, ProviderConfig
from gateway.upstream import LinkState
from tests.gateway.conftest import (
    ALPHA,
    KEY,
    Client,
    connect,
    resilient_config,
    running,
    set_faults,
    task,
    until,
)
from tests.timing import MS


@pytest.fixture
async def gateway(provider: LocalProvider) -> AsyncIterator[Gateway]:
    async with running(resilient_config(provider)) as instance:
        yield instance


async def collect(client: Client, expected: dict[str, int], within: float) -> Counter[str]:
    """Every image of the expected tasks; fails on an error or on an image seen twice."""
    seen: Counter[str] = Counter()
    images: set[str] = set()
    deadline = time.monotonic() + within
    while sum(seen.values()) < sum(expected.values()):
        frame = await client.recv(within=max(0.0, deadline - time.monotonic()))
        assert "errors" not in frame, frame
        for item in frame["data"]:
            assert item["imageUUID"] not in images, "an image delivered twice"
            images.add(item["imageUUID"])
            seen[item["taskUUID"]] += 1
    return seen


# --------------------------------------------------------------------------- the provider link


async def test_random_drops_during_a_1000_task_run(
    gateway: Gateway, provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True, latency={"kind": "uniform", "ms": 0, "high_ms": 30})
    rng = random.Random(5)
    clients = [await connect(http, gateway.url) for _ in range(20)]
    for client in clients:
        await client.auth(key=ALPHA)
    set_faults(provider, drop_probability=0.005)
    plans: list[dict[str, int]] = []
    for client in clients:
        tasks = [task(numberResults=rng.randint(1, 4)) for _ in range(50)]
        plans.append({t["taskUUID"]: t["numberResults"] for t in tasks})
        for start in range(0, 50, 10):  # a few frames per client, spread over the run
            await client.ws.send_str(json.dumps(tasks[start : start + 10]))
            await asyncio.sleep(rng.uniform(0, 20) * MS)
    results = await asyncio.gather(
        *(collect(c, plan, 60000 * MS) for c, plan in zip(clients, plans, strict=True))
    )
    for seen, plan in zip(results, plans, strict=True):
        assert dict(seen) == plan  # every task complete, every image exactly once
    assert provider.stats.dropped_connections > 5  # the faults did happen...
    # ...and no task was accepted twice: a resend the provider refused as a conflict is the
    # proof that it already had the task, and costs nothing
    assert provider.stats.submissions == 1000


async def test_a_stalled_provider_is_detected_and_recovered(
    gateway: Gateway, provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True)
    assert gateway.pool is not None
    link = gateway.pool.links[0]
    client = await connect(http, gateway.url)
    await client.auth(key=ALPHA)
    set_faults(provider, stall=True)
    stalled_at = time.monotonic()
    sent = [task(numberResults=2) for _ in range(3)]
    await client.send(*sent)
    await until(lambda: link.state != LinkState.READY)
    # ping interval + pong deadline, with room for a slow machine
    assert time.monotonic() - stalled_at < 2000 * MS
    set_faults(provider, stall=False)
    seen = await collect(client, {t["taskUUID"]: 2 for t in sent}, 20000 * MS)
    assert all(count == 2 for count in seen.values())
    assert provider.stats.submissions == 3


async def test_a_provider_that_stops_reading_is_left_within_the_send_deadline(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True)
    config = resilient_config(provider)
    config.provider.ping_interval = 60.0  # only the send deadline can notice
    config.provider.send_timeout = 300 * MS
    config.provider.max_in_flight = 100_000  # enough out at once to fill the kernel's buffers
    async with running(config) as gateway:
        link = gateway.pool.links[0]
        client = await connect(http, gateway.url)
        await client.auth(key=ALPHA)
        set_faults(provider, deaf=True)
        prompt = "chiaroscuro " * 240  # ~3 KB a task: the kernel's buffers fill in megabytes
        sent = 0
        for _ in range(40):  # at most ~30 MB, and it stops as soon as the link gives up
            await client.send(*(task(positivePrompt=prompt) for _ in range(256)))
            sent += 256
            await asyncio.sleep(50 * MS)
            if link.connects > 1 or link.state != LinkState.READY:
                break
        await until(lambda: link.state != LinkState.READY or link.connects > 1, 5000 * MS)
        set_faults(provider, deaf=False)
        await until(lambda: link.state == LinkState.READY, 10000 * MS)
        assert sent < 40 * 256


async def test_a_provider_that_forgets_everything_fails_tasks_clearly(
    gateway: Gateway, provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True, latency={"kind": "fixed", "ms": 500 * MS * 1000})
    client = await connect(http, gateway.url)
    await client.auth(key=ALPHA)
    sent = [task() for _ in range(4)]
    await client.send(*sent)
    await until(lambda: provider.stats.submissions == 4)
    provider.forget()  # as after a restart
    errors = []
    for _ in sent:
        frame = await client.recv(within=10000 * MS)
        errors.extend(frame["errors"])
    assert sorted(e["taskUUID"] for e in errors) == sorted(t["taskUUID"] for t in sent)
    assert {e["code"] for e in errors} == {"providerError"}
    assert "not submitted again" in errors[0]["message"]
    assert provider.stats.submissions == 4  # nothing re-sent to a provider that may have billed


async def test_tasks_wait_through_an_outage_and_go_out_once(
    render_pool: Any, http: aiohttp.ClientSession
) -> None:
    provider = LocalProvider(ProviderConfig(keys=frozenset({KEY})), pool=render_pool)
    await provider.start()
    set_faults(provider, fast=True)
    gateway = Gateway(resilient_config(provider))
    await gateway.start()
    try:
        assert gateway.pool is not None
        async with asyncio.timeout(10000 * MS):
            await gateway.pool.wait_ready()
        client = await connect(http, gateway.url)
        await client.auth(key=ALPHA)
        port = provider.port
        await provider.stop()  # the provider goes away entirely
        await until(lambda: not gateway.pool.ready)
        sent = [task() for _ in range(5)]
        await client.send(*sent)
        await asyncio.sleep(300 * MS)
        assert len(gateway.pool.queue) == 5
        provider = LocalProvider(ProviderConfig(keys=frozenset({KEY})), pool=render_pool)
        set_faults(provider, fast=True)
        await provider.start(port=port)
        seen = await collect(client, {t["taskUUID"]: 1 for t in sent}, 20000 * MS)
        assert len(seen) == 5 and provider.stats.submissions == 5
    finally:
        await gateway.stop()
        await provider.stop()


async def test_past_the_outage_deadline_tasks_fail_clearly(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    config = resilient_config(provider)
    config.provider.outage_deadline = 300 * MS
    async with running(config) as gateway:
        client = await connect(http, gateway.url)
        await client.auth(key=ALPHA)
        await provider.stop()
        await until(lambda: not gateway.pool.ready)
        sent = task()
        started = time.monotonic()
        await client.send(sent)
        [error] = (await client.recv(within=5000 * MS))["errors"]
        assert (error["code"], error["taskUUID"]) == ("serviceUnavailable", sent["taskUUID"])
        assert time.monotonic() - started >= 300 * MS


async def test_a_refused_key_is_not_ready_fails_fast_and_recovers(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True, refuse_auth=True)
    gateway = Gateway(resilient_config(provider))
    await gateway.start()
    try:
        ready = f"http://127.0.0.1:{gateway.port}/readyz"
        assert gateway.pool is not None
        await until(lambda: gateway.pool.refused)
        async with http.get(ready) as response:
            assert response.status == 503
        client = await connect(http, gateway.url)
        await client.auth(key=ALPHA)
        sent = task()
        await client.send(sent)
        [error] = (await client.recv(within=5000 * MS))["errors"]
        assert error["code"] == "serviceUnavailable" and "refuses" in error["message"]
        set_faults(provider, refuse_auth=False)
        async with asyncio.timeout(10000 * MS):
            await gateway.pool.wait_ready()
        async with http.get(ready) as response:
            assert response.status == 200
        await client.send(task())
        assert "data" in await client.recv(within=5000 * MS)
    finally:
        await gateway.stop()


# --------------------------------------------------------------------------- clients


async def test_a_client_back_within_the_window_gets_everything_once_in_order(
    gateway: Gateway, provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True, latency={"kind": "fixed", "ms": 200 * MS * 1000})
    client = await connect(http, gateway.url)
    session = await client.auth(key=ALPHA)
    sent = [task(numberResults=2) for _ in range(5)]
    await client.send(*sent)
    await client.ws.close()  # killed mid-task
    await until(lambda: gateway.store.open_count == 0)
    back = await connect(http, gateway.url)
    assert await back.auth(key=ALPHA, session=session) == session
    seen = await collect(back, {t["taskUUID"]: 2 for t in sent}, 5000 * MS)
    assert all(count == 2 for count in seen.values())
    with pytest.raises(asyncio.TimeoutError):
        await back.recv(within=200 * MS)


async def test_a_client_back_after_expiry_gets_a_fresh_session_and_polls(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True)
    gateway = Gateway(resilient_config(provider, resume_window=100 * MS))
    await gateway.start()
    try:
        client = await connect(http, gateway.url)
        session = await client.auth(key=ALPHA)
        sent = task(numberResults=3)
        await client.send(sent)
        await client.ws.close()
        await until(lambda: gateway.store.open_count == 0)
        await asyncio.sleep(200 * MS)
        back = await connect(http, gateway.url)
        assert await back.auth(key=ALPHA, session=session) != session
        with pytest.raises(asyncio.TimeoutError):
            await back.recv(within=200 * MS)  # nothing replayed into a fresh session
        await back.send({"taskType": "getResponse", "taskUUID": sent["taskUUID"]})
        items = (await back.recv())["data"]
        assert [i["status"] for i in items] == ["success"] * 3
    finally:
        await gateway.stop()


async def stalled_client(
    port: int, frames: list[list[dict[str, Any]]]
) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter, ClientProtocol]:
    """A client that authenticates, sends ``frames``, and then never reads again: websockets'
    sans-I/O protocol over a socket with a tiny receive buffer, its reading paused."""
    protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/v1"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    protocol.send_request(protocol.connect())
    writer.write(b"".join(protocol.data_to_send()))
    while protocol.state is not State.OPEN:
        protocol.receive_data(await asyncio.wait_for(reader.read(65536), 5000 * MS))
        protocol.events_received()
    protocol.send_text(json.dumps([{"taskType": "authentication", "apiKey": ALPHA}]).encode())
    writer.write(b"".join(protocol.data_to_send()))
    session = None
    while session is None:
        protocol.receive_data(await asyncio.wait_for(reader.read(65536), 5000 * MS))
        for event in protocol.events_received():
            if isinstance(event, Frame) and event.opcode == Opcode.TEXT:
                session = json.loads(bytes(event.data))["data"][0]["connectionSessionUUID"]
    for frame in frames:
        protocol.send_text(json.dumps(frame).encode())
    writer.write(b"".join(protocol.data_to_send()))
    writer.transport.pause_reading()  # type: ignore[attr-defined]
    return session, reader, writer, protocol


async def test_a_client_that_stops_reading_is_cut_and_keeps_its_results(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True)
    config = resilient_config(provider, send_buffer_bytes=32 * 1024, get_response_burst=8000)
    async with running(config) as gateway:
        # the gateway's kernel send buffer (256 KiB, doubled by Linux) fills first: only past
        # it does a client that does not read push back on the gateway (8,000 results ~ 2 MB)
        flood = [[task() for _ in range(250)] for _ in range(32)]
        session, reader, writer, protocol = await stalled_client(gateway.port, flood)

        async def keep_talking() -> None:  # it still sends: only its reading stopped
            for _ in range(400):
                protocol.send_text(b'[{"taskType":"ping"}]')
                writer.write(b"".join(protocol.data_to_send()))
                await asyncio.sleep(50 * MS)

        talking = asyncio.create_task(keep_talking())
        others = [await connect(http, gateway.url) for _ in range(5)]
        plans = []
        for other in others:
            await other.auth(key=ALPHA)
            mine = [task() for _ in range(20)]
            plans.append({t["taskUUID"]: 1 for t in mine})
            await other.send(*mine)
        results = await asyncio.gather(
            *(collect(o, p, 20000 * MS) for o, p in zip(others, plans, strict=True))
        )
        assert all(dict(r) == p for r, p in zip(results, plans, strict=True))
        await until(lambda: gateway.metrics.slow_clients._value.get() >= 1, 60000 * MS)
        # cut: the close frame gets a second, then the socket is aborted, even though the client
        # still talks (aiohttp's close alone would wait for its close reply for as long)
        writer.transport.resume_reading()  # type: ignore[attr-defined]
        async with asyncio.timeout(5000 * MS):
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass
        talking.cancel()
        await until(lambda: gateway.store.open_count == 0, 60000 * MS)
        writer.close()
        # What the gateway had handed to TCP is lost with the socket the client never read
        # (the protocol has no acks); everything it had not is in the session, and comes back
        # once, in order, on a fresh socket. getResponse has every task, whichever way it went.
        waiting = list(gateway.clients.sessions[session].buffer)
        assert waiting
        back = await connect(http, gateway.url)
        assert await back.auth(key=ALPHA, session=session) == session
        replayed = [await back.recv(within=10000 * MS) for _ in waiting]
        assert [msgspec.json.encode(f) for f in replayed] == [
            msgspec.json.encode(msgspec.json.decode(f)) for f in waiting
        ]
        with pytest.raises(asyncio.TimeoutError):
            await back.recv(within=200 * MS)
        for frame in flood:
            await back.send(
                *({"taskType": "getResponse", "taskUUID": t["taskUUID"]} for t in frame)
            )
            for sent in frame:  # each getResponse answer is a frame of its own
                items = (await back.recv(within=10000 * MS))["data"]
                assert [(i["taskUUID"], i["status"]) for i in items] == [
                    (sent["taskUUID"], "success")
                ]


async def test_limits_auth_timeout_frame_size_tasks_per_frame(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    gateway = Gateway(
        resilient_config(
            provider, auth_timeout=200 * MS, max_frame_bytes=64 * 1024, max_tasks_per_frame=3
        )
    )
    await gateway.start()
    try:
        silent = await connect(http, gateway.url)
        message = await silent.ws.receive(timeout=5000 * MS)
        assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 4001)
        client = await connect(http, gateway.url)
        await client.auth(key=ALPHA)
        await client.send(*[{"taskType": "ping"}] * 4)
        [error] = (await client.recv())["errors"]
        assert error["code"] == "tooManyTasks"
        await client.ws.send_str("[" + " " * 70 * 1024 + "]")
        message = await client.ws.receive(timeout=5000 * MS)
        assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 1009)
    finally:
        await gateway.stop()


async def test_idle_sockets_close_but_never_while_their_tasks_run(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True, latency={"kind": "fixed", "ms": 900 * MS * 1000})
    config = resilient_config(provider, auth_timeout=300 * MS, idle_timeout=300 * MS)
    async with running(config) as gateway:
        chatty = await connect(http, gateway.url)  # pings do not stand in for authentication
        await chatty.send({"taskType": "ping"})
        assert (await chatty.recv())["data"][0]["pong"] is True
        message = await chatty.ws.receive(timeout=5000 * MS)
        assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 4001)
        client = await connect(http, gateway.url)
        await client.auth(key=ALPHA)
        started = asyncio.get_running_loop().time()
        mine = task()
        await client.send(mine)
        [image] = (await client.recv(within=5000 * MS))["data"]
        assert image["taskUUID"] == mine["taskUUID"]  # three idle periods passed meanwhile
        message = await client.ws.receive(timeout=5000 * MS)
        assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 1000)
        assert asyncio.get_running_loop().time() - started >= 900 * MS


# --------------------------------------------------------------------------- shutdown


async def test_shutdown_under_load_loses_nothing_and_says_1012(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    set_faults(provider, fast=True, latency={"kind": "uniform", "ms": 50, "high_ms": 300})
    gateway = Gateway(resilient_config(provider, drain_deadline=5.0))
    await gateway.start()
    assert gateway.pool is not None
    async with asyncio.timeout(10000 * MS):
        await gateway.pool.wait_ready()
    clients = [await connect(http, gateway.url) for _ in range(10)]
    plans = []
    for client in clients:
        await client.auth(key=ALPHA)
        mine = [task(numberResults=2) for _ in range(10)]
        plans.append({t["taskUUID"]: 2 for t in mine})
        await client.send(*mine)
    await asyncio.sleep(20 * MS)
    stopping = asyncio.create_task(gateway.stop())
    results = await asyncio.gather(
        *(collect(c, p, 10000 * MS) for c, p in zip(clients, plans, strict=True))
    )
    assert all(dict(r) == p for r, p in zip(results, plans, strict=True))
    await stopping
    for client in clients:
        message = await client.ws.receive(timeout=5000 * MS)
        assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 1012)


async def test_tasks_open_at_the_drain_deadline_each_get_an_error_before_1012(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    """Past the drain deadline every open task gets serviceUnavailable on its socket, then the
    socket gets 1012: every task has an outcome, none is left silent."""
    set_faults(provider, fast=True, latency={"kind": "fixed", "ms": 60000 * MS * 1000})
    gateway = Gateway(resilient_config(provider, drain_deadline=300 * MS))
    await gateway.start()
    assert gateway.pool is not None
    async with asyncio.timeout(10000 * MS):
        await gateway.pool.wait_ready()
    clients = [await connect(http, gateway.url) for _ in range(6)]
    sent: list[set[str]] = []
    for client in clients:
        await client.auth(key=ALPHA)
        tasks = [task(numberResults=2) for _ in range(10)]
        sent.append({t["taskUUID"] for t in tasks})
        await client.send(*tasks)
    await until(lambda: provider.stats.submissions == 60)
    stopping = asyncio.create_task(gateway.stop())
    for client, uuids in zip(clients, sent, strict=True):
        outcomes: dict[str, str] = {}
        while True:
            message = await client.ws.receive(timeout=5000 * MS)
            if message.type != aiohttp.WSMsgType.TEXT:
                assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 1012)
                break
            for error in json.loads(message.data).get("errors", []):
                outcomes[error["taskUUID"]] = error["code"]
        assert outcomes == dict.fromkeys(uuids, "serviceUnavailable")
    await stopping
    assert gateway.store.open_count == 0


async def _provider_process(port: int) -> asyncio.subprocess.Process:
    """A standalone `tenebra provider`, ready when it says it listens."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "provider", "--port", str(port), "--key", KEY,
        "--fast", "--latency-kind", "uniform", "--latency-ms", "100", "--latency-high-ms", "600",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 20000 * MS)
    assert b"listening" in line, line
    return process


@pytest.mark.parametrize("on_lost", ["resubmit", "fail"])
async def test_a_provider_sigkilled_twice_under_300_tasks(
    http: aiohttp.ClientSession, on_lost: str
) -> None:
    """provider.on_lost = "resubmit": what a killed provider lost with its session is sent
    again once, and at least 99% of tasks complete, each image once. With "fail" (the
    default) those tasks fail clearly instead, and none is sent twice."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = await _provider_process(port)
    config = resilient_config(LocalProvider(ProviderConfig(keys=frozenset({KEY}))))
    config.provider.url = f"ws://127.0.0.1:{port}/v1"
    config.provider.on_lost = on_lost  # type: ignore[assignment,unused-ignore]
    config.provider.outage_deadline = 20.0
    try:
        async with running(config) as gateway:
            clients = [await connect(http, gateway.url) for _ in range(10)]
            plans = []
            for client in clients:
                await client.auth(key=ALPHA)
                mine = [task() for _ in range(30)]
                plans.append({t["taskUUID"] for t in mine})
                await client.send(*mine)
            for _ in range(2):
                await asyncio.sleep(250 * MS)
                process.kill()  # SIGKILL: the provider forgets every session and task
                await process.wait()
                process = await _provider_process(port)
            done: Counter[str] = Counter()
            failed: Counter[str] = Counter()
            images: set[str] = set()

            async def read(client: Client, expected: int) -> None:
                while (
                    sum(done[u] for u in plan_of[client]) + len(plan_of[client] & set(failed))
                    < expected
                ):
                    frame = await client.recv(within=30000 * MS)
                    for item in frame.get("data", []):
                        assert item["imageUUID"] not in images, "an image delivered twice"
                        images.add(item["imageUUID"])
                        done[item["taskUUID"]] += 1
                    for error in frame.get("errors", []):
                        failed[error["taskUUID"]] += 1

            plan_of = dict(zip(clients, plans, strict=True))
            await asyncio.gather(*(read(c, 30) for c in clients))
            assert all(count == 1 for count in done.values())
            assert not set(done) & set(failed)
            if on_lost == "resubmit":
                assert len(done) >= 297, (len(done), len(failed))
            else:
                assert len(failed) > 0 and len(done) + len(failed) == 300
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
