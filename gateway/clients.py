"""Client WebSocket connections: authentication, the door's bounds, backpressure.

A :class:`ClientConnection` is one socket with a bounded send queue, flushed once per turn of
the event loop; it owns its queue and its closed state. Its frames' tasks go through the shared
dispatch (:mod:`gateway.dispatch`); its session (:mod:`gateway.sessions`) outlives it by the
resume window.

Authentication is guarded per client address (:class:`gateway.throttle.AuthThrottle`): an
address refused after repeated failures, or holding ``max_unauthenticated_per_address`` sockets
not yet authenticated, gets HTTP 429 at the upgrade; a wrong key's answer waits (that socket
only: its read loop sleeps, nothing else does). Per tenant, ``max_connections`` authenticated
sockets at once; past it the authentication gets ``rateLimitExceeded`` and the socket stays
unauthenticated.

Close codes (documented in the README):
  1000  idle for ``idle_timeout`` with no task in flight (a frame with no task is no activity)
  1007  a text frame that is not UTF-8 (RFC 6455 8.1)
  1009  an inbound frame larger than ``max_frame_bytes``, or than
        ``max_unauthenticated_frame_bytes`` before authentication
  1012  the gateway is shutting down: reconnect (elsewhere)
  4001  no authentication within ``auth_timeout``
  4003  the socket's API key (or its whole tenant) was revoked by a reload of the tenants
  4008  the client does not read: its send queue passed ``send_buffer_bytes``
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import math
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from gateway.audit import key_id
from gateway.config import ServerSettings
from gateway.dispatch import Answer, Dispatch
from gateway.intake import Intake
from gateway.metrics import Metrics
from gateway.quotas import TokenBucket
from gateway.replication import FrameClaims
from gateway.roaming import Roaming
from gateway.sessions import ClientSession, SessionTable
from gateway.tenants import CLOSE_REVOKED, Revoked, hash_key
from gateway.throttle import AuthThrottle, ClientAddresses
from gateway.watchdog import CLOSE_AUTH_TIMEOUT, IdleWatchdog
from gateway.wsmsg import BINARY, TEXT
from protocol.codec import encode_data, encode_errors
from protocol.errors import error_item
from protocol.frames import Authentication, AuthenticationResult, ErrorItem, ImageTask

__all__ = [
    "CLOSE_AUTH_TIMEOUT",
    "CLOSE_REVOKED",
    "CLOSE_SLOW_CONSUMER",
    "ClientConnection",
    "ClientGateway",
    "text_frame",
]

log = structlog.get_logger("tenebra.clients")

# CLOSE_AUTH_TIMEOUT = 4001, from gateway.watchdog (which closes with it)
# CLOSE_REVOKED = 4003, from gateway.tenants (which says what a reload revoked)
CLOSE_SLOW_CONSUMER = 4008


# What a socket's user-space write buffer may hold (beyond the kernel's) before its frames wait
# in the outbox for a drain.
WRITE_BUFFER_HIGH_WATER = 64 * 1024
# Shared store: frames of one socket read and waiting for their claims at most; past it the
# socket is not read until they are dispatched (TCP pushes back on the client)
MAX_CLAIMING_FRAMES = 64
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


def close_frame(code: int, reason: bytes) -> bytes:
    """A close frame (RFC 6455 5.5.1); ``reason`` is short (a control frame holds 125 bytes)."""
    return _HEADER_SHORT(0x88, 2 + len(reason)) + code.to_bytes(2, "big") + reason[:123]


class ClientConnection:
    """One client socket: frames queue here, bounded in bytes, and go out once per loop turn.

    Frames sent during one turn of the event loop leave together in one write (the socket's
    results of a whole provider frame, a task's four images): a system call per frame was a
    fifth of the gateway's CPU. While the socket lags (the kernel's buffer and a high-water
    mark of user space full), a drain task waits for TCP under aiohttp's flow control and
    writes what has queued meanwhile; past ``limit`` bytes queued, the client is cut (4008).

    The bound counts every byte queued, a single frame included. Past it, a socket that keeps
    up (no drain, its write buffer under the high-water mark) is written to at once: a frame
    larger than the whole bound (a getResponse answer of many images) or one turn's many
    answers are not a slow client. A socket that lags is cut. So what waits in user space for
    one socket stays under about twice the bound plus the high-water mark."""

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
        self.own = 0  # frames at the head of the outbox that are this socket's (send_own)
        self.sending: bytes | None = None  # the frame the drain is handing to TCP
        self.session: ClientSession | None = None
        self.overflowed = False
        self.closed = False  # nothing is written after a close, from here or aiohttp
        self.last_frame = asyncio.get_running_loop().time()
        self._flush_due = False
        self.drain: asyncio.Task[None] | None = None  # only while the socket lags
        self._cutting: asyncio.Task[None] | None = None
        self._reads: _UnauthenticatedReads | None = None
        self.address = ""  # the client's, as the throttle counts it
        self.unauthenticated = True  # counted in the throttle until it authenticates or closes
        self.tenant: str | None = None  # once authenticated, counted in the tenant's connections
        self.key_digest: bytes | None = None  # the SHA-256 of the key it authenticated with
        self.key_id: str | None = None  # its key id (gateway.audit), on its tasks' records
        self.trace: Any = None  # while tracing: the upgrade request's trace context, if any
        self.closing: asyncio.Task[None] | None = None  # a close the gateway decided on
        # shared store: frames read and waiting for their claims (Intake.claim_then), and the
        # reader's wait for them to be dispatched
        self.claiming = 0
        self._settled: asyncio.Future[None] | None = None

    def claimed(self) -> None:
        """One of the frames waiting for their claims was dispatched (or given back)."""
        self.claiming -= 1
        settled = self._settled
        if not self.claiming and settled is not None:
            self._settled = None
            if not settled.done():
                settled.set_result(None)

    async def claims_settled(self) -> None:
        """Until every frame read before now that waits for its claims is dispatched: within
        the store's deadline, which bounds every batch of claims. A waiter cancelled leaves the
        future to the next (shielded)."""
        if self.claiming:
            settled = self._settled
            if settled is None:
                settled = self._settled = asyncio.get_running_loop().create_future()
            await asyncio.shield(settled)

    def send(self, frame: bytes) -> bool:
        """Queue a frame; False once the connection is closed or past its bound (the frame is
        not kept)."""
        if self.closed or self.ws.closed:
            return False
        self.outbox.append(frame)
        self.queued_bytes += len(frame)
        if self.queued_bytes > self.limit:
            transport = self._keeping_up()
            if transport is None:
                self.overflowed = self.closed = True
                self.metrics.slow_clients.inc()
                self._cutting = self._cut()
            else:  # the bound is for what waits on a reader, not for one turn's answers
                self._write_queued(transport)
        elif self.drain is None and not self._flush_due:
            self._flush_due = True
            self._schedule(self)
        return True

    def send_own(self, frame: bytes) -> None:
        """Queue the reply to this socket's authentication: it, and what was queued before it
        (the socket had no session yet: all its own answers), stay with this socket when a
        newer one takes the session in the meantime (:meth:`take_unsent`)."""
        if self.send(frame):
            self.own = len(self.outbox)

    def _keeping_up(self) -> asyncio.Transport | None:
        """The transport, if the socket takes what it is given: no drain, and its user-space
        write buffer under the high-water mark."""
        transport = self.request.transport
        if self.drain is not None or transport is None or transport.is_closing():
            return None
        if transport.get_write_buffer_size() >= WRITE_BUFFER_HIGH_WATER:
            return None
        return transport

    def take_unsent(self) -> list[bytes]:
        """What was queued and not written, for the session: given once. The socket's own
        answers at the head of the queue (:meth:`send_own`) stay, for it to write, and so does
        the frame a lagging socket is handing to TCP while a newer one takes the session (it
        is on its way: moved, it reached the client twice)."""
        outbox = self.outbox
        keep = self.own
        if self.sending is not None and outbox and outbox[0] is self.sending:
            keep = max(keep, 1)
        own = [outbox.popleft() for _ in range(min(keep, len(outbox)))]
        unsent = list(outbox)
        outbox.clear()
        outbox.extend(own)
        self.queued_bytes = sum(map(len, own))
        return unsent

    def close_now(self, code: int, reason: bytes) -> None:
        """Close without a handshake: the close frame, then TCP. For a peer that broke the
        protocol (1007, 1009), whose bytes are not worth reading any more."""
        if self.closed:
            return
        self.closed = True
        transport = self.request.transport
        if transport is not None and not transport.is_closing():
            transport.write(close_frame(code, reason))
            transport.close()

    def guard_reads(self, limit: int) -> None:
        """Until authentication, bound what aiohttp buffers of an unread frame (see
        :class:`_UnauthenticatedReads`)."""
        protocol = self.request.protocol
        parser = getattr(protocol, "_payload_parser", None)
        if parser is not None:
            self._reads = _UnauthenticatedReads(parser, limit, self)
            protocol._payload_parser = self._reads

    def frame_read(self) -> None:
        if self._reads is not None:
            self._reads.left = self._reads.budget

    def authenticated(self) -> None:
        reads, self._reads = self._reads, None
        if reads is None:
            return
        protocol, parser = self.request.protocol, reads.parser
        if getattr(protocol, "_payload_parser", None) is reads:
            protocol._payload_parser = parser  # the same parser: a frame half read is kept

    def flush(self) -> None:
        """Write everything queued in one go, or start draining if the socket lags."""
        self._flush_due = False
        if self.drain is not None or self.closed or not self.outbox:
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
        self.queued_bytes = self.own = 0
        if self.session is not None:
            self.session.refill(self)

    async def _drain(self) -> None:
        """One frame through aiohttp, which waits until TCP has taken the backlog (the socket
        is made with ``writer_limit=1``: every aiohttp send checks), then the rest at once."""
        try:
            while self.outbox and not self.closed:
                frame = self.sending = self.outbox[0]
                try:
                    await self.ws.send_frame(frame, TEXT)
                finally:
                    self.sending = None
                if self.outbox and self.outbox[0] is frame:  # else its session took the queue
                    self.outbox.popleft()
                    self.queued_bytes -= len(frame)
                    if self.own:
                        self.own -= 1
                self.metrics.frames.client_out += 1
                transport = self.request.transport
                if transport is None or transport.is_closing():
                    return
                if self.outbox and transport.get_write_buffer_size() < WRITE_BUFFER_HIGH_WATER:
                    self._write_queued(transport)
        finally:
            self.drain = None
        # the queue is empty: what the session still holds comes next (a resumed backlog would
        # otherwise wait here for good, and every new frame behind it)
        if not self.closed and self.session is not None:
            self.session.refill(self)

    def _cut(self) -> asyncio.Task[None]:
        if self.drain is not None:
            self.drain.cancel()  # it may be stuck on a socket that does not read
        return self.close_within(CLOSE_SLOW_CONSUMER, b"send buffer overflow")

    def close_within(self, code: int, message: bytes) -> asyncio.Task[None]:
        """Close with a handshake, aborted a second later: a client that does not read may
        never let the close frame out. What it did not take goes back to its session when the
        handler detaches it."""
        return asyncio.get_running_loop().create_task(self._close_within(code, message))

    async def _close_within(self, code: int, message: bytes) -> None:
        """Not ``wait_for(ws.close(), 1)``: after its timeout it waits for the cancelled close
        to end, and aiohttp's close on a client that still sends but never reads was seen not
        to end at all (19 s later, in the bench's stall scenario)."""
        closing = asyncio.ensure_future(self.ws.close(code=code, message=message))
        closing.add_done_callback(_consume_outcome)  # a socket this stuck fails in many ways
        try:
            await asyncio.wait({closing}, timeout=1.0)
        finally:
            if self.request.transport is not None:
                self.request.transport.abort()


class _UnauthenticatedReads:
    """Stands between aiohttp's protocol and the socket's frame parser until the socket
    authenticates, so that a large frame is refused (1009) as its bytes arrive rather than
    buffered whole first: aiohttp's limit (``max_frame_bytes``) is fixed per socket, and ten
    unauthenticated sockets could make it hold 32 MiB each. The budget (bytes received since
    the last frame was read) is looser than the per-frame rule the read loop applies exactly,
    so that small frames sent together are never refused; it is taken away at authentication,
    and the hot path reads through aiohttp's parser alone."""

    __slots__ = ("budget", "connection", "left", "parser")

    def __init__(self, parser: Any, frame_limit: int, connection: ClientConnection) -> None:
        self.parser = parser
        self.budget = self.left = max(4 * frame_limit, 64 * 1024)
        self.connection = connection

    def feed_data(self, data: bytes) -> Any:
        self.left -= len(data)
        if self.left < 0:
            self.connection.close_now(WSCloseCode.MESSAGE_TOO_BIG, b"authenticate first")
            return False, b""
        return self.parser.feed_data(data)

    def feed_eof(self) -> None:
        self.parser.feed_eof()


def _consume_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("slow client close failed", error=repr(task.exception()))


class SocketDoor:
    """The WebSocket door of one connection, as the shared dispatch sees it."""

    __slots__ = ("connection", "delay", "gateway", "held", "intake", "polls", "session", "tenant")

    def __init__(self, connection: ClientConnection, gateway: ClientGateway) -> None:
        settings = gateway.settings
        self.connection = connection
        self.gateway = gateway
        self.intake = gateway.intake
        self.session: ClientSession | None = None
        self.tenant: str | None = None
        self.polls = TokenBucket(
            settings.get_response_rate, settings.get_response_burst, asyncio.get_running_loop().time
        )
        # a failed authentication's answer, and what follows it, wait ``delay`` seconds
        self.delay = 0.0
        self.held: list[bytes] = []

    def authenticate(self, auth: Authentication, answer: Answer) -> None:
        if not self.delay:  # else what came before waits with the answer that waits
            answer.flush()  # what came before the authentication is answered before it
        self.gateway.authenticate(self, auth)

    def send(self, frame: bytes) -> None:
        if self.delay:
            self.held.append(frame)
        else:
            self.connection.send(frame)

    def submit_sync(self, tenant: str, task: ImageTask) -> ErrorItem | None:
        intake, session = self.intake, self.session
        assert session is not None  # a tenant comes with a session
        record = intake.submit(tenant, task, session)
        if isinstance(record, ErrorItem):
            if record.code == "conflictTaskUUID":
                intake.rejoin(tenant, task, session)
            return record
        # it may have failed already (a full queue): settled, not running
        if record.finished is None:
            session.open_tasks.add(record.upstream_uuid)
            record.session = session.uuid
        return None


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
        self.dispatch = Dispatch(intake, metrics)
        self._clock = clock
        self.throttle = AuthThrottle(
            clock=clock,
            base_delay=settings.auth_failure_delay,
            max_delay=max(settings.auth_failure_delay, settings.auth_failure_delay_max),
            refuse_after=settings.auth_failures_before_refusal,
            refusal=settings.auth_refusal,
            max_unauthenticated=settings.max_unauthenticated_per_address,
        )
        self.addresses = ClientAddresses(settings.trusted_proxies)
        self.table = SessionTable(
            session_buffer_bytes=settings.session_buffer_bytes,
            max_sessions=settings.max_sessions,
            max_per_tenant=settings.max_sessions_per_tenant,
            buffer_bytes=settings.sessions_buffer_bytes,
            resume_window=settings.resume_window,
            evicted=metrics.client_sessions_evicted.inc,
        )
        self.sessions = self.table.sessions
        self.roaming: Roaming | None = None  # with a shared store: sessions across replicas
        self.connections: set[ClientConnection] = set()
        self._admitted = 0  # connections from the upgrade on, so a burst cannot pass the bound
        self._due: list[ClientConnection] = []  # connections with frames to flush
        self._ids = itertools.count(1)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not self.intake.accepting:
            raise web.HTTPServiceUnavailable(text="shutting down")
        if self._admitted >= self.settings.max_connections:
            raise web.HTTPServiceUnavailable(text="too many connections")
        address, throttle = self.address_of(request), self.throttle
        refused = throttle.refused(address)
        if refused:
            raise too_many_failures(refused)
        if not throttle.open_unauthenticated(address):
            raise web.HTTPTooManyRequests(
                text="too many unauthenticated connections from this address"
            )
        self._admitted += 1
        try:
            return await self._serve(request)
        finally:
            self._admitted -= 1

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._serve_socket(request)
        finally:
            self._release(request)

    async def _serve_socket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            max_msg_size=self.settings.max_frame_bytes,
            compress=False,  # measured: deflate costs 40% of throughput and 3x memory per socket
            decode_text=False,  # checked here, and only when not ASCII (see _read)
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
        connection.guard_reads(self.settings.max_unauthenticated_frame_bytes)
        connection.address = self.address_of(request)
        if self.intake.telemetry is not None:  # its tasks continue the upgrade's trace
            connection.trace = self.intake.telemetry.extract(request.headers)
        request[_CONNECTION] = connection
        self.connections.add(connection)
        self.metrics.client_connections.inc()
        watchdog = IdleWatchdog(connection, self.settings)
        failure: BaseException | None = None
        try:
            with structlog.contextvars.bound_contextvars(conn=connection.id):
                await self._read(connection, SocketDoor(connection, self))
        except BaseException as exc:  # raised again once the socket is cleaned up
            failure = exc
        # not in a finally: see UpstreamLink._connection (mypyc and awaits in handlers)
        await self._cleaned_up(connection, watchdog, ws)
        if failure is not None:
            raise failure
        return ws

    async def _cleaned_up(
        self, connection: ClientConnection, watchdog: IdleWatchdog, ws: web.WebSocketResponse
    ) -> None:
        """What a socket held, given back as it ends (whatever ended it)."""
        with contextlib.suppress(asyncio.CancelledError):  # the rest must run, as for drain
            await connection.claims_settled()  # its frames read are dispatched (or given back)
        watchdog.cancel()
        self.connections.discard(connection)
        self.metrics.client_connections.dec()
        drain = connection.drain
        if drain is not None:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await drain
        session = connection.session
        if session is not None:
            session.detach(connection, self._clock())
            if self.roaming is not None and session.connection is None:
                self.roaming.detached(session)
        if not ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 1.0)

    def _release(self, request: web.Request) -> None:
        """The socket is gone (or never became one): what it held in the throttle's count of
        unauthenticated sockets, or in its tenant's connections, is given back, once."""
        connection: ClientConnection | None = request.get(_CONNECTION)
        if connection is None or connection.unauthenticated:
            self.throttle.close_unauthenticated(self.address_of(request))
        if connection is not None:
            connection.unauthenticated = False
            tenant, connection.tenant = connection.tenant, None
            if tenant is not None:
                self.intake.disconnect(tenant)

    def address_of(self, request: web.Request) -> str:
        """The client's address as the per-address bounds count it (behind a trusted proxy,
        the one it names)."""
        return self.addresses.of(request.remote, request.headers.get("X-Forwarded-For"))

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

    async def _read(self, connection: ClientConnection, door: SocketDoor) -> None:
        # no bound methods kept in locals: compiled, a call through one goes by the interpreter's
        # calling convention, where a method of a known class is a C call
        ws, dispatch = connection.ws, self.dispatch
        intake = self.intake
        telemetry = intake.telemetry
        shared = intake.replication is not None
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()  # a claimed frame's dispatch logs as its socket's
        unauthenticated_limit = self.settings.max_unauthenticated_frame_bytes
        while not connection.closed:
            message = await ws.receive()
            if connection.closed:
                return
            kind = message.type
            if kind is TEXT or kind is BINARY:
                received = time.time_ns() if telemetry is not None else 0
                data = message.data if isinstance(message.data, bytes) else message.data.encode()
                unauthenticated = door.session is None
                if unauthenticated:
                    if len(data) > unauthenticated_limit:
                        connection.close_now(WSCloseCode.MESSAGE_TOO_BIG, b"authenticate first")
                        return
                    connection.frame_read()
                # isascii is a scan without a copy: only other text pays for a decode
                if kind is TEXT and not data.isascii() and not _utf8(data):
                    connection.close_now(WSCloseCode.INVALID_TEXT, b"invalid UTF-8")
                    return
                self.metrics.frames.client_in += 1
                outcomes = intake.decode(data)
                if outcomes:  # a frame with no task is no activity (IdleWatchdog)
                    connection.last_frame = loop.time()
                answer = Answer(connection.send)
                claims = None
                if shared and outcomes:  # the frame's tasks claimed across replicas first
                    held = door.session
                    if held is not None and intake.claim_then(
                        held.tenant,
                        outcomes,
                        held.uuid,
                        _ClaimedFrame(self, context, connection, door, outcomes, answer, received),
                        behind=connection.claiming > 0,
                    ):
                        connection.claiming += 1
                        if connection.claiming >= MAX_CLAIMING_FRAMES:
                            await connection.claims_settled()
                        continue
                    await connection.claims_settled()  # the frames read before it go first
                    if door.session is None:
                        await self._adopt(door, outcomes)
                    session = door.session.uuid if door.session is not None else None
                    claims = await intake.claim(door.tenant, outcomes, session)
                    if connection.closed or connection.closing is not None:
                        if claims is not None:
                            intake.released(claims)  # none of them was used
                        return
                intake.key_id = connection.key_id  # its tasks' records carry it
                if telemetry is not None:
                    intake.frame_trace = telemetry.frame(connection.trace, received)
                dispatch.frame(outcomes, door, answer, claims)
                if unauthenticated and door.delay:
                    await self._answer_late(door)
                answer.flush()
            elif kind in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            elif kind == WSMsgType.ERROR:
                log.info("client socket error", error=repr(ws.exception()))
                return

    def _claimed(
        self,
        connection: ClientConnection,
        door: SocketDoor,
        outcomes: list[Any],
        answer: Answer,
        received: int,
        claims: FrameClaims,
    ) -> None:
        try:
            intake = self.intake
            if connection.closed or connection.closing is not None:  # cut, or revoked
                intake.released(claims)  # none of them was used
                return
            intake.key_id = connection.key_id
            telemetry = intake.telemetry
            if telemetry is not None:
                intake.frame_trace = telemetry.frame(connection.trace, received)
            self.dispatch.frame(outcomes, door, answer, claims)
            answer.flush()
        finally:
            connection.claimed()

    async def _adopt(self, door: SocketDoor, outcomes: list[Any]) -> None:
        """Shared store: a session another replica held is made this one's before the frame's
        authentication resumes it (gateway.roaming). Not for an authentication that will be
        refused (:meth:`authenticate`'s checks before the session): the session would be taken
        from the socket that holds it for nothing."""
        roaming = self.roaming
        auth = next((o for o in outcomes if type(o) is Authentication), None)
        if roaming is None or auth is None or auth.connectionSessionUUID is None:
            return
        local = self.table.sessions.get(auth.connectionSessionUUID)
        if local is not None and local.forward is None:
            return
        if door.delay or self.throttle.refused(door.connection.address):
            return
        tenant = self.intake.tenant_of(auth.apiKey)
        if tenant is not None and self.intake.may_connect(tenant):
            await roaming.adopt(auth.connectionSessionUUID, tenant, self._clock())

    def authenticate(self, door: SocketDoor, auth: Authentication) -> None:
        """One authentication per socket makes at most one session: a repeat with a key of
        the same tenant is answered with the socket's session, as it is; any other key is
        refused alike, valid or not (a socket is one tenant's, and no oracle for keys).

        Before that, per client address: a refused address is answered without a look at
        the key; a wrong key's answer waits (:meth:`_answer_late`), and so does the rest of
        the frame, whose further authentications are refused unread (one guess per frame).
        Then the tenant's ``max_connections``, then the session."""
        connection = door.connection
        if door.session is not None:
            if self.intake.tenant_of(auth.apiKey) == door.tenant:
                reply = AuthenticationResult(connectionSessionUUID=door.session.uuid)
                connection.send(encode_data([reply]))
            else:
                self._refuse(door, "invalidApiKey", _AUTHENTICATED_ALREADY, "apiKey")
            return
        address, throttle = connection.address, self.throttle
        refused = throttle.refused(address)
        if refused or door.delay:
            message = _WAIT_FOR_THE_ANSWER if door.delay else _failures_message(refused)
            self._refuse(door, "rateLimitExceeded", message, None)
            return
        tenant = self.intake.tenant_of(auth.apiKey)
        if tenant is None:
            door.delay = throttle.failed(address)  # from here on, what the frame answers waits
            if self.intake.audit is not None:
                refused_for = throttle.refused(address)
                self.intake.audit.auth_failed(address, "invalidApiKey", "websocket", refused_for)
            self._refuse(door, "invalidApiKey", None, "apiKey")
            return
        throttle.succeeded(address)
        digest = hash_key(auth.apiKey)
        # the rest of this frame's tasks are this key's (and a connection limit's line names it)
        key = self.intake.key_id = key_id(digest)
        limited = self.intake.connect(tenant)  # counted by the intake
        if limited is not None:
            door.send(encode_errors([limited]))
            return
        now = self._clock()
        session = self.table.resume(auth.connectionSessionUUID, tenant, now)
        if session is None:
            session = self.table.open(tenant)
            if session is None:
                self.intake.disconnect(tenant)
                message = "Too many sessions for this API key. Retry with backoff."
                self._refuse(door, "rateLimitExceeded", message, None)
                return
            if self.roaming is not None:
                self.roaming.opened(session)
        elif session.connection is not None and session.connection is not connection:
            session.detach(session.connection, now)  # the newest socket wins
        door.session, door.tenant = session, tenant
        connection.tenant, connection.key_digest, connection.key_id = tenant, digest, key
        connection.unauthenticated = False
        throttle.close_unauthenticated(address)
        connection.session = session
        connection.authenticated()
        session.attach(connection)
        if self.roaming is not None:
            self.roaming.attached(session)
        log.debug("client authenticated", tenant=tenant, session=session.uuid)

    async def _answer_late(self, door: SocketDoor) -> None:
        """A wrong key: its answer, and the rest of its frame's, after the throttle's delay.
        The read loop of that socket sleeps; nothing else does, and no frame of that socket
        is read meanwhile, so guesses on one socket go one delay at a time."""
        await asyncio.sleep(door.delay)
        held, door.held, door.delay = door.held, [], 0.0
        connection = door.connection
        for frame in held:
            connection.send(frame)

    def _refuse(
        self, door: SocketDoor, code: str, message: str | None, parameter: str | None
    ) -> None:
        self.metrics.errors.labels(code).inc()
        item = error_item(code, message=message, parameter=parameter, task_type="authentication")
        door.send(encode_errors([item]))

    def close_revoked(self, revoked: Revoked) -> int:
        """After a reload: every socket whose key, or whose whole tenant, was taken away is
        closed with 4003 (aborted a second later if the close cannot get out); how many."""
        if not revoked:
            return 0
        closing = 0
        for connection in list(self.connections):
            if connection.closing is not None:
                continue
            if connection.tenant in revoked.tenants or connection.key_digest in revoked.keys:
                connection.closing = connection.close_within(CLOSE_REVOKED, b"key revoked")
                closing += 1
        return closing

    def sweep(self) -> None:
        self.table.sweep(self._clock())

    async def close_all(self, code: int, message: bytes) -> None:
        self.intake.accepting = False
        # each close has its deadline: a client that does not read would hold a plain close
        # (and the shutdown) forever, waiting for its socket to drain
        await asyncio.gather(
            *(c.close_within(code, message) for c in list(self.connections)),
            return_exceptions=True,
        )


_CONNECTION = web.RequestKey("tenebra.connection", ClientConnection)
_AUTHENTICATED_ALREADY = "This socket is authenticated already."
_WAIT_FOR_THE_ANSWER = "Wait for the answer to the previous authentication."


def _failures_message(refused: float) -> str:
    return f"Too many failed authentications from this address. Retry in {math.ceil(refused)} s."


def too_many_failures(refused: float) -> web.HTTPTooManyRequests:
    """The HTTP answer to an address refused for ``refused`` more seconds."""
    return web.HTTPTooManyRequests(
        text=_failures_message(refused), headers={"Retry-After": str(max(1, math.ceil(refused)))}
    )


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


class _ClaimedFrame:
    """A frame read while its claims are asked (Intake.claim_then), dispatched as
    ``ClientGateway._read`` dispatches the others once they are answered. An object, not a
    closure: compiled, a closure is two objects per frame (it and its scope), each built and
    freed attribute by attribute."""

    __slots__ = ("answer", "connection", "context", "door", "gateway", "outcomes", "received")

    def __init__(
        self,
        gateway: ClientGateway,
        context: contextvars.Context,
        connection: ClientConnection,
        door: SocketDoor,
        outcomes: list[Any],
        answer: Answer,
        received: int,
    ) -> None:
        self.gateway = gateway
        self.context = context
        self.connection = connection
        self.door = door
        self.outcomes = outcomes
        self.answer = answer
        self.received = received

    def __call__(self, claims: FrameClaims) -> None:
        self.context.run(
            self.gateway._claimed,
            self.connection,
            self.door,
            self.outcomes,
            self.answer,
            self.received,
            claims,
        )
