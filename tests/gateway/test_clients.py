"""A client connection's send path: its own framing (read back by websockets' sans-I/O frame
parser), one write per loop turn, the drain of a lagging socket and the cut past the bound."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from gateway.clients import WRITE_BUFFER_HIGH_WATER, ClientConnection, text_frame
from gateway.metrics import Metrics


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
