"""The provider side: persistent, authenticated WebSocket links that carry every client task.

A :class:`UpstreamLink` connects, authenticates (resuming its provider session when it has one),
keeps itself alive with app-level pings and a pong deadline, sends tasks in batches, and routes
every item it reads to the registry by taskUUID. When it breaks it reconnects with full-jitter
exponential backoff. An :class:`UpstreamPool` spreads tasks over its links by least in flight and
holds tasks in a bounded queue while no link is ready.

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

from gateway.config import ProviderSettings
from gateway.metrics import Metrics
from gateway.store.base import TaskRecord, TaskState
from gateway.tasks import TaskRegistry
from protocol.codec import decode_error_item, decode_route, decode_server_frame, encode_tasks
from protocol.errors import error_item
from protocol.frames import Authentication, GetResponse, ImageTask, Ping

__all__ = ["AuthRefused", "LinkState", "UpstreamLink", "UpstreamPool", "upstream_task"]

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


def upstream_task(record: TaskRecord) -> ImageTask:
    """The task as the provider sees it: the gateway's UUID, results pushed to the gateway
    (sync, with cost, for accounting), and no webhook or upload, which the gateway does itself."""
    return msgspec.structs.replace(
        record.task,
        taskUUID=record.upstream_uuid,
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
        self.state = LinkState.DOWN
        self.session_uuid: str | None = None
        self.outbox: deque[TaskRecord] = deque()
        self._polls: deque[Ping | GetResponse] = deque()  # small frames, sent before tasks
        self.in_flight: set[str] = set()  # upstream UUIDs sent on this link and not final
        self._wakeup = asyncio.Event()
        self._pongs: dict[str, asyncio.Future[None]] = {}
        self._runner: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.connects = 0
        self._closing = False
        self.resumed = False  # did the current connection resume the provider session?
        self._last_read = 0.0  # loop time of the last frame read
        self._send_started: float | None = None  # loop time the send in progress began
        # tasks whose results went to a provider session that did not survive: polled until
        # they settle, since nothing will push their results to us any more
        self.orphans: set[str] = set()
        # a recovery poll's answer speaks only of the sends made before it: each poll keeps
        # the task's send count at the time it went out
        self._polled_at: dict[str, int] = {}
        # tasks the provider has acknowledged (any item about them) since their last send:
        # under a resumed session they need no urgent poll after a reconnect
        self._heard: set[str] = set()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name=f"upstream-link-{self.index}")

    async def close(self) -> None:
        self._closing = True
        self._set_state(LinkState.CLOSED)
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
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
        attempt = 0
        while not self._closing:
            try:
                await self._connection()
                attempt = 0
            except asyncio.CancelledError:
                raise
            except AuthRefused as exc:
                log.warning("provider refused authentication", link=self.index, reason=str(exc))
                self._set_state(LinkState.REFUSED)
            except (aiohttp.ClientError, TimeoutError, OSError, ConnectionError) as exc:
                log.warning("provider link failed", link=self.index, error=repr(exc))
            if self._closing:
                return
            if self.state != LinkState.REFUSED:
                self._set_state(LinkState.DOWN)
            self.metrics.upstream_reconnects.labels(str(self.index)).inc()
            # full jitter: a fleet of gateways never reconnects in step
            ceiling = min(self.settings.backoff_max, self.settings.backoff_initial * 2**attempt)
            attempt += 1
            await asyncio.sleep(self._rng.uniform(0, ceiling))

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
            try:
                done, _ = await asyncio.wait(parts, return_when=asyncio.FIRST_COMPLETED)
                for part in done:
                    part.result()  # a failure of one part ends the connection with its reason
            finally:
                for part in parts:
                    part.cancel()
                await asyncio.gather(*parts, return_exceptions=True)
        finally:
            for pong in self._pongs.values():
                pong.cancel()
            self._pongs.clear()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), self.settings.send_timeout)
            self._requeue_unsent()

    async def _authenticate(self, ws: aiohttp.ClientWebSocketResponse) -> bool:
        """Authenticate, resuming the provider session if there is one; True if it resumed."""
        auth = Authentication(apiKey=self._api_key, connectionSessionUUID=self.session_uuid)
        await asyncio.wait_for(
            ws.send_frame(encode_tasks([auth]), aiohttp.WSMsgType.TEXT), self.settings.send_timeout
        )
        message = await ws.receive(timeout=self.settings.auth_timeout)
        if message.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            raise ConnectionError(f"the provider closed during authentication: {message.type}")
        frame = decode_server_frame(message.data)
        if frame.errors:
            raise AuthRefused(decode_error_item(frame.errors[0]).message)
        reply = msgspec.json.decode(frame.data[0], type=dict[str, Any]) if frame.data else {}
        session = reply.get("connectionSessionUUID")
        if reply.get("taskType") != "authentication" or not isinstance(session, str):
            raise ConnectionError("the provider's first frame was not the authentication reply")
        resumed = session == self.session_uuid
        self.session_uuid = session
        return resumed

    def _recover(self, resumed: bool) -> None:
        """After a reconnect, ask the provider for the state of every task this link had out.

        Answers come back through the normal routing, de-duplicated by imageUUID, so a result
        that arrives both from the resumed session's buffer and from this poll counts once.
        A task the provider has no record of is handled by :meth:`_lost`. When the session did
        not resume, nothing will push the results of still-running tasks to us any more: they
        become orphans, polled every ``recovery_interval`` until they settle.
        """
        self.resumed = resumed
        if not self.in_flight:
            return
        if not resumed:
            self.orphans |= self.in_flight
            self._poll(list(self.in_flight))
            return
        # Urgent: the tasks the provider never acknowledged (their frame may have died with
        # the old socket). The others it holds, and their results come through the resumed
        # session; they get one recheck later, in case a result frame died in the break.
        # Polling everything at once would make recovery traffic grow with the load, and a
        # link that breaks under traffic would never get through it.
        self._poll(list(self.in_flight - self._heard))
        recheck = list(self.in_flight & self._heard)
        if recheck:
            asyncio.get_running_loop().call_later(
                self.settings.recovery_interval * 5, self._recheck, recheck
            )

    def _recheck(self, upstream_uuids: list[str]) -> None:
        if self.state == LinkState.READY:
            self._poll([u for u in upstream_uuids if u in self.in_flight])

    def _poll(self, upstream_uuids: list[str]) -> None:
        # A fresh order every round: answers come back in order, and a link that keeps
        # breaking must not starve the same tasks at the end of the list every time.
        self._rng.shuffle(upstream_uuids)
        for upstream_uuid in upstream_uuids:
            record = self.registry.store.by_upstream(upstream_uuid)
            self._polled_at[upstream_uuid] = record.sends if record is not None else 0
            self._polls.append(GetResponse(taskUUID=upstream_uuid))
        self._wakeup.set()

    def _lost(self, upstream_uuid: str) -> None:
        """The provider answered a recovery poll with taskNotFound.

        Under a resumed session the provider still knows every task it received, so this task
        never reached it (its frame died with the old socket): it is sent again, and billed
        once. That is safe however often it is confirmed; a link that loses everything is
        bounded by the task's own deadline (``tasks.timeout``). Under a new session the
        provider forgot (a restart): the task fails with a clear error and is not sent again,
        since it may have been received and billed.
        """
        record = self.registry.store.by_upstream(upstream_uuid)
        asked_at = self._polled_at.get(upstream_uuid)
        if record is None or not record.open:
            return
        if asked_at is None or record.sends > asked_at or record in self.outbox:
            return  # an answer older than the latest send, or a resend already on its way
        if self.resumed:
            log.info("resending a task the provider never received", link=self.index)
            self.outbox.appendleft(record)
            self._wakeup.set()
            return
        self.registry.on_error(
            upstream_uuid,
            error_item(
                "providerError",
                message="The provider lost this task (it restarted or forgot its session). "
                "It was not submitted again, so it was not billed twice.",
                task_type="imageInference",
            ),
        )

    def _already_there(self, upstream_uuid: str) -> bool:
        """A conflict in answer to a resend: the provider had the task after all (its earlier
        frame was still being read when it answered taskNotFound). It refused the copy, so
        nothing was billed twice; the task is polled until it settles."""
        record = self.registry.store.by_upstream(upstream_uuid)
        if record is None or record.sends < 2:
            return False
        self.orphans.add(upstream_uuid)
        return True

    async def _poll_orphans(self) -> None:
        while True:
            await asyncio.sleep(self.settings.recovery_interval)
            if self.orphans:
                self._poll(list(self.orphans))

    def _requeue_unsent(self) -> None:
        """Tasks still in the outbox never left: the pool may send them on another link."""
        unsent = list(self.outbox)
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
            if message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
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
        try:
            frame = decode_server_frame(data)
        except msgspec.DecodeError:
            log.warning("unreadable frame from the provider", link=self.index)
            return
        registry = self.registry
        for raw in frame.data:
            try:
                route = decode_route(raw)
            except msgspec.DecodeError:
                continue
            if route.taskType == "ping":
                pong = self._pongs.pop(route.taskUUID or "", None)
                if pong is not None and not pong.done():
                    pong.set_result(None)
            elif route.taskUUID is not None:
                if route.taskUUID in self.in_flight:  # a stray item must not be remembered
                    self._heard.add(route.taskUUID)
                registry.on_result(route.taskUUID, raw)
        for raw in frame.errors:
            try:
                error = decode_error_item(raw)
            except msgspec.DecodeError:
                continue
            if error.taskUUID is not None:
                if error.taskType == "getResponse" and error.code == "taskNotFound":
                    self._lost(error.taskUUID)
                elif error.code == "conflictTaskUUID" and self._already_there(error.taskUUID):
                    continue
                else:
                    registry.on_error(error.taskUUID, error)
            else:
                log.warning("provider error without a task", link=self.index, code=error.code)

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
                if not record.open:
                    continue  # failed while it waited (its deadline, a shutdown)
                # handed to the provider from here on: after a failed send it is recovered by
                # getResponse, and sent again only if the provider says it never arrived
                if record.state in (TaskState.RECEIVED, TaskState.QUEUED):
                    self.registry.move(record, TaskState.SUBMITTED)
                record.sends += 1
                self._heard.discard(record.upstream_uuid)
                record.link = self.index
                self.in_flight.add(record.upstream_uuid)
                batch.append(upstream_task(record))
            if batch:
                self._send_started = loop.time()
                await ws.send_frame(encode_tasks(batch), aiohttp.WSMsgType.TEXT)
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
        self.in_flight.discard(record.upstream_uuid)
        self.orphans.discard(record.upstream_uuid)
        self._polled_at.pop(record.upstream_uuid, None)
        self._heard.discard(record.upstream_uuid)


class UpstreamPool:
    """N links; tasks go to the ready link with the fewest in flight, or wait (bounded)."""

    def __init__(
        self,
        url: str,
        api_key: str,
        settings: ProviderSettings,
        registry: TaskRegistry,
        metrics: Metrics,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self._rng = rng or random.Random()
        self._url = url
        self._api_key = api_key
        self.pending: deque[tuple[float, TaskRecord]] = deque()  # (queued at, task)
        self.links: list[UpstreamLink] = []
        self._http: aiohttp.ClientSession | None = None
        self._watch: asyncio.Task[None] | None = None
        registry.on_final.append(self._settled)

    async def start(self) -> None:
        self._http = aiohttp.ClientSession()
        for index in range(self.settings.links):
            link = UpstreamLink(
                index,
                self._url,
                self._api_key,
                self.settings,
                self.registry,
                self.metrics,
                self._http,
                rng=self._rng,
                on_state=self._link_changed,
                on_unsent=self._resubmit,
            )
            self.links.append(link)
            link.start()
        self._watch = asyncio.create_task(self._watch_outage())

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for link in self.links:
            await link.close()
        if self._http is not None:
            await self._http.close()

    @property
    def ready(self) -> bool:
        return any(link.state == LinkState.READY for link in self.links)

    @property
    def refused(self) -> bool:
        return bool(self.links) and all(link.state == LinkState.REFUSED for link in self.links)

    async def wait_ready(self) -> None:
        """Until some link is ready; bound it with asyncio.timeout."""
        while not self.ready:
            waits = [asyncio.ensure_future(link.ready.wait()) for link in self.links]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()

    def submit(self, record: TaskRecord) -> None:
        chosen, least = None, 0
        for link in self.links:
            if link.state == LinkState.READY:
                load = len(link.in_flight) + len(link.outbox)
                if chosen is None or load < least:
                    chosen, least = link, load
        if chosen is not None:
            chosen.enqueue(record)
            return
        if self.refused:
            self._unavailable(record, "The provider refuses the gateway's API key; the gateway "
                              "keeps retrying. Retry with backoff.")  # fmt: skip
            return
        if len(self.pending) >= self.settings.max_queued:
            self._unavailable(record, f"The provider is unreachable and "
                              f"{self.settings.max_queued} tasks already wait for it. "
                              "Retry with backoff.")  # fmt: skip
            return
        if record.state == TaskState.RECEIVED:
            self.registry.move(record, TaskState.QUEUED)
        self.pending.append((self.registry.now(), record))

    def _unavailable(self, record: TaskRecord, message: str) -> None:
        self.registry.fail(
            record,
            error_item(
                "serviceUnavailable",
                message=message,
                task_type="imageInference",
                task_uuid=record.task_uuid,
            ),
        )

    async def _watch_outage(self) -> None:
        """Tasks wait for a link at most ``outage_deadline``: then a clear error, not a hang."""
        deadline = self.settings.outage_deadline
        while True:
            await asyncio.sleep(min(1.0, deadline / 4))
            horizon = self.registry.now() - deadline
            while self.pending and self.pending[0][0] <= horizon:
                _, record = self.pending.popleft()
                if record.open:
                    self._unavailable(record, f"No provider link for {deadline:g} s. Retry "
                                      "with backoff.")  # fmt: skip

    def _resubmit(self, record: TaskRecord) -> None:
        if record.open:
            self.submit(record)

    def _link_changed(self, link: UpstreamLink) -> None:
        if link.state == LinkState.READY:
            while self.pending and link.state == LinkState.READY:
                _, record = self.pending.popleft()
                if record.open:
                    link.enqueue(record)
        elif self.refused:
            while self.pending:
                _, record = self.pending.popleft()
                if record.open:
                    self._unavailable(record, "The provider refuses the gateway's API key.")

    def _settled(self, record: TaskRecord) -> None:
        if record.link is not None and record.link < len(self.links):
            self.links[record.link].settled(record)
