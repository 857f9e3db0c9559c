"""A client connection's send path: its own framing (read back by websockets' sans-I/O frame
parser), one write per loop turn, the drain of a lagging socket and the cut past the bound."""

from __future__ import annotations

import asyncio
import json
import uuid
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from gateway.app import Gateway
from gateway.clients import WRITE_BUFFER_HIGH_WATER, ClientConnection, text_frame
from gateway.metrics import Metrics
from gateway.provider.server import LocalProvider
from tests.gateway.conftest import (
    ALPHA,
    BETA,
    Client,
    Clock,
    connect,
    gateway_config,
    running,
    until,
)
from tests.timing import MS


def frames_in(data: bytes) -> list[Frame]:
    """Every frame in ``data``, read by websockets' parser; a trailing partial frame fails."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    found = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=False)
        try:
            next(parser)
        except StopIteration as done:
            found.append(done.value)
    return found


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 1 << 20])
def test_text_frames_at_every_length_boundary(length: int) -> None:
    payload = b"x" * length
    [frame] = frames_in(text_frame(payload))
    assert (frame.opcode, frame.fin, frame.data) == (Opcode.TEXT, True, payload)
    assert not (frame.rsv1 or frame.rsv2 or frame.rsv3)
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)


# --------------------------------------------------------------------------- the send path


class FakeTransport:
    def __init__(self, buffered: int = 0) -> None:
        self.writes: list[bytes] = []
        self.buffered = buffered

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


class FakeSocket:
    """What ClientConnection needs of an aiohttp WebSocketResponse, recording frames sent."""

    def __init__(self) -> None:
        self.closed = False
        self.sent: list[bytes] = []
        self.close_code: int | None = None
        self.release = asyncio.Event()

    async def send_frame(self, frame: bytes, opcode: object) -> None:
        self.sent.append(frame)
        await self.release.wait()  # TCP takes it only when the test says so

    async def close(self, *, code: int, message: bytes) -> None:
        self.closed, self.close_code = True, code


def connection_over(
    transport: FakeTransport, socket: FakeSocket, limit: int = 1 << 20
) -> tuple[ClientConnection, Metrics]:
    metrics = Metrics()
    request = SimpleNamespace(transport=transport)
    loop = asyncio.get_running_loop()

    def schedule(connection: ClientConnection) -> None:
        loop.call_soon(connection.flush)

    connection = ClientConnection(
        socket,  # type: ignore[arg-type]
        request,  # type: ignore[arg-type]
        "c1",
        limit,
        metrics,
        schedule,
    )
    return connection, metrics


async def test_frames_of_one_loop_turn_leave_in_one_write_in_order() -> None:
    transport, socket = FakeTransport(), FakeSocket()
    connection, metrics = connection_over(transport, socket)
    for i in range(5):
        assert connection.send(b'{"data":[%d]}' % i)
    assert transport.writes == []  # not before the turn ends
    await asyncio.sleep(0)
    [write] = transport.writes
    assert [f.data for f in frames_in(write)] == [b'{"data":[%d]}' % i for i in range(5)]
    assert connection.queued_bytes == 0 and metrics.frames.client_out == 5
    connection.send(b"next")
    await asyncio.sleep(0)
    assert len(transport.writes) == 2 and [f.data for f in frames_in(transport.writes[1])] == [
        b"next"
    ]


async def test_a_lagging_socket_drains_a_frame_at_a_time_and_past_the_bound_is_cut() -> None:
    transport, socket = FakeTransport(buffered=WRITE_BUFFER_HIGH_WATER), FakeSocket()
    connection, metrics = connection_over(transport, socket, limit=100)
    connection.send(b"a" * 40)
    connection.send(b"b" * 40)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert transport.writes == [] and connection.drain is not None
    assert socket.sent == [b"a" * 40]  # the drain waits for TCP to take the first
    assert connection.send(b"c" * 40)  # 120 bytes queued: past the bound of 100
    assert connection.overflowed and not connection.send(b"d")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert socket.close_code == 4008 and connection.drain is None
    assert list(connection.outbox) == [b"a" * 40, b"b" * 40, b"c" * 40]  # for the session
    assert metrics.frames.client_out == 0


async def test_once_tcp_takes_the_first_frame_the_rest_of_the_backlog_leaves_at_once() -> None:
    transport, socket = FakeTransport(buffered=WRITE_BUFFER_HIGH_WATER), FakeSocket()
    connection, metrics = connection_over(transport, socket)
    for name in (b"a", b"b", b"c"):
        connection.send(name)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert socket.sent == [b"a"] and connection.drain is not None
    transport.buffered = 0  # the client reads again
    socket.release.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert [[f.data for f in frames_in(w)] for w in transport.writes] == [[b"b", b"c"]]
    assert connection.drain is None and not connection.outbox and metrics.frames.client_out == 3


async def test_a_lagging_socket_is_cut_by_one_frame_larger_than_the_bound() -> None:
    """The bound counts every byte: one large frame to a socket that lags is no exception
    (the ping echo of 30 MB waited whole behind one already in the socket's write buffer)."""
    transport, socket = FakeTransport(buffered=WRITE_BUFFER_HIGH_WATER), FakeSocket()
    connection, metrics = connection_over(transport, socket, limit=100)
    assert not connection.outbox and connection.drain is None
    connection.send(b"b" * 200)
    assert connection.overflowed and metrics.slow_clients._value.get() == 1


async def test_a_socket_that_keeps_up_takes_a_frame_larger_than_the_bound() -> None:
    """A large getResponse answer to a client that reads: written whole, not a cut."""
    transport, socket = FakeTransport(), FakeSocket()
    connection, _ = connection_over(transport, socket, limit=100)
    assert connection.send(b"b" * 200)
    await asyncio.sleep(0)
    assert not connection.overflowed
    assert [f.data for f in frames_in(transport.writes[0])] == [b"b" * 200]


async def test_no_write_after_close() -> None:
    transport, socket = FakeTransport(), FakeSocket()
    connection, _ = connection_over(transport, socket)
    connection.send(b"before")
    connection.close_now(1009, b"too big")
    assert not connection.send(b"after")
    await asyncio.sleep(0)
    written = b"".join(transport.writes)
    assert [(f.opcode, f.data[:2]) for f in frames_in(written)] == [
        (Opcode.CLOSE, (1009).to_bytes(2, "big"))
    ]
    assert connection.take_unsent() == [b"before"]  # for the session, once
    assert connection.take_unsent() == []


# --------------------------------------------------------------------------- the door's bounds


async def closed_with(ws: aiohttp.ClientWebSocketResponse, within: float = 5000 * MS) -> int:
    """The close code the gateway sent, reading past anything else it sent first."""
    async with asyncio.timeout(within):
        while True:
            message = await ws.receive()
            if message.type == aiohttp.WSMsgType.CLOSE:
                return int(message.data)
            if message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return -1


async def test_a_ping_taskuuid_must_be_a_uuid(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    client = await connect(http, gateway.url)
    await client.send({"taskType": "ping", "taskUUID": "x" * 1000})
    [error] = (await client.recv())["errors"]
    assert (error["code"], error["parameter"], error["taskType"]) == (
        "invalidTaskUUID",
        "taskUUID",
        "ping",
    )
    assert len(error.get("taskUUID", "")) <= 64  # a bad taskUUID is not echoed at length
    token = str(uuid.uuid4())
    await client.send({"taskType": "ping", "taskUUID": token})
    assert (await client.recv())["data"] == [{"taskType": "ping", "pong": True, "taskUUID": token}]


async def test_frames_before_authentication_are_small(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    async with running(gateway_config(provider, max_unauthenticated_frame_bytes=1024)) as gateway:
        small = await connect(http, gateway.url)
        await small.send({"taskType": "ping", "ping": True, "pad": "x" * 500})
        assert (await small.recv())["data"] == [{"taskType": "ping", "pong": True}]
        big = await connect(http, gateway.url)
        await big.send({"taskType": "ping", "ping": True, "pad": "x" * 64 * 1024})
        assert await closed_with(big.ws) == 1009
        # once authenticated, frames may be as large as max_frame_bytes
        await small.auth(key=ALPHA)
        await small.send({"taskType": "ping", "ping": True, "pad": "x" * 64 * 1024})
        assert (await small.recv())["data"] == [{"taskType": "ping", "pong": True}]


async def test_empty_frames_are_no_activity(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    # an idle timeout shorter than the auth timeout is honoured (the first look once came at
    # the auth timeout)
    config = gateway_config(provider, idle_timeout=300 * MS, auth_timeout=30000 * MS)
    async with running(config) as gateway:
        client = await connect(http, gateway.url)
        await client.auth(key=ALPHA)

        async def empty_frames() -> None:
            for _ in range(100):
                await client.ws.send_str("[]")
                await asyncio.sleep(50 * MS)

        sender = asyncio.create_task(empty_frames())
        try:
            assert await closed_with(client.ws, within=4000 * MS) == 1000
        finally:
            sender.cancel()


async def test_invalid_utf8_in_a_text_frame_closes_1007(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    bad = b'[{"taskType":"ping","taskUUID":"\xff\xfe"}]'
    binary = await connect(http, gateway.url)
    await binary.ws.send_bytes(bad)  # binary frames are not text: answered, as before
    assert (await binary.recv())["errors"][0]["code"] == "invalidJSON"
    text = await connect(http, gateway.url)
    await text.ws.send_frame(bad, aiohttp.WSMsgType.TEXT)
    assert await closed_with(text.ws) == 1007


async def test_one_authentication_per_socket_makes_one_session(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    assert gateway.clients is not None
    client = await connect(http, gateway.url)
    first = await client.auth(key=ALPHA)
    await client.send(*[{"taskType": "authentication", "apiKey": ALPHA}] * 255)
    replies = [await client.recv() for _ in range(255)]
    sessions = {reply["data"][0]["connectionSessionUUID"] for reply in replies}
    assert sessions == {first} and len(gateway.clients.sessions) == 1
    # another tenant's key on an authenticated socket: refused, the socket stays who it was
    await client.send({"taskType": "authentication", "apiKey": BETA})
    [error] = (await client.recv())["errors"]
    assert (error["code"], error["taskType"]) == ("invalidApiKey", "authentication")
    assert len(gateway.clients.sessions) == 1


async def test_sessions_per_tenant_are_bounded_oldest_detached_evicted_first(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    config = gateway_config(provider, max_sessions_per_tenant=2, max_sessions=3)
    async with running(config) as gateway:
        assert gateway.clients is not None
        gone = []
        for _ in range(3):
            client = await connect(http, gateway.url)
            gone.append(await client.auth(key=ALPHA))
            await client.ws.close()
        await until(lambda: not gateway.clients.connections)
        assert set(gateway.clients.sessions) == set(gone[1:])  # the oldest went first
        for _ in range(2):
            client = await connect(http, gateway.url)
            await client.auth(key=BETA)
            await client.ws.close()
        await until(lambda: not gateway.clients.connections)
        assert len(gateway.clients.sessions) == 3
        assert gone[1] not in gateway.clients.sessions  # evicted for the total
        # a session that was evicted cannot be resumed: a fresh one instead
        client = await connect(http, gateway.url)
        assert await client.auth(key=ALPHA, session=gone[0]) != gone[0]
        async with http.get(f"http://127.0.0.1:{gateway.port}/metrics") as response:
            text = await response.text()
        assert "tenebra_client_sessions_evicted_total 3.0" in text


async def test_no_session_left_to_evict_refuses_the_authentication(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    async with running(gateway_config(provider, max_sessions_per_tenant=1)) as gateway:
        first = await connect(http, gateway.url)
        await first.auth(key=ALPHA)
        second = await connect(http, gateway.url)
        await second.send({"taskType": "authentication", "apiKey": ALPHA})
        [error] = (await second.recv())["errors"]
        assert (error["code"], error["taskType"]) == ("rateLimitExceeded", "authentication")
        await first.send({"taskType": "ping"})  # the first socket goes on
        assert (await first.recv())["data"] == [{"taskType": "ping", "pong": True}]


async def test_a_half_sent_request_line_is_closed_within_the_handshake_timeout(
    provider: LocalProvider,
) -> None:
    async with running(gateway_config(provider, handshake_timeout=300 * MS)) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            writer.write(b"GET /v1 HT")
            await writer.drain()
            async with asyncio.timeout(5000 * MS):
                assert await reader.read() == b""  # closed by the gateway
        finally:
            writer.close()


async def test_client_connections_are_bounded(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    async with running(gateway_config(provider, max_connections=1)) as gateway:
        first = await connect(http, gateway.url)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await connect(http, gateway.url)
        assert refused.value.status == 503
        await first.ws.close()
        await until(lambda: not gateway.clients.connections)
        await (await connect(http, gateway.url)).ws.close()


async def test_get_response_is_rate_limited_per_connection(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    config = gateway_config(provider, get_response_rate=0.001, get_response_burst=2)
    async with running(config) as gateway:
        client = await connect(http, gateway.url)
        await client.auth(key=ALPHA)
        polls = [str(uuid.uuid4()) for _ in range(4)]
        await client.send(*[{"taskType": "getResponse", "taskUUID": p} for p in polls])
        errors: list[dict[str, Any]] = []
        while len(errors) < 4:
            errors.extend((await client.recv())["errors"])
        assert [(e["code"], e["taskUUID"], e["taskType"]) for e in errors] == [
            ("taskNotFound", polls[0], "getResponse"),
            ("taskNotFound", polls[1], "getResponse"),
            ("rateLimitExceeded", polls[2], "getResponse"),
            ("rateLimitExceeded", polls[3], "getResponse"),
        ]
        other = await connect(http, gateway.url)  # the limit is the connection's own
        await other.auth(key=ALPHA)
        await other.send({"taskType": "getResponse", "taskUUID": polls[0]})
        assert (await other.recv())["errors"][0]["code"] == "taskNotFound"


# --------------------------------------------------------------------------- tenants and addresses


def from_address(address: str) -> aiohttp.ClientSession:
    """A client whose sockets come from ``address`` (any of 127.0.0.0/8 reaches 127.0.0.1)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=(address, 0)),
        timeout=aiohttp.ClientTimeout(total=20000 * MS),
    )


async def refused_upgrade(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> aiohttp.WSServerHandshakeError:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(url, headers=headers)
    return refused.value


def retry_after(refused: aiohttp.WSServerHandshakeError) -> str:
    assert refused.headers is not None
    return refused.headers["Retry-After"]


async def test_connections_per_tenant_are_bounded(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    config = gateway_config(provider)
    config.tenants["alpha"].max_connections = 2
    async with running(config) as gateway:
        assert gateway.intake is not None
        quotas = gateway.intake.quotas
        first, second = await connect(http, gateway.url), await connect(http, gateway.url)
        session = await first.auth(key=ALPHA)
        await second.auth(key=ALPHA)
        assert await first.auth(key=ALPHA) == session  # a repeat counts once
        third = await connect(http, gateway.url)
        await third.send({"taskType": "authentication", "apiKey": ALPHA})
        [error] = (await third.recv())["errors"]
        assert (error["code"], error["taskType"]) == ("rateLimitExceeded", "authentication")
        assert "2 connections" in error["message"]
        await third.send({"taskType": "getResponse", "taskUUID": str(uuid.uuid4())})
        assert (await third.recv())["errors"][0]["code"] == "missingApiKey"  # still nobody
        assert quotas.connections("alpha") == 2
        beta = await connect(http, gateway.url)  # other tenants are not counted against it
        await beta.auth(key=BETA)

        await first.ws.close()
        await until(lambda: quotas.connections("alpha") == 1)
        await third.auth(key=ALPHA)  # the refused socket gets in now
        fourth = await connect(http, gateway.url)
        await fourth.send({"taskType": "authentication", "apiKey": ALPHA})
        assert (await fourth.recv())["errors"][0]["code"] == "rateLimitExceeded"
        for client in (second, third, fourth, beta):
            await client.ws.close()
        await until(lambda: not gateway.clients.connections)
        assert quotas.connections("alpha") == quotas.connections("beta") == 0


async def test_unauthenticated_sockets_per_address_are_bounded(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    config = gateway_config(provider, max_unauthenticated_per_address=16)
    async with running(config) as gateway, from_address("127.0.0.2") as other:
        waiting = [await connect(http, gateway.url) for _ in range(16)]
        refused = await refused_upgrade(http, gateway.url)
        assert refused.status == 429
        await (await connect(other, gateway.url)).ws.close()  # another address is not counted
        await waiting[0].auth(key=ALPHA)  # authenticated: no longer counted
        waiting.append(await connect(http, gateway.url))
        assert (await refused_upgrade(http, gateway.url)).status == 429
        await waiting[1].ws.close()  # closed before it authenticated: no longer counted
        await until(lambda: len(gateway.clients.connections) == 16)
        waiting.append(await connect(http, gateway.url))
        assert (await refused_upgrade(http, gateway.url)).status == 429


async def test_failed_authentications_are_slowed_then_refused_per_address(
    provider: LocalProvider, http: aiohttp.ClientSession, clock: Clock
) -> None:
    """Four failures from 127.0.0.1 (at once, on four sockets: answered after 100, 200, 400 and
    800 ms) refuse that address for 60 s on the gateway's clock; 127.0.0.2 meanwhile is
    answered at once, and its own first failure waits 100 ms."""
    config = gateway_config(
        provider,
        auth_failure_delay=100 * MS,
        auth_failure_delay_max=800 * MS,
        auth_failures_before_refusal=4,
        auth_refusal=60.0,
    )
    async with running(config, clock=clock) as gateway, from_address("127.0.0.2") as other:
        loop = asyncio.get_running_loop()
        guessers = [await connect(http, gateway.url) for _ in range(4)]
        started = loop.time()

        async def answered(client: Client, key: str) -> tuple[float, dict[str, Any]]:
            await client.send({"taskType": "authentication", "apiKey": key})
            frame = await client.recv()
            return loop.time() - started, frame

        guesses = [asyncio.create_task(answered(c, "guess")) for c in guessers]
        await until(lambda: gateway.clients.throttle.refused("127.0.0.1") > 0)
        # another address: let in and answered at once while the guesses wait
        bystander = await connect(other, gateway.url)
        await bystander.auth(key=BETA)
        passed, bystander_guess = await answered(await connect(other, gateway.url), "wrong")
        assert bystander_guess["errors"][0]["code"] == "invalidApiKey"
        assert passed >= 100 * MS
        assert not all(guess.done() for guess in guesses)  # the 800 ms one still waits
        results = await asyncio.gather(*guesses)
        assert all(frame["errors"][0]["code"] == "invalidApiKey" for _, frame in results)
        times = sorted(t for t, _ in results)
        assert all(t >= d * MS for t, d in zip(times, [100, 200, 400, 800], strict=True))

        refused = await refused_upgrade(http, gateway.url)
        assert (refused.status, retry_after(refused)) == (429, "60")
        await guessers[0].send({"taskType": "authentication", "apiKey": ALPHA})
        [error] = (await guessers[0].recv())["errors"]  # a valid key is not even looked at
        assert error["code"] == "rateLimitExceeded" and "Retry in 60 s" in error["message"]
        clock.advance(30.0)
        assert retry_after(await refused_upgrade(http, gateway.url)) == "30"
        clock.advance(30.0)
        await guessers[1].auth(key=ALPHA)
        await (await connect(http, gateway.url)).auth(key=ALPHA)


async def test_one_guess_per_frame_and_the_rest_of_the_frame_waits_behind_it(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    config = gateway_config(provider, auth_failure_delay=200 * MS)
    async with running(config) as gateway:
        client = await connect(http, gateway.url)
        auth = {"taskType": "authentication", "apiKey": "guess"}
        started = asyncio.get_running_loop().time()
        await client.send(auth, {**auth, "apiKey": ALPHA}, {"taskType": "ping", "ping": True})
        first, second, third = [await client.recv() for _ in range(3)]
        assert asyncio.get_running_loop().time() - started >= 200 * MS
        assert first["errors"][0]["code"] == "invalidApiKey"
        assert second["errors"][0]["code"] == "rateLimitExceeded"  # the key was not looked at
        assert "previous authentication" in second["errors"][0]["message"]
        assert third["data"] == [{"taskType": "ping", "pong": True}]
        await client.auth(key=ALPHA)  # the next frame may try again
        # an authenticated socket answers every other key alike, valid or not
        await client.send({**auth, "apiKey": BETA}, auth)
        errors = [(await client.recv())["errors"][0] for _ in range(2)]
        assert errors[0] == errors[1] and errors[0]["code"] == "invalidApiKey"


async def test_a_resumed_backlog_keeps_flowing_after_a_drain_empties_the_queue() -> None:
    """A backlog larger than what one refill queues, on a socket that lags: when the drain has
    sent the last queued frame, the rest of the session's buffer follows (it once waited for
    good, and every new result behind it)."""
    from gateway.sessions import SessionTable

    table = SessionTable(
        session_buffer_bytes=1 << 20, max_sessions=10, max_per_tenant=10,
        buffer_bytes=1 << 22, resume_window=120, evicted=lambda: None,
    )  # fmt: skip
    session = table.open("alpha")
    assert session is not None
    backlog = [b'{"data":[%03d]}' % i for i in range(40)]
    for frame in backlog:
        session.deliver(None, frame)  # type: ignore[arg-type]  # away: kept
    transport = FakeTransport(buffered=WRITE_BUFFER_HIGH_WATER)  # TCP lags
    socket = FakeSocket()
    socket.release.set()
    connection, _ = connection_over(transport, socket, limit=200)
    connection.session = session
    session.attach(connection)
    for _ in range(200):  # bounded: the drain sends frame by frame
        await asyncio.sleep(0)
        if not session.buffer and not connection.outbox:
            break
    session.deliver(None, b"new")  # type: ignore[arg-type]
    for _ in range(20):
        await asyncio.sleep(0)
    written = [f.data for chunk in transport.writes for f in frames_in(chunk)]
    assert [*socket.sent, *written][1:] == [*backlog, b"new"]  # after the auth reply


async def test_a_frame_a_lagging_socket_is_sending_stays_its_own_when_the_session_moves() -> None:
    """A newer socket takes the session while a lagging one is handing a frame to TCP: that
    frame is this socket's (it is on its way), the rest go with the session. The frame in
    flight once went with them too, so the newer socket got it again, and the drain, finding
    its queue emptied under it, failed."""
    transport, socket = FakeTransport(buffered=WRITE_BUFFER_HIGH_WATER), FakeSocket()
    connection, _ = connection_over(transport, socket)
    for frame in (b"first", b"second", b"third"):
        connection.send(frame)
    await until(lambda: socket.sent == [b"first"])  # in flight: the drain waits for TCP
    drain = connection.drain
    assert drain is not None
    assert connection.take_unsent() == [b"second", b"third"]
    socket.release.set()
    await asyncio.wait_for(drain, 1000 * MS)  # no IndexError
    assert socket.sent == [b"first"] and not connection.outbox
    assert connection.queued_bytes == 0


async def test_a_frame_a_drain_has_not_begun_to_send_goes_with_the_session() -> None:
    """The drain is scheduled, not yet sending: every frame goes with the session (a socket
    that closes before its drain runs would lose one kept back)."""
    transport, socket = FakeTransport(buffered=WRITE_BUFFER_HIGH_WATER), FakeSocket()
    connection, _ = connection_over(transport, socket)
    for frame in (b"first", b"second"):
        connection.send(frame)
    connection.flush()
    assert connection.drain is not None and socket.sent == []
    assert connection.take_unsent() == [b"first", b"second"]
    connection.drain.cancel()


async def test_two_resumes_of_one_session_in_one_loop_turn_each_get_their_own_reply(
    gateway: Gateway,
) -> None:
    """Two sockets resume one session in one turn of the loop (their frames read together),
    so the first one's reply is still queued when the second takes the session: each socket
    gets its own reply, the newest the session's backlog after it. The first one's reply once
    moved with the session to the second, which got two replies while the first got none."""
    from gateway.clients import SocketDoor
    from protocol.frames import Authentication

    clients = gateway.clients
    assert clients is not None
    session = clients.table.open("alpha")
    assert session is not None
    clients.table.detached(session, gateway.clock())
    missed = b'{"data":["missed"]}'
    session.deliver(None, missed)  # type: ignore[arg-type]
    transports = [FakeTransport(), FakeTransport()]
    doors = [SocketDoor(connection_over(t, FakeSocket())[0], clients) for t in transports]
    auth = Authentication(apiKey=ALPHA, connectionSessionUUID=session.uuid)
    for door in doors:
        clients.authenticate(door, auth)
    await asyncio.sleep(0)  # the turn ends: each socket writes what it was given
    first, second = ([bytes(f.data) for w in t.writes for f in frames_in(w)] for t in transports)
    assert len(first) == 1 and json.loads(first[0])["data"] == [
        {"taskType": "authentication", "connectionSessionUUID": session.uuid}
    ]
    assert second == [first[0], missed]  # the newest holds the session: its backlog follows
    assert session.connection is doors[1].connection
    for _ in doors:
        clients.intake.disconnect("alpha")


async def test_a_sync_task_refused_by_a_full_queue_does_not_keep_the_socket_busy(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    """A task failed at once (its tenant's queue full) is settled, not running: it must not
    count among the socket's tasks in flight, which keep the idle timeout away for good."""
    from tests.gateway.conftest import set_faults, task

    set_faults(provider, fast=True, latency={"kind": "fixed", "ms": 60000 * MS * 1000})
    config = gateway_config(provider)
    config.tenants["alpha"].max_in_flight = 1
    config.tenants["alpha"].max_queued = 1
    async with running(config) as gateway:
        client = await connect(http, gateway.url)
        await client.auth(key=ALPHA)
        await client.send(task(), task(), task())  # out, waiting, refused
        [error] = (await client.recv())["errors"]
        assert error["code"] == "rateLimitExceeded"
        [connection] = gateway.clients.connections
        assert len(connection.session.open_tasks) == 2


async def test_behind_a_trusted_proxy_failures_count_for_the_forwarded_address(
    provider: LocalProvider, http: aiohttp.ClientSession
) -> None:
    """The balancer (127.0.0.1, trusted) names its clients: one that keeps guessing is refused,
    and the balancer's other clients are not."""
    config = gateway_config(
        provider,
        auth_failure_delay=10 * MS,
        auth_failures_before_refusal=2,
        trusted_proxies=["127.0.0.0/8"],
    )
    async with running(config) as gateway:
        guesser = {"X-Forwarded-For": "203.0.113.7"}
        for _ in range(2):
            client = Client(await http.ws_connect(gateway.url, headers=guesser))
            await client.send({"taskType": "authentication", "apiKey": "guess"})
            assert (await client.recv())["errors"][0]["code"] == "invalidApiKey"
        assert gateway.clients.throttle.refused("203.0.113.7") > 0
        assert gateway.clients.throttle.refused("127.0.0.1") == 0
        refused = await refused_upgrade(http, gateway.url, headers=guesser)
        assert refused.status == 429
        other = Client(
            await http.ws_connect(gateway.url, headers={"X-Forwarded-For": "198.51.100.1"})
        )
        await other.auth(key=ALPHA)
        headers = {"Authorization": "Bearer guess", **guesser}
        async with http.post(f"http://127.0.0.1:{gateway.port}/v1", json=[], headers=headers) as r:
            assert r.status == 429  # the REST door counts the same address


async def test_a_cancelled_wait_for_queued_frames_leaves_the_next_waiter_its_answer() -> None:
    """The reader cancelled while it waits for its frames' claims (a stop): the socket's clean
    up still waits for them, and hears once the last is dispatched."""
    connection, _ = connection_over(FakeTransport(), FakeSocket())
    connection.claiming = 2
    first = asyncio.ensure_future(connection.claims_settled())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    cleanup = asyncio.ensure_future(connection.claims_settled())
    await asyncio.sleep(0)
    connection.claimed()
    assert not cleanup.done()
    connection.claimed()
    await asyncio.wait_for(cleanup, 1000 * MS)
