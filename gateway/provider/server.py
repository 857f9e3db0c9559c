"""The local provider: a Runware-protocol WebSocket server that renders real images.

It stands for Runware where there is no key and no network, and misbehaves on purpose where a
test asks it to (:mod:`gateway.provider.faults`). It behaves as the reference says Runware does:
authentication first, app-level ping/pong, sync results one image per frame, async acks and
``getResponse``, ``conflictTaskUUID``, a 120 s idle close, and session resumption that delivers
buffered frames in order right after the auth reply.

It depends on :mod:`protocol` only: it must not share the gateway's state.

HTTP routes beside the WebSocket (``/v1`` and ``/``):
``GET /images/<imageUUID>.<ext>`` serves generated images;
``GET|POST /control/faults``, ``POST /control/forget`` and ``GET /control/stats`` are the test
controls.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
from aiohttp import WSMsgType, web

from gateway.provider.faults import Faults
from gateway.provider.images import ImageStore
from gateway.provider.pool import RenderJob, RenderPool, RenderQueueFull
from gateway.provider.render import encode_image, render_scene
from gateway.provider.state import Generation, ProviderTask, Session, SessionTable, TaskTable
from protocol.codec import decode_client_frame, encode_answer, encode_data, encode_errors
from protocol.errors import error_item
from protocol.frames import (
    CONTENT_TYPES,
    EXTENSIONS,
    Authentication,
    AuthenticationResult,
    ErrorItem,
    GetResponse,
    ImageResult,
    ImageTask,
    Ping,
    Pong,
    ProcessingItem,
    TaskAck,
)
from protocol.models import Catalogue, default_catalogue

__all__ = ["LocalProvider", "ProviderConfig", "Stats"]

log = logging.getLogger("tenebra.provider")
MiB = 1 << 20


@dataclass
class ProviderConfig:
    keys: frozenset[str]
    public_url: str | None = None  # where clients reach /images; the bound address by default
    idle_timeout: float = 120.0
    resume_window: float = 120.0
    task_retention: float = 3600.0
    max_tasks: int = 100_000
    image_retention: float = 3600.0
    max_images: int = 5_000
    max_image_bytes: int = 1024 * MiB
    max_message_bytes: int = 32 * MiB
    session_buffer_frames: int = 10_000
    render_workers: int | None = None
    render_queue: int = 256
    send_timeout: float = 30.0
    reference_timeout: float = 10.0
    reference_max_bytes: int = 32 * MiB
    faults: Faults = field(default_factory=Faults)


class Stats(msgspec.Struct):
    connections: int = 0
    open_connections: int = 0
    authentications: int = 0
    resumed: int = 0
    submissions: int = 0
    conflicts: int = 0
    images: int = 0
    frames_sent: int = 0
    dropped_connections: int = 0


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
        self._connections: set[_Connection] = set()
        self._work: set[asyncio.Task[None]] = set()
        self._hearing = asyncio.Event()  # clear while the ``deaf`` fault holds
        if not self._faults.deaf:
            self._hearing.set()
        self._fast_image: bytes | None = None
        self._http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._janitor: asyncio.Task[None] | None = None
        self.port = 0
        self.host = "127.0.0.1"

    # ------------------------------------------------------------------ lifecycle

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_message_bytes)
        app.router.add_get("/v1", self._websocket)
        app.router.add_get("/", self._websocket)
        app.router.add_get("/images/fast/{name}", self._fast_image_route)
        app.router.add_get("/images/{name}", self._image_route)
        app.router.add_get("/control/faults", self._get_faults)
        app.router.add_post("/control/faults", self._set_faults)
        app.router.add_post("/control/forget", self._forget)
        app.router.add_get("/control/stats", self._get_stats)
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
        for work in list(self._work):
            work.cancel()
        for connection in list(self._connections):
            connection.abort()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()
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

    # ------------------------------------------------------------------ tasks

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
                self._get_response(connection.session, outcome)
            else:
                self._submit(connection.session, outcome, data, errors)
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
            session = self.sessions.open(str(self._uuid()), auth.apiKey)
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

    def _submit(
        self, session: Session, task: ImageTask, data: list[Any], errors: list[ErrorItem]
    ) -> None:
        if self.tasks.get(session.key, task.taskUUID) is not None:
            self.stats.conflicts += 1
            errors.append(
                error_item(
                    "conflictTaskUUID",
                    parameter="taskUUID",
                    type="string",
                    task_type="imageInference",
                    task_uuid=task.taskUUID,
                )
            )
            return
        self.stats.submissions += 1
        entry = ProviderTask(
            task=task,
            session=session,
            created=self._clock(),
            generations=[Generation() for _ in range(task.numberResults)],
        )
        self.tasks.add(session.key, entry)
        if task.deliveryMethod == "async":
            data.append(TaskAck(taskType="imageInference", taskUUID=task.taskUUID))
        if self.faults.error_rate and self._rng.random() < self.faults.error_rate:
            self._spawn(self._fail(entry, self.faults.error_code))
            return
        base_seed = self._rng.randrange(1, 2**31 - 64)
        reference: asyncio.Future[bytes | None] | None = None
        if task.reference_images and not self.faults.fast:
            reference = asyncio.ensure_future(self._reference(session, task))
        for index in range(task.numberResults):
            self._spawn(self._generate(entry, index, base_seed + index, reference))

    def _spawn(self, work: Any) -> None:
        job = asyncio.create_task(work)
        self._work.add(job)
        job.add_done_callback(self._work.discard)

    async def _fail(self, entry: ProviderTask, code: str) -> None:
        await asyncio.sleep(self.faults.latency.sample(self._rng))
        error = error_item(code, task_type="imageInference", task_uuid=entry.task.taskUUID)
        entry.failed = error
        for generation in entry.generations:
            generation.status, generation.error = "error", error
        if self.tasks.holds(entry) and entry.task.deliveryMethod == "sync":
            entry.session.deliver(encode_errors([error]))

    async def _generate(
        self,
        entry: ProviderTask,
        index: int,
        seed: int,
        reference: asyncio.Future[bytes | None] | None,
    ) -> None:
        task = entry.task
        generation = entry.generations[index]
        try:
            await asyncio.sleep(self.faults.latency.sample(self._rng))
            image_uuid = str(self._uuid())
            if self.faults.fast:
                result = self._fast_result(task, image_uuid, seed)
            else:
                ref = await reference if reference is not None else None
                job = RenderJob(
                    task.positivePrompt,
                    seed,
                    task.width,
                    task.height,
                    task.outputFormat,
                    task.outputQuality,
                    ref,
                )
                result = self._result(task, image_uuid, seed, await self.pool.render(job))
        except RenderQueueFull as exc:
            self._generation_failed(entry, generation, "rateLimitExceeded", str(exc))
            return
        except _ReferenceError as exc:
            self._generation_failed(entry, generation, "invalidReferenceImages", str(exc))
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a render that failed must fail its task, never hang it
            log.exception("render failed")
            self._generation_failed(entry, generation, "providerError", f"Render failed: {exc}")
            return
        self.stats.images += 1
        generation.status, generation.result = "success", result
        if self.tasks.holds(entry) and task.deliveryMethod == "sync":
            entry.session.deliver(encode_data([result]))

    def _generation_failed(
        self, entry: ProviderTask, generation: Generation, code: str, message: str
    ) -> None:
        error = error_item(
            code, message=message, task_type="imageInference", task_uuid=entry.task.taskUUID
        )
        generation.status, generation.error = "error", error
        if self.tasks.holds(entry) and entry.task.deliveryMethod == "sync":
            entry.session.deliver(encode_errors([error]))

    def _uuid(self) -> uuid.UUID:
        return uuid.UUID(int=self._rng.getrandbits(128), version=4)

    def _result(self, task: ImageTask, image_uuid: str, seed: int, data: bytes) -> ImageResult:
        content_type = CONTENT_TYPES[task.outputFormat]
        extension = EXTENSIONS[task.outputFormat]
        url = b64 = data_uri = None
        # every image is kept on the host, whatever the output type: a later task may name it
        # by imageUUID as its reference image
        ttl = float(task.ttl) if isinstance(task.ttl, int) else None
        self.images.put(image_uuid, data, content_type, extension, ttl)
        if task.outputType == "URL":
            url = f"{self.public_url}/images/{image_uuid}.{extension}"
        else:
            encoded = base64.b64encode(data).decode()
            if task.outputType == "base64Data":
                b64 = encoded
            else:
                data_uri = f"data:{content_type};base64,{encoded}"
        return self._item(task, image_uuid, seed, url, b64, data_uri)

    def _fast_result(self, task: ImageTask, image_uuid: str, seed: int) -> ImageResult:
        url = f"{self.public_url}/images/fast/{image_uuid}.jpg"
        return self._item(task, image_uuid, seed, url, None, None)

    def _item(
        self,
        task: ImageTask,
        image_uuid: str,
        seed: int,
        url: str | None,
        b64: str | None,
        data_uri: str | None,
    ) -> ImageResult:
        cost = None
        if task.includeCost:
            model = self.catalogue.get(task.model)
            assert model is not None  # validated
            cost = model.price(task.width, task.height, 1)
        return ImageResult(
            taskType="imageInference",
            taskUUID=task.taskUUID,
            imageUUID=image_uuid,
            imageURL=url,
            imageBase64Data=b64,
            imageDataURI=data_uri,
            seed=seed,
            NSFWContent=False if task.safety_checked else None,
            cost=cost,
        )

    def _get_response(self, session: Session, request: GetResponse) -> None:
        entry = self.tasks.get(session.key, request.taskUUID)
        if entry is None:
            session.deliver(
                encode_errors(
                    [
                        error_item(
                            "taskNotFound",
                            parameter="taskUUID",
                            task_type="getResponse",
                            task_uuid=request.taskUUID,
                        )
                    ]
                )
            )
            return
        data: list[Any] = []
        failures: list[ErrorItem] = []  # a failure of the whole task is reported once
        for generation in entry.generations:
            if generation.status == "processing":
                data.append(ProcessingItem(taskType="imageInference", taskUUID=request.taskUUID))
            elif generation.result is not None:
                data.append(msgspec.structs.replace(generation.result, status="success"))
            elif generation.error is not None and generation.error not in failures:
                failures.append(generation.error)
        errors = [msgspec.structs.replace(error, status="error") for error in failures]
        for frame in encode_answer(data, errors):
            session.deliver(frame)

    # ------------------------------------------------------------------ reference images

    async def _reference(self, session: Session, task: ImageTask) -> bytes | None:
        image = task.reference_images[0].image
        if image.startswith(("http://", "https://")):
            return await self._fetch(image)
        if image.startswith("data:"):
            image = image.partition(",")[2]
        elif len(image) == 36 and image.count("-") == 4:
            stored = self.images.get(image)
            if stored is None:
                raise _ReferenceError(f"No image with imageUUID {image} on this provider.")
            return stored.data
        try:
            return base64.b64decode(image, validate=True)
        except binascii.Error as exc:
            raise _ReferenceError("The reference image is not valid base64.") from exc

    async def _fetch(self, url: str) -> bytes:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.reference_timeout)
            )
        limit = self.config.reference_max_bytes
        try:
            async with self._http.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise _ReferenceError(
                        f"Fetching the reference image got HTTP {response.status}."
                    )
                chunks: list[bytes] = []
                size = 0
                # read(n) returns what is buffered: read to the end, under the cap
                while chunk := await response.content.readany():
                    size += len(chunk)
                    if size > limit:
                        raise _ReferenceError(f"The reference image is larger than {limit} bytes.")
                    chunks.append(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _ReferenceError(f"Fetching the reference image failed: {exc!r}.") from exc
        return b"".join(chunks)

    # ------------------------------------------------------------------ HTTP routes

    async def _image_route(self, request: web.Request) -> web.StreamResponse:
        image_uuid, _, extension = request.match_info["name"].partition(".")
        stored = self.images.get(image_uuid)
        if stored is None or stored.extension != extension:
            raise web.HTTPNotFound()
        return web.Response(body=stored.data, content_type=stored.content_type)

    async def _fast_image_route(self, request: web.Request) -> web.StreamResponse:
        if self._fast_image is None:
            self._fast_image = encode_image(
                render_scene("a figure under a spotlight", 1, 1024, 1024), "JPG", 90
            )
        return web.Response(body=self._fast_image, content_type="image/jpeg")

    async def _get_faults(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=msgspec.json.encode(self.faults), content_type="application/json")

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

    async def _set_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            changes = msgspec.json.decode(await request.read(), type=dict[str, Any])
            self.faults = self.faults.updated(changes)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        return await self._get_faults(request)

    async def _forget(self, request: web.Request) -> web.StreamResponse:
        """As after a restart: every session and task forgotten, every connection dropped."""
        for work in list(self._work):
            work.cancel()
        self.sessions.clear()
        self.tasks.clear()
        for connection in list(self._connections):
            connection.session = None
            connection.outbox.clear()
            connection.abort()
        return web.Response(status=204)

    async def _get_stats(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=msgspec.json.encode(self.stats), content_type="application/json")


class _ReferenceError(Exception):
    """A reference image that cannot be had: the task fails with invalidReferenceImages."""
