"""Client WebSocket sessions: authentication, ping, tasks, getResponse, resume, backpressure.

A :class:`ClientConnection` is one socket with a bounded send queue, flushed once per turn of
the event loop. A :class:`ClientSession` is what a ``connectionSessionUUID`` names: it outlives
its socket by the resume window, and what its socket could not take waits in its bounded buffer.

Close codes (documented in the README):
  1000  idle for ``idle_timeout`` with no task in flight
  1009  an inbound frame larger than ``max_frame_bytes``
  1012  the gateway is shutting down: reconnect (elsewhere)
  4001  no authentication within ``auth_timeout``
  4008  the client does not read: its send queue passed ``send_buffer_bytes``
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from gateway.config import ServerSettings
from gateway.intake import Intake
from gateway.metrics import Metrics
from gateway.store.base import TaskRecord
from protocol.codec import encode_answer, encode_data, encode_errors
from protocol.errors import error_item
from protocol.frames import (
    Authentication,
    AuthenticationResult,
    ErrorItem,
    GetResponse,
    ImageTask,
    Ping,
    Pong,
)

__all__ = [
    "CLOSE_AUTH_TIMEOUT",
    "CLOSE_SLOW_CONSUMER",
    "ClientConnection",
    "ClientGateway",
    "text_frame",
]

log = structlog.get_logger("tenebra.clients")

CLOSE_AUTH_TIMEOUT = 4001
CLOSE_SLOW_CONSUMER = 4008


# What a socket's user-space write buffer may hold (beyond the kernel's) before its frames wait
# in the outbox for a drain.
WRITE_BUFFER_HIGH_WATER = 64 * 1024
_HEADER_SHORT = struct.Struct("!BB").pack
_HEADER_MEDIUM = struct.Struct("!BBH").pack
_HEADER_LONG = struct.Struct("!BBQ").pack


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented, uncompressed text frame (RFC 6455 5.2), as a server sends.

    Written here because aiohttp only offers an awaitable send: 0.3 us against 2.2 us for
    websockets' general-purpose Frame.serialize. Client sockets never negotiate extensions
    (``compress=False``), so this is the whole of the framing."""
    length = len(payload)
    if length < 126:
        return _HEADER_SHORT(0x81, length) + payload
    if length < 65536:
        return _HEADER_MEDIUM(0x81, 126, length) + payload
    return _HEADER_LONG(0x81, 127, length) + payload


class ClientConnection:
    """One client socket: frames queue here, bounded in bytes, and go out once per loop turn.

    Frames sent during one turn of the event loop leave together in one write (the socket's
    results of a whole provider frame, a task's four images): a system call per frame was a
    fifth of the gateway's CPU. While the socket lags (the kernel's buffer and a high-water
    mark of user space full), a drain task waits for TCP under aiohttp's flow control and
    writes what has queued meanwhile; past ``limit`` bytes queued, the client is cut (4008)."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        request: web.Request,
        conn_id: str,
        limit: int,
        metrics: Metrics,
        schedule: Callable[[ClientConnection], None],
    ) -> None:
        self.ws = ws
        self.request = request
        self.id = conn_id
        self.limit = limit
        self.metrics = metrics
        self._schedule = schedule
        self.outbox: deque[bytes] = deque()
        self.queued_bytes = 0
        self.session: ClientSession | None = None
        self.overflowed = False
        self.last_frame = asyncio.get_running_loop().time()
        self._flush_due = False
        self.drain: asyncio.Task[None] | None = None  # only while the socket lags
        self._cutting: asyncio.Task[None] | None = None

    def send(self, frame: bytes) -> bool:
        """Queue a frame; False once the connection is past its bound (the frame is not kept)."""
        if self.overflowed or self.ws.closed:
            return False
        self.outbox.append(frame)
        self.queued_bytes += len(frame)
        # a backlog past the bound, not one big frame (a large getResponse), marks a slow client
        if self.queued_bytes > self.limit and len(self.outbox) > 1:
            self.overflowed = True
            self.metrics.slow_clients.inc()
            self._cutting = asyncio.get_running_loop().create_task(self._cut())
        elif self.drain is None and not self._flush_due:
            self._flush_due = True
            self._schedule(self)
        return True

    def flush(self) -> None:
        """Write everything queued in one go, or start draining if the socket lags."""
        self._flush_due = False
        if self.drain is not None or self.overflowed or not self.outbox:
            return
        transport = self.request.transport
        if transport is None or transport.is_closing():
            return  # the handler's detach gives what is queued back to the session
        if transport.get_write_buffer_size() >= WRITE_BUFFER_HIGH_WATER:
            self.drain = asyncio.get_running_loop().create_task(self._drain())
            return
        self._write_queued(transport)

    def _write_queued(self, transport: asyncio.Transport) -> None:
        transport.write(b"".join([text_frame(frame) for frame in self.outbox]))
        self.metrics.frames.client_out += len(self.outbox)
        self.outbox.clear()
        self.queued_bytes = 0
        if self.session is not None:
            self.session.refill(self)

    async def _drain(self) -> None:
        """One frame through aiohttp, which waits until TCP has taken the backlog (the socket
        is made with ``writer_limit=1``: every aiohttp send checks), then the rest at once."""
        try:
            while self.outbox and not self.overflowed:
                frame = self.outbox[0]
                await self.ws.send_frame(frame, WSMsgType.TEXT)
                self.outbox.popleft()
                self.queued_bytes -= len(frame)
                self.metrics.frames.client_out += 1
                transport = self.request.transport
                if transport is None or transport.is_closing():
                    return
                if self.outbox and transport.get_write_buffer_size() < WRITE_BUFFER_HIGH_WATER:
                    self._write_queued(transport)
        finally:
            self.drain = None

    async def _cut(self) -> None:
        """Disconnect a client that does not read: its drain may be stuck, so it is cancelled;
        the close frame gets a second to go out, then the socket is aborted. What it did not
        take goes back to its session when the handler detaches it.

        Not ``wait_for(ws.close(), 1)``: after its timeout it waits for the cancelled close to
        end, and aiohttp's close on a client that still sends but never reads was seen not to
        end at all (19 s later, in the bench's stall scenario)."""
        if self.drain is not None:
            self.drain.cancel()
        closing = asyncio.ensure_future(
            self.ws.close(code=CLOSE_SLOW_CONSUMER, message=b"send buffer overflow")
        )
        closing.add_done_callback(_consume_outcome)  # a socket this stuck fails in many ways
        try:
            await asyncio.wait({closing}, timeout=1.0)
        finally:
            if self.request.transport is not None:
                self.request.transport.abort()


def _consume_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("slow client close failed", error=repr(task.exception()))


class IdleWatchdog:
    """Closes a socket that never authenticates (4001, counted from the upgrade) or that sends
    nothing for ``idle_timeout`` with no task running (1000).

    One timer per socket that the read loop never touches: a frame only stamps
    ``last_frame``, and the timer, when it fires, re-arms itself at the stamp plus the timeout.
    A receive timeout re-armed per frame cost 9% of the gateway's CPU under load."""

    def __init__(self, connection: ClientConnection, settings: ServerSettings) -> None:
        self._connection = connection
        self._settings = settings
        self._loop = asyncio.get_running_loop()
        self._closing: asyncio.Task[Any] | None = None
        self._timer = self._loop.call_at(self._loop.time() + settings.auth_timeout, self._fire)

    def cancel(self) -> None:
        self._timer.cancel()

    def _fire(self) -> None:
        connection, now = self._connection, self._loop.time()
        session = connection.session
        if session is None:
            self._close(CLOSE_AUTH_TIMEOUT, b"authentication timeout")
            return
        due = connection.last_frame + self._settings.idle_timeout
        if due <= now:
            if not session.open_tasks:
                self._close(WSCloseCode.OK, b"idle")
                return
            due = now + self._settings.idle_timeout  # never idle-close while its tasks run
        self._timer = self._loop.call_at(due, self._fire)

    def _close(self, code: int, message: bytes) -> None:
        self._closing = self._loop.create_task(
            self._connection.ws.close(code=code, message=message)
        )


class ClientSession:
    """A ``connectionSessionUUID`` of one tenant: the subscriber of its sync tasks."""

    def __init__(self, session_uuid: str, tenant: str, limit: int) -> None:
        self.uuid = session_uuid
        self.tenant = tenant
        self.limit = limit
        self.connection: ClientConnection | None = None
        self.detached_at: float | None = None
        self.buffer: deque[bytes] = deque()
        self.buffered_bytes = 0
        self.open_tasks: set[str] = set()

    def deliver(self, record: TaskRecord, frame: bytes) -> None:
        # behind a backlog still being replayed, a new frame waits its turn: order is kept
        if self.buffer or self.connection is None or not self.connection.send(frame):
            self._keep(frame)

    def settled(self, record: TaskRecord) -> None:
        self.open_tasks.discard(record.upstream_uuid)

    def _keep(self, frame: bytes) -> None:
        self.buffer.append(frame)
        self.buffered_bytes += len(frame)
        self._trim()

    def _trim(self) -> None:
        while self.buffered_bytes > self.limit and self.buffer:
            # the oldest frame is lost to the socket, not to the client: getResponse has it
            self.buffered_bytes -= len(self.buffer.popleft())

    def detach(self, connection: ClientConnection, now: float) -> None:
        if self.connection is not connection:
            return
        self.connection = None
        self.detached_at = now
        unsent = list(connection.outbox)
        connection.outbox.clear()
        for frame in reversed(unsent):
            self.buffer.appendleft(frame)
            self.buffered_bytes += len(frame)
        self._trim()

    def attach(self, connection: ClientConnection) -> None:
        """The auth reply goes first, then every missed frame in order, exactly once."""
        connection.send(encode_data([AuthenticationResult(connectionSessionUUID=self.uuid)]))
        self.connection = connection
        self.detached_at = None
        self.refill(connection)

    def refill(self, connection: ClientConnection) -> None:
        """Replay the backlog as the socket takes it: half its bound at a time, so that a long
        absence never looks like a client that does not read."""
        if connection is not self.connection:
            return
        room = connection.limit // 2
        while self.buffer and connection.queued_bytes < room:
            frame = self.buffer.popleft()
            self.buffered_bytes -= len(frame)
            connection.send(frame)


class ClientGateway:
    """The client-facing WebSocket endpoint (``/v1`` and ``/``)."""

    def __init__(
        self,
        settings: ServerSettings,
        intake: Intake,
        metrics: Metrics,
        *,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.intake = intake
        self.metrics = metrics
        self._clock = clock
        self.sessions: dict[str, ClientSession] = {}
        self.connections: set[ClientConnection] = set()
        self._due: list[ClientConnection] = []  # connections with frames to flush
        self._ids = itertools.count(1)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not self.intake.accepting:
            raise web.HTTPServiceUnavailable(text="shutting down")
        ws = web.WebSocketResponse(
            max_msg_size=self.settings.max_frame_bytes,
            compress=False,  # measured: deflate costs 40% of throughput and 3x memory per socket
            decode_text=False,
            writer_limit=1,  # aiohttp's own sends (the drain's) wait whenever TCP lags
        )
        await ws.prepare(request)
        self._bound_kernel_buffer(request)
        connection = ClientConnection(
            ws,
            request,
            f"c{next(self._ids)}",
            self.settings.send_buffer_bytes,
            self.metrics,
            self._schedule_flush,
        )
        self.connections.add(connection)
        self.metrics.client_connections.inc()
        watchdog = IdleWatchdog(connection, self.settings)
        try:
            with structlog.contextvars.bound_contextvars(conn=connection.id):
                await self._read(connection)
        finally:
            watchdog.cancel()
            self.connections.discard(connection)
            self.metrics.client_connections.dec()
            drain = connection.drain
            if drain is not None:
                drain.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await drain
            if connection.session is not None:
                connection.session.detach(connection, self._clock())
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 1.0)
        return ws

    def _bound_kernel_buffer(self, request: web.Request) -> None:
        """Left to autotuning, the kernel holds up to 4 MiB per socket for a client that does
        not read before a byte of it waits in the gateway: memory outside every bound, and a
        cut (4008) that comes megabytes late. Fixed, autotuning is off for that socket."""
        size = self.settings.socket_send_buffer_bytes
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if size and sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def _schedule_flush(self, connection: ClientConnection) -> None:
        """Flush ``connection`` at the end of this turn of the loop, with every other one."""
        if not self._due:
            asyncio.get_running_loop().call_soon(self._flush)
        self._due.append(connection)

    def _flush(self) -> None:
        due, self._due = self._due, []
        for connection in due:
            connection.flush()

    async def _read(self, connection: ClientConnection) -> None:
        ws = connection.ws
        loop = asyncio.get_running_loop()
        while not connection.overflowed:
            message = await ws.receive()
            if connection.overflowed:
                return
            if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                connection.last_frame = loop.time()
                self.metrics.frames.client_in += 1
                data = message.data if isinstance(message.data, bytes) else message.data.encode()
                self._on_frame(connection, data)
            elif message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            elif message.type == WSMsgType.ERROR:
                log.info("client socket error", error=repr(ws.exception()))
                return

    def _on_frame(self, connection: ClientConnection, frame: bytes) -> None:
        intake = self.intake
        data: list[Any] = []
        errors: list[ErrorItem] = []

        def flush() -> None:
            for answer in encode_answer(data, errors):
                connection.send(answer)
            data.clear()
            errors.clear()

        for outcome in intake.decode(frame):
            session = connection.session
            if type(outcome) is ImageTask and session is not None:  # nearly every frame
                self._submit(session, outcome, data, errors)
            elif isinstance(outcome, Authentication):
                flush()
                self._authenticate(connection, outcome)
            elif isinstance(outcome, Ping):
                data.append(Pong() if outcome.taskUUID is None else Pong(taskUUID=outcome.taskUUID))
            elif isinstance(outcome, ErrorItem):
                self.metrics.errors.labels(outcome.code).inc()
                errors.append(outcome)
            elif session is None:
                task_type = "getResponse" if isinstance(outcome, GetResponse) else "imageInference"
                errors.append(
                    error_item("missingApiKey", task_type=task_type, task_uuid=outcome.taskUUID)
                )
            elif isinstance(outcome, GetResponse):
                found, failed = intake.poll(session.tenant, outcome.taskUUID)
                data.extend(found)
                errors.extend(failed)
            else:
                self._submit(session, outcome, data, errors)
        flush()

    def _submit(
        self, session: ClientSession, task: ImageTask, data: list[Any], errors: list[ErrorItem]
    ) -> None:
        intake = self.intake
        sync = task.deliveryMethod == "sync"
        record = intake.submit(session.tenant, task, session if sync else None)
        if isinstance(record, ErrorItem):
            errors.append(record)
            if sync and record.code == "conflictTaskUUID":
                intake.rejoin(session.tenant, task, session)
        elif sync:
            session.open_tasks.add(record.upstream_uuid)
        else:
            data.append(intake.ack(task))

    def _authenticate(self, connection: ClientConnection, auth: Authentication) -> None:
        tenant = self.intake.tenant_of(auth.apiKey)
        if tenant is None:
            self.metrics.errors.labels("invalidApiKey").inc()
            connection.send(
                encode_errors(
                    [error_item("invalidApiKey", parameter="apiKey", task_type="authentication")]
                )
            )
            return
        session = self._resume(auth.connectionSessionUUID, tenant)
        if session is None:
            session = ClientSession(str(uuid.uuid4()), tenant, self.settings.session_buffer_bytes)
            self.sessions[session.uuid] = session
        elif session.connection is not None and session.connection is not connection:
            session.detach(session.connection, self._clock())  # the newest socket wins
        if connection.session is not None and connection.session is not session:
            connection.session.detach(connection, self._clock())
        connection.session = session
        session.attach(connection)
        log.debug("client authenticated", tenant=tenant, session=session.uuid)

    def _resume(self, session_uuid: str | None, tenant: str) -> ClientSession | None:
        """The session to resume: only the tenant's own, inside the window. Anything else gets
        a fresh session, never an error (SDK 1.8 gives up for good on an auth error)."""
        if session_uuid is None:
            return None
        session = self.sessions.get(session_uuid)
        if session is None or session.tenant != tenant:
            return None
        if self._expired(session, self._clock()):
            del self.sessions[session_uuid]
            return None
        return session

    def _expired(self, session: ClientSession, now: float) -> bool:
        detached = session.detached_at
        return detached is not None and now - detached > self.settings.resume_window

    def sweep(self) -> None:
        now = self._clock()
        for key, session in list(self.sessions.items()):
            if self._expired(session, now):
                del self.sessions[key]

    async def close_all(self, code: int, message: bytes) -> None:
        self.intake.accepting = False
        await asyncio.gather(
            *(c.ws.close(code=code, message=message) for c in list(self.connections)),
            return_exceptions=True,
        )
