"""The local provider: a Runware-protocol WebSocket server that renders real images.

It stands for Runware where there is no key and no network, and misbehaves on purpose where a
test asks it to (:mod:`gateway.provider.faults`). It behaves as the reference says Runware does:
authentication first, app-level ping/pong, sync results one image per frame, async acks and
``getResponse``, ``conflictTaskUUID``, a 120 s idle close, and session resumption that delivers
buffered frames in order right after the auth reply.

It depends on :mod:`protocol` only: it must not share the gateway's state.

This module is the protocol server (sockets, authentication, ping, frames in and out) and puts
the parts together: the task engine (:mod:`.engine`), reference images (:mod:`.references`),
the image host (:mod:`.images`) and the test controls (:mod:`.control`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web

from gateway.provider.config import ProviderConfig, Stats
from gateway.provider.control import FaultControl
from gateway.provider.engine import TaskEngine
from gateway.provider.faults import Faults
from gateway.provider.images import ImageHost, ImageStore
from gateway.provider.pool import RenderPool
from gateway.provider.references import ReferenceImages
from gateway.provider.state import Session, SessionTable, TaskTable
from protocol.codec import decode_client_frame, encode_answer, encode_data, encode_errors
from protocol.errors import error_item
from protocol.frames import (
    Authentication,
    AuthenticationResult,
    ErrorItem,
    GetResponse,
    Ping,
    Pong,
)
from protocol.models import Catalogue, default_catalogue

__all__ = ["LocalProvider", "ProviderConfig", "Stats"]


class _Connection:
    """One client socket: frames queue here and a single writer sends them in order."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self.ws = ws
        self.request = request
        self.outbox: deque[bytes] = deque()
        self.wakeup = asyncio.Event()
        self.session: Session | None = None
        self.frames_sent = 0

    def send(self, frame: bytes) -> None:
        self.outbox.append(frame)
        self.wakeup.set()

    def abort(self) -> None:
        if self.request.transport is not None:
            self.request.transport.abort()


class LocalProvider:
    def __init__(
        self,
        config: ProviderConfig,
        *,
        catalogue: Catalogue | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        pool: RenderPool | None = None,
    ) -> None:
        self.config = config
        self._faults = config.faults
        self.catalogue = catalogue or default_catalogue()
        self.stats = Stats()
        self._clock = clock
        self._rng = rng or random.Random()
        self.sessions = SessionTable(
            window=config.resume_window, max_buffered=config.session_buffer_frames, clock=clock
        )
        self.tasks = TaskTable(
            retention=config.task_retention, max_tasks=config.max_tasks, clock=clock
        )
        self.images = ImageStore(
            max_images=config.max_images,
            max_bytes=config.max_image_bytes,
            default_ttl=config.image_retention,
            clock=clock,
        )
        self._own_pool = pool is None
        self.pool = pool or RenderPool(workers=config.render_workers, max_queue=config.render_queue)
        self.references = ReferenceImages(
            self.images,
            timeout=config.reference_timeout,
            max_bytes=config.reference_max_bytes,
            allow=config.allow,
        )
        self.engine = TaskEngine(
            catalogue=self.catalogue,
            stats=self.stats,
            tasks=self.tasks,
            images=self.images,
            references=self.references,
            pool=self.pool,
            faults=lambda: self._faults,
            clock=clock,
            rng=self._rng,
            public_url=lambda: self.public_url,
            priced=config.priced,
        )
        self._connections: set[_Connection] = set()
        self._hearing = asyncio.Event()  # clear while the ``deaf`` fault holds
        if not self._faults.deaf:
            self._hearing.set()
        self._runner: web.AppRunner | None = None
        self._janitor: asyncio.Task[None] | None = None
        self.port = 0
        self.host = "127.0.0.1"

    # ------------------------------------------------------------------ lifecycle

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_message_bytes)
        app.router.add_get("/v1", self._websocket)
        app.router.add_get("/", self._websocket)
        ImageHost(self.images).add_routes(app)
        FaultControl(self, self.config.control_key).add_routes(app)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._runner = web.AppRunner(self.app(), handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.host, self.port = host, self._runner.addresses[0][1]
        self._janitor = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
        self.engine.cancel()
        for connection in list(self._connections):
            connection.abort()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.references.close()
        if self._own_pool:
            self.pool.close()

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1"

    @property
    def public_url(self) -> str:
        return self.config.public_url or f"http://{self.host}:{self.port}"

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            self.sessions.sweep()
            self.tasks.sweep()

    @property
    def faults(self) -> Faults:
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self._faults = faults
        for connection in self._connections:
            connection.wakeup.set()  # a writer held by a stall may go on
        if faults.deaf:
            self._hearing.clear()
        else:
            self._hearing.set()

    def forget(self) -> None:
        """As after a restart: every session and task forgotten, every connection dropped."""
        self.engine.cancel()
        self.sessions.clear()
        self.tasks.clear()
        for connection in list(self._connections):
            connection.session = None
            connection.outbox.clear()
            connection.abort()

    # ------------------------------------------------------------------ the socket

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            max_msg_size=self.config.max_message_bytes, compress=False, decode_text=False
        )
        await ws.prepare(request)
        connection = _Connection(ws, request)
        self._connections.add(connection)
        self.stats.connections += 1
        self.stats.open_connections += 1
        writer = asyncio.create_task(self._write(connection))
        try:
            await self._read(connection)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            self._connections.discard(connection)
            self.stats.open_connections -= 1
            session = connection.session
            if session is not None and session.connection is connection:
                session.detach(list(connection.outbox), self._clock())
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 1.0)
        return ws

    async def _read(self, connection: _Connection) -> None:
        ws = connection.ws
        while True:
            if self.faults.deaf:  # aiohttp stops reading the socket once 64 KiB wait unread
                await self._hearing.wait()
            try:
                message = await ws.receive(timeout=self.config.idle_timeout)
            except TimeoutError:
                await ws.close(code=1000, message=b"idle for 120 s")
                return
            if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if message.type == WSMsgType.ERROR:
                return
            if self.faults.stall:
                continue  # a stalled provider reads and forgets
            if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                data = message.data if isinstance(message.data, bytes) else message.data.encode()
                self._handle(connection, data)

    async def _write(self, connection: _Connection) -> None:
        ws = connection.ws
        while True:
            if not connection.outbox or self.faults.stall:
                connection.wakeup.clear()
                await connection.wakeup.wait()
                continue
            if self.faults.send_delay_ms > 0:
                await asyncio.sleep(self.faults.send_delay_ms / 1000.0)
                if self.faults.stall:
                    continue
            frame = connection.outbox[0]
            await asyncio.wait_for(
                ws.send_frame(frame, WSMsgType.TEXT), timeout=self.config.send_timeout
            )
            connection.outbox.popleft()
            connection.frames_sent += 1
            self.stats.frames_sent += 1
            faults = self.faults
            if (
                faults.drop_after_frames and connection.frames_sent >= faults.drop_after_frames
            ) or (faults.drop_probability and self._rng.random() < faults.drop_probability):
                self.stats.dropped_connections += 1
                connection.abort()
                return

    def _deliver(self, connection: _Connection, frame: bytes) -> None:
        if connection.session is not None:
            connection.session.deliver(frame)
        else:
            connection.send(frame)

    # ------------------------------------------------------------------ frames

    def _handle(self, connection: _Connection, frame: bytes) -> None:
        data: list[Any] = []
        errors: list[ErrorItem] = []
        for outcome in decode_client_frame(frame, self.catalogue):
            if isinstance(outcome, Authentication):
                self._flush(connection, data, errors)
                self._authenticate(connection, outcome)
            elif isinstance(outcome, Ping):
                data.append(Pong() if outcome.taskUUID is None else Pong(taskUUID=outcome.taskUUID))
            elif isinstance(outcome, ErrorItem):
                errors.append(outcome)
            elif connection.session is None:
                errors.append(
                    error_item(
                        "missingApiKey",
                        task_type=outcome.__struct_config__.tag,  # type: ignore[arg-type]
                        task_uuid=outcome.taskUUID,
                    )
                )
            elif isinstance(outcome, GetResponse):
                self._flush(connection, data, errors)
                self.engine.get_response(connection.session, outcome)
            else:
                self.engine.submit(connection.session, outcome, data, errors)
        self._flush(connection, data, errors)

    def _flush(self, connection: _Connection, data: list[Any], errors: list[ErrorItem]) -> None:
        for frame in encode_answer(data, errors):
            self._deliver(connection, frame)
        data.clear()
        errors.clear()

    def _authenticate(self, connection: _Connection, auth: Authentication) -> None:
        if self.faults.refuse_auth or auth.apiKey not in self.config.keys:
            connection.send(
                encode_errors(
                    [error_item("invalidApiKey", parameter="apiKey", task_type="authentication")]
                )
            )
            return
        self.stats.authentications += 1
        session = self.sessions.resume(auth.connectionSessionUUID, auth.apiKey)
        if session is None:
            session = self.sessions.open(str(uuid.uuid4()), auth.apiKey)
        else:
            self.stats.resumed += 1
            previous = session.connection
            if isinstance(previous, _Connection) and previous is not connection:
                # the old socket keeps its session for the frames it has already read (they
                # were sent authenticated): what they produce goes to the session's new socket
                session.detach(list(previous.outbox), self._clock())
                previous.outbox.clear()
        if connection.session is not None and connection.session is not session:
            connection.session.detach([], self._clock())
        connection.session = session
        # the auth reply is the very next frame, then everything the session missed, in order
        connection.send(encode_data([AuthenticationResult(connectionSessionUUID=session.uuid)]))
        while session.buffer:
            connection.send(session.buffer.popleft())
        session.connection = connection
        session.detached_at = None
