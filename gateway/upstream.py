"""The provider side: persistent, authenticated WebSocket links that carry every client task.

A :class:`UpstreamLink` connects, authenticates (resuming its provider session when it has one),
keeps itself alive with app-level pings and a pong deadline, sends tasks in batches, and routes
every item it reads to the registry by taskUUID. When it breaks it reconnects with full-jitter
exponential backoff, and :mod:`gateway.recovery` decides what becomes of the tasks it had out.
Which task goes to which link, and when, is :mod:`gateway.pool`'s.

Every await on the network has a deadline: connect, auth, send, pong, close.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
import structlog
from msgspec import UNSET
from msgspec.structs import replace

from gateway.admission import Window
from gateway.backoff import full_jitter
from gateway.config import ProviderSettings
from gateway.metrics import Metrics
from gateway.recovery import LinkRecovery, Verdict
from gateway.store.base import TaskRecord
from gateway.store.states import TaskState
from gateway.tasks import TaskRegistry
from gateway.wsmsg import BINARY, TEXT
from protocol.codec import (
    decode_auth_reply,
    decode_error_item,
    decode_image_result,
    decode_route,
    decode_server_frame,
    encode_tasks,
)
from protocol.errors import error_item
from protocol.frames import Authentication, ErrorItem, GetResponse, ImageTask, Ping

__all__ = [
    "AuthRefused",
    "LinkState",
    "ProviderProtocolError",
    "UpstreamLink",
    "upstream_task",
]

log = structlog.get_logger("tenebra.upstream")


class LinkState(enum.StrEnum):
    DOWN = "down"
    CONNECTING = "connecting"
    AUTHENTICATING = "authenticating"
    READY = "ready"
    REFUSED = "refused"  # the provider refused our key; we keep retrying with backoff
    CLOSED = "closed"


class AuthRefused(Exception):
    """The provider answered the authentication with an error."""


class ProviderProtocolError(Exception):
    """The provider sent what the protocol does not allow where it sent it."""


# The provider's refusals before it accepts a task (capacity): unbilled, so the task may wait
# at the gateway and go again (Runware: 429, its queue is full).
# serviceUnavailable is not one of them: Runware also sends it for server errors, possibly after
# accepting (and billing) a task, and a second send must never be a guess.
UNBILLED_REFUSALS = frozenset(
    {"rateLimitExceeded", "inferenceRateLimitExceeded", "providerRateLimitExceeded"}
)

# What a provider connection can fail with that is the network's or the peer's doing: retried
# quietly. Anything else is a bug of ours, logged with its traceback, and retried all the same:
# one bad frame must never leave the gateway without a provider.
_NETWORK_ERRORS = (aiohttp.ClientError, TimeoutError, OSError, ConnectionError)
# What decoding a peer's bytes can raise (msgspec reports bad UTF-8 as UnicodeDecodeError, and
# very deep nesting as RecursionError).
_UNDECODABLE = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def upstream_task(task: ImageTask, upstream_uuid: str) -> ImageTask:
    """The task as the provider sees it: the gateway's UUID, results pushed to the gateway
    (sync, with cost, for accounting), and no webhook or upload, which the gateway does itself."""
    return replace(
        task,
        taskUUID=upstream_uuid,
        deliveryMethod="sync",
        includeCost=True,
        webhookURL=UNSET,
        uploadEndpoint=UNSET,
    )


class UpstreamLink:
    def __init__(
        self,
        index: int,
        url: str,
        api_key: str,
        settings: ProviderSettings,
        registry: TaskRegistry,
        metrics: Metrics,
        http: aiohttp.ClientSession,
        *,
        rng: random.Random,
        on_state: Callable[[UpstreamLink], None],
        on_unsent: Callable[[TaskRecord], None],
        on_refused: Callable[[UpstreamLink, TaskRecord, ErrorItem], None],
    ) -> None:
        self.index = index
        self.url = url
        self._api_key = api_key
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.http = http
        self._rng = rng
        self._on_state = on_state
        self._on_unsent = on_unsent
        self._on_refused = on_refused
        self.state = LinkState.DOWN
        self.session_uuid: str | None = None
        self.outbox: deque[TaskRecord] = deque()
        self._polls: deque[Ping | GetResponse] = deque()  # small frames, sent before tasks
        self._wakeup = asyncio.Event()
        self._pongs: dict[str, asyncio.Future[None]] = {}
        self._runner: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.connects = 0
        self._closing = False
        self._last_read = 0.0  # loop time of the last frame read
        self._send_started: float | None = None  # loop time the send in progress began
        self.recovery = LinkRecovery(rng.shuffle, resubmit_lost=settings.on_lost == "resubmit")
        self.window = Window(settings.max_in_flight)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name=f"upstream-link-{self.index}")

    async def close(self) -> None:
        self._closing = True
        self._set_state(LinkState.CLOSED)
        if self._runner is not None:
            self._runner.cancel()
            # the loop survives everything, but close() must not be where a bug surfaces
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner

    def _set_state(self, state: LinkState) -> None:
        self.state = state
        self.metrics.upstream_ready.labels(str(self.index)).set(state == LinkState.READY)
        if state == LinkState.READY:
            self.ready.set()
        else:
            self.ready.clear()
        self._on_state(self)

    async def _run(self) -> None:
        settings = self.settings
        delays = full_jitter(settings.backoff_initial, settings.backoff_max, self._rng)
        while not self._closing:
            try:
                await self._connection()
                delays = full_jitter(settings.backoff_initial, settings.backoff_max, self._rng)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # sorted and logged by _failed
                self._failed(exc)
            if self._closing:
                return
            if self.state != LinkState.REFUSED:
                self._set_state(LinkState.DOWN)
            self.metrics.upstream_reconnects.labels(str(self.index)).inc()
            await asyncio.sleep(next(delays))

    def _failed(self, exc: Exception) -> None:
        """Sort a connection's end, as websockets' ``process_exception`` does: the provider's
        refusal, the network, a provider that breaks the protocol, or a bug of ours."""
        if isinstance(exc, AuthRefused):
            kind = "refused"
            log.warning("provider refused authentication", link=self.index, reason=str(exc))
            self._set_state(LinkState.REFUSED)
        elif isinstance(exc, ProviderProtocolError):
            kind = "protocol"
            log.warning("provider broke the protocol", link=self.index, error=str(exc))
        elif isinstance(exc, _NETWORK_ERRORS):
            kind = "network"
            log.warning("provider link failed", link=self.index, error=repr(exc))
        else:
            kind = "bug"
            log.error("provider link failed unexpectedly", link=self.index, exc_info=exc)
        self.metrics.upstream_failures.labels(str(self.index), kind).inc()

    async def _connection(self) -> None:
        self._set_state(LinkState.CONNECTING)
        ws = await asyncio.wait_for(
            self.http.ws_connect(
                self.url,
                max_msg_size=self.settings.max_message_bytes,
                compress=0,
                autoping=True,
                timeout=aiohttp.ClientWSTimeout(ws_close=self.settings.send_timeout),
            ),
            self.settings.connect_timeout,
        )
        self.connects += 1
        parts: list[asyncio.Task[None]] = []
        failure: BaseException | None = None
        try:
            self._set_state(LinkState.AUTHENTICATING)
            resumed = await self._authenticate(ws)
            self._set_state(LinkState.READY)
            log.info("provider link ready", link=self.index, resumed=resumed)
            self._recover(resumed)
            parts = [
                asyncio.create_task(self._read(ws)),
                asyncio.create_task(self._write(ws)),
                asyncio.create_task(self._heartbeat()),
                asyncio.create_task(self._watch_sends()),
                asyncio.create_task(self._poll_orphans()),
            ]
            done, _ = await asyncio.wait(parts, return_when=asyncio.FIRST_COMPLETED)
            for part in done:
                part.result()  # a failure of one part ends the connection with its reason
        except BaseException as exc:  # raised again once the connection is cleaned up
            failure = exc
        # The clean-up awaits outside any handler, not in a finally: built with mypyc (make
        # compiled), a coroutine that awaits while it handles an exception leaves that exception
        # current for every other coroutine meanwhile (the Redis store's calls raised a failed
        # link's ConnectionError).
        for part in parts:
            part.cancel()
        for pong in self._pongs.values():
            pong.cancel()
        self._pongs.clear()
        self._requeue_unsent()  # before any await: a second cancel (a close under a deadline)
        try:  # must not keep the outbox's tasks from their queue
            await asyncio.gather(*parts, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), self.settings.send_timeout)
        except asyncio.CancelledError as cancelled:
            failure = cancelled
        if failure is not None:
            raise failure

    async def _authenticate(self, ws: aiohttp.ClientWebSocketResponse) -> bool:
        """Authenticate, resuming the provider session if there is one; True if it resumed."""
        auth = Authentication(apiKey=self._api_key, connectionSessionUUID=self.session_uuid)
        await asyncio.wait_for(
            ws.send_frame(encode_tasks([auth]), TEXT), self.settings.send_timeout
        )
        message = await ws.receive(timeout=self.settings.auth_timeout)
        if message.type is not TEXT and message.type is not BINARY:
            raise ConnectionError(f"the provider closed during authentication: {message.type}")
        try:
            frame = decode_server_frame(message.data)
            if frame.errors:
                raise AuthRefused(decode_error_item(frame.errors[0]).message)
            reply = decode_auth_reply(frame.data[0]) if frame.data else None
        except _UNDECODABLE as exc:
            raise ProviderProtocolError(f"unreadable authentication reply: {exc}") from None
        if reply is None:
            raise ProviderProtocolError("the provider's first frame was not the auth reply")
        resumed = reply.connectionSessionUUID == self.session_uuid
        self.session_uuid = reply.connectionSessionUUID
        return resumed

    def _recover(self, resumed: bool) -> None:
        """After a reconnect, ask the provider for the state of the tasks this link had out,
        as :class:`gateway.recovery.LinkRecovery` decides. Answers come back through the normal
        routing, de-duplicated by imageUUID, so a result that arrives both from the resumed
        session's buffer and from a poll counts once."""
        plan = self.recovery.reconnected(resumed)
        self._poll(plan.poll_now)
        if plan.recheck_later:
            asyncio.get_running_loop().call_later(
                self.settings.recovery_interval * 5, self._recheck, plan.recheck_later
            )

    def _recheck(self, upstream_uuids: list[str]) -> None:
        if self.state == LinkState.READY:
            self._poll(self.recovery.due_for_recheck(upstream_uuids))

    def _poll(self, upstream_uuids: list[str]) -> None:
        if not upstream_uuids:
            return
        store = self.registry.store
        for upstream_uuid in upstream_uuids:
            record = store.by_upstream(upstream_uuid)
            self.recovery.polled(upstream_uuid, record.sends if record is not None else 0)
            self._polls.append(GetResponse(taskUUID=upstream_uuid))
        self._wakeup.set()

    def _lost(self, upstream_uuid: str) -> None:
        """The provider answered a recovery poll with taskNotFound: resend, fail, or ignore,
        as the recovery rules say."""
        record = self.registry.store.by_upstream(upstream_uuid)
        if record is None or record.finished is not None:
            return
        verdict = self.recovery.not_found(
            upstream_uuid, sends=record.sends, resend_queued=record in self.outbox
        )
        if verdict is Verdict.RESEND or verdict is Verdict.RESUBMIT:
            if verdict is Verdict.RESEND:
                log.info("resending a task the provider never received", link=self.index)
            else:
                log.warning("resubmitting a task the provider lost (on_lost)", link=self.index)
            self.outbox.appendleft(record)
            self._wakeup.set()
        elif verdict is Verdict.FAIL:
            self.registry.on_error(
                upstream_uuid,
                error_item(
                    "providerError",
                    message="The provider lost this task (it restarted or forgot its session). "
                    "It was not submitted again, so it was not billed twice.",
                    task_type="imageInference",
                ),
            )

    async def _poll_orphans(self) -> None:
        while True:
            await asyncio.sleep(self.settings.recovery_interval)
            self._poll(self.recovery.orphans_due())

    def _requeue_unsent(self) -> None:
        """Tasks still in the outbox never left: the pool may send them on another link. Not a
        resend waiting here, though: the provider may hold that task after all, so it stays
        this link's, and the next connection's recovery asks about it again."""
        unsent = [r for r in self.outbox if r.upstream_uuid not in self.recovery.in_flight]
        self.outbox.clear()
        self._polls.clear()
        for record in unsent:
            self._on_unsent(record)

    # ------------------------------------------------------------------ the parts of a link

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        loop = asyncio.get_running_loop()
        self._last_read = loop.time()
        while True:
            message = await ws.receive()
            if message.type is TEXT or message.type is BINARY:
                self._last_read = loop.time()
                self.metrics.frames.provider_in += 1
                self._route(message.data)
            elif message.type == aiohttp.WSMsgType.ERROR:
                raise ConnectionError(f"provider link error: {ws.exception()!r}")
            elif message.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
            ):
                raise ConnectionError(f"the provider closed the link ({ws.close_code})")

    def _route(self, data: bytes | str) -> None:
        """Every item of a provider frame to its task. What does not decode, or does not fit
        its task's state, is counted and dropped: nothing a provider sends ends the link."""
        try:
            frame = decode_server_frame(data)
        except _UNDECODABLE:
            self._dropped("undecodable frame")
            return
        self._route_each(frame.data, False)
        self._route_each(frame.errors, True)

    def _route_each(self, items: list[msgspec.Raw], errors: bool) -> None:
        for raw in items:
            try:  # methods called, not passed: compiled, a bound method is called as Python
                if errors:
                    self._route_error(raw)
                else:
                    self._route_data(raw)
            except _UNDECODABLE:
                self._dropped("undecodable item")
            except Exception:  # a bug, or an item that fits no state: the link goes on
                self._dropped("unroutable item", traceback=True)

    def _route_data(self, raw: msgspec.Raw) -> None:
        try:  # nearly every item is an image: decoded once, as one
            image = decode_image_result(raw)
        except msgspec.DecodeError:
            pass
        else:
            if image.taskType != "ping":
                upstream_uuid = image.taskUUID
                self.recovery.heard(upstream_uuid)
                self.registry.on_image(upstream_uuid, image)
                return
        route = decode_route(raw)
        if route.taskType == "ping":
            pong = self._pongs.pop(route.taskUUID or "", None)
            if pong is not None and not pong.done():
                pong.set_result(None)
        elif route.taskUUID is not None:
            self.recovery.heard(route.taskUUID)
            self.registry.on_result(route.taskUUID, raw)

    def _route_error(self, raw: msgspec.Raw) -> None:
        error = decode_error_item(raw)
        upstream_uuid = error.taskUUID
        if upstream_uuid is None:
            log.warning("provider error without a task", link=self.index, code=error.code)
            return
        if error.taskType == "getResponse" and error.code == "taskNotFound":
            self._lost(upstream_uuid)
            return
        record = self.registry.store.by_upstream(upstream_uuid)
        if error.code == "conflictTaskUUID":
            sends = record.sends if record is not None else 0
            if self.recovery.conflict(upstream_uuid, sends=sends) is Verdict.POLL:
                return  # the provider had it after all; polled until it settles
        if (
            error.code in UNBILLED_REFUSALS
            and record is not None
            and record.state is TaskState.SUBMITTED
            and upstream_uuid in self.recovery.in_flight
        ):
            # refused before it was accepted: nothing billed, the task can wait and go again
            self.recovery.settled(upstream_uuid)
            self.window.refused(record.window_epoch)
            self._on_refused(self, record, error)
            return
        self.registry.on_error(upstream_uuid, error)

    def _dropped(self, reason: str, *, traceback: bool = False) -> None:
        self.metrics.provider_frames_dropped.labels(reason).inc()
        if traceback:
            log.error("provider item dropped", link=self.index, reason=reason, exc_info=True)
        else:
            log.warning("provider item dropped", link=self.index, reason=reason)

    async def _write(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        limit = self.settings.max_batch
        loop = asyncio.get_running_loop()
        self._send_started = None
        while True:
            if not self.outbox and not self._polls:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch: list[Any] = []
            while self._polls and len(batch) < limit:
                batch.append(self._polls.popleft())
            while self.outbox and len(batch) < limit:
                record = self.outbox.popleft()
                if record.finished is not None:
                    continue  # failed while it waited (its deadline, a shutdown)
                # handed to the provider from here on: after a failed send it is recovered by
                # getResponse, and sent again only if the provider says it never arrived
                if record.state in (TaskState.RECEIVED, TaskState.QUEUED):
                    self.registry.move(record, TaskState.SUBMITTED)
                record.sends += 1
                record.link = self.index
                record.window_epoch = self.window.epoch
                upstream_uuid = record.upstream_uuid
                self.recovery.sent(upstream_uuid)
                batch.append(upstream_task(record.task, upstream_uuid))
            if batch:
                self._send_started = loop.time()
                await ws.send_frame(encode_tasks(batch), TEXT)
                self._send_started = None
                self.metrics.frames.provider_out += 1

    async def _watch_sends(self) -> None:
        """The deadline of every send: one that waits for the provider to read (its socket
        full) longer than ``send_timeout`` ends the link. Checked from here, not with a
        timeout per send: nearly every send completes at once, and asyncio.wait_for per
        frame cost more than the frame."""
        loop = asyncio.get_running_loop()
        timeout = self.settings.send_timeout
        while True:
            await asyncio.sleep(timeout / 4)
            started = self._send_started
            if started is not None and loop.time() - started >= timeout:
                raise ConnectionError(f"the provider read nothing we sent for {timeout} s")

    async def _heartbeat(self) -> None:
        """Ping every ``ping_interval``; the link is dead when, after a ping, nothing at all
        arrives for ``pong_timeout``. A late pong behind a backlog of results is a busy link,
        not a dead one: any frame read counts as a sign of life."""
        loop = asyncio.get_running_loop()
        timeout = self.settings.pong_timeout
        while True:
            await asyncio.sleep(self.settings.ping_interval)
            token = str(uuid.uuid4())
            pong = loop.create_future()
            self._pongs[token] = pong
            self._polls.append(Ping(taskUUID=token))
            self._wakeup.set()
            while True:
                try:
                    await asyncio.wait_for(asyncio.shield(pong), timeout)
                    break
                except TimeoutError:
                    if loop.time() - self._last_read >= timeout:
                        raise ConnectionError(
                            f"nothing from the provider for {timeout} s after a ping"
                        ) from None

    # ------------------------------------------------------------------ tasks

    def enqueue(self, record: TaskRecord) -> None:
        self.outbox.append(record)
        self._wakeup.set()

    def settled(self, record: TaskRecord) -> None:
        self.recovery.settled(record.upstream_uuid)
