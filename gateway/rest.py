"""``POST /v1``: the REST twin of the WebSocket API.

Authenticated by ``Authorization: Bearer <key>`` or an ``authentication`` task as element 0.
Sync tasks answer when all their results are in, or when ``rest_sync_deadline`` passes: then the
task gets a ``timeout`` error item, keeps running, and stays available to ``getResponse``.
The answer is one JSON object with ``data`` and/or ``errors``; its status is 200 when anything
succeeded, else the status of the first error (400, 401, 404, 429, 503 ...); a 429 or 402 says
in ``Retry-After`` when trying again can help.

Keys are guarded per client address as on the WebSocket door (:class:`AuthThrottle`, shared
with it): a refused address gets 429 before anything is read, a wrong key a 401 that waits the
throttle's delay (that request only). A wrong bearer key is refused before the body is read;
the body is read within ``read_timeout`` (408 past it).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from aiohttp import web
from msgspec.structs import replace

from gateway.audit import key_id
from gateway.clients import too_many_failures
from gateway.dispatch import Answer, Dispatch
from gateway.intake import Intake, store_unavailable
from gateway.metrics import Metrics
from gateway.quotas import TokenBucket
from gateway.store.base import TaskRecord
from gateway.store.shared import StoreUnavailable
from gateway.tenants import hash_key
from gateway.throttle import AuthThrottle, ClientAddresses
from protocol.codec import encode
from protocol.errors import error_item, http_status
from protocol.frames import Authentication, ErrorItem, ImageTask

__all__ = ["RestEndpoint"]


class _Waiter:
    """A REST request waiting on one sync task."""

    def __init__(self) -> None:
        self.done = asyncio.Event()

    def deliver(self, record: TaskRecord, frame: bytes) -> None:
        pass  # the answer is read from the record once it settles

    def settled(self, record: TaskRecord) -> None:
        self.done.set()


class _RequestDoor:
    """One request, as the shared dispatch sees it. Its getResponse allowance is the burst
    alone: a request is answered at once, and its polls are as many as one frame's."""

    __slots__ = ("intake", "polls", "tenant", "waiting")

    def __init__(self, intake: Intake, tenant: str, polls: TokenBucket) -> None:
        self.intake = intake
        self.tenant: str | None = tenant
        self.polls = polls
        self.waiting: list[tuple[TaskRecord, _Waiter]] = []

    def authenticate(self, auth: Authentication, answer: Answer) -> None:
        pass  # only element 0 authenticates, before the dispatch

    def submit_sync(self, tenant: str, task: ImageTask) -> ErrorItem | None:
        waiter = _Waiter()
        record = self.intake.submit(tenant, task, waiter)
        if isinstance(record, ErrorItem):
            return record
        self.waiting.append((record, waiter))
        return None


class RestEndpoint:
    def __init__(
        self,
        intake: Intake,
        metrics: Metrics,
        *,
        sync_deadline: float,
        get_response_burst: int,
        throttle: AuthThrottle,
        addresses: ClientAddresses,
        read_timeout: float,
        keyless_body_bytes: int,
    ) -> None:
        self.intake = intake
        self.metrics = metrics
        self.dispatch = Dispatch(intake, metrics)
        self.sync_deadline = sync_deadline
        self.get_response_burst = get_response_burst
        self.throttle = throttle
        self.addresses = addresses
        self.read_timeout = read_timeout
        self.keyless_body_bytes = keyless_body_bytes

    async def handle(self, request: web.Request) -> web.StreamResponse:
        telemetry = self.intake.telemetry
        received = time.time_ns() if telemetry is not None else 0
        address = self._admitted_address(request)
        key = _bearer(request)
        tenant = None if key is None else self.intake.tenant_of(key)
        if key is not None and tenant is None:  # not worth reading the body of
            return await self._refused_late(address, key)
        # A body without a key in the header is read before anyone is known (its key may be
        # element 0): such reads count as unauthenticated connections of their address.
        keyless = tenant is None
        if keyless and not self.throttle.open_unauthenticated(address):
            raise web.HTTPTooManyRequests(
                text="too many unauthenticated requests from this address"
            )
        try:
            async with asyncio.timeout(self.read_timeout):
                body = await (self._read_keyless(request) if keyless else request.read())
        except TimeoutError:
            raise web.HTTPRequestTimeout(
                text=f"The request body did not arrive within {self.read_timeout:g} s."
            ) from None
        finally:
            if keyless:
                self.throttle.close_unauthenticated(address)
        outcomes = self.intake.decode(body)
        if outcomes and isinstance(outcomes[0], Authentication):
            key = outcomes[0].apiKey
            outcomes = outcomes[1:]
            tenant = self.intake.tenant_of(key)
        if tenant is None:
            return await self._refused_late(address, key)
        self.throttle.succeeded(address)

        polls = TokenBucket(0.0, self.get_response_burst, time.monotonic)
        door = _RequestDoor(self.intake, tenant, polls)
        answer = Answer()
        claims = await self.intake.claim(tenant, outcomes)
        assert key is not None  # a tenant was found by it
        self.intake.key_id = key_id(hash_key(key))  # its tasks' records carry it
        if telemetry is not None:  # its tasks continue the request's trace
            self.intake.frame_trace = telemetry.frame(telemetry.extract(request.headers), received)
        self.dispatch.frame(outcomes, door, answer, claims)
        data, errors = answer.data, answer.errors
        if door.waiting:
            await self._wait(door.waiting)
        for record, _ in door.waiting:
            data.extend(record.results)
            if record.error is not None:
                errors.append(record.error)
            elif record.open:
                self.metrics.errors.labels("timeout").inc()
                errors.append(
                    error_item(
                        "timeout",
                        message=f"The task did not finish within {self.sync_deadline} s. It "
                        "keeps running: poll it with getResponse.",
                        task_type="imageInference",
                        task_uuid=record.task_uuid,
                    )
                )
        return self._answer(data, errors, tenant)

    async def _read_keyless(self, request: web.Request) -> bytes:
        """The body of a request that names no key in its header, read only up to
        ``keyless_body_bytes``: before anyone is known, nobody gets to park 32 MiB here."""
        limit = self.keyless_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while not request.content.at_eof():
            chunk = await request.content.read(64 * 1024)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _wait(self, waiting: list[tuple[TaskRecord, _Waiter]]) -> None:
        pending = [asyncio.ensure_future(w.done.wait()) for r, w in waiting if r.open]
        if pending:
            await asyncio.wait(pending, timeout=self.sync_deadline)
        for future in pending:
            future.cancel()
        for record, waiter in waiting:
            self.intake.registry.unsubscribe(record, waiter)

    async def task_view(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/tasks/<taskUUID>``: the task of the bearer's tenant, with its deliveries."""
        address = self._admitted_address(request)
        key = _bearer(request)
        tenant = None if key is None else self.intake.tenant_of(key)
        if tenant is None:
            return await self._refused_late(address, key)
        self.throttle.succeeded(address)
        task_uuid = request.match_info["task_uuid"]
        record = self.intake.registry.lookup(tenant, task_uuid)
        if record is None and self.intake.replication is not None:  # another replica's
            try:
                record = await self.intake.replication.load(tenant, task_uuid)
            except StoreUnavailable as exc:
                self.metrics.errors.labels("serviceUnavailable").inc()
                error = store_unavailable(
                    "getResponse", task_uuid, str(exc), "the task could not be read"
                )
                return self._answer([], [error], tenant)
        if record is None:
            _, errors = self.intake.poll(tenant, task_uuid)
            for error in errors:
                self.metrics.errors.labels(error.code).inc()
            return self._answer([], errors, tenant)
        results, failure = record.results, record.error
        if record.task_uuid != task_uuid:  # asked in another case: answered in the one asked
            results = tuple(replace(r, taskUUID=task_uuid) for r in results)
            if failure is not None:
                failure = replace(failure, taskUUID=task_uuid)
        view = {
            "taskUUID": task_uuid,
            "taskType": "imageInference",
            "state": record.state.value,
            "numberResults": record.task.numberResults,
            "results": results,
            "error": failure,
            "deliveries": record.deliveries,
        }
        return web.Response(body=encode(view), content_type="application/json")

    def _admitted_address(self, request: web.Request) -> str:
        """The client's address, unless the throttle refuses it (429 with Retry-After)."""
        address = self.addresses.of(request.remote, request.headers.get("X-Forwarded-For"))
        refused = self.throttle.refused(address)
        if refused:
            raise too_many_failures(refused)
        return address

    async def _refused_late(self, address: str, key: str | None) -> web.Response:
        """401: no key at once; a wrong key after the throttle's delay for ``address`` (this
        request's own wait: nothing else is held up)."""
        code = "missingApiKey" if key is None else "invalidApiKey"
        if key is not None:
            delay = self.throttle.failed(address)
            if self.intake.audit is not None:
                refused_for = self.throttle.refused(address)
                self.intake.audit.auth_failed(address, code, "rest", refused_for)
            await asyncio.sleep(delay)
        self.metrics.errors.labels(code).inc()
        item = error_item(code, parameter="apiKey", task_type="authentication")
        return self._answer([], [item], None)

    def _answer(self, data: list[Any], errors: list[ErrorItem], tenant: str | None) -> web.Response:
        body: dict[str, Any] = {}
        if data:
            body["data"] = data
        if errors:
            body["errors"] = errors
        status = 200 if data or not errors else http_status(errors[0].code)
        headers = None
        if (status == 429 or status == 402) and tenant is not None:
            wait = self.intake.retry_after(tenant, errors[0].code)
            if wait is not None:  # whole seconds, at least 1
                headers = {"Retry-After": str(max(1, math.ceil(wait)))}
        return web.Response(
            body=encode(body), status=status, headers=headers, content_type="application/json"
        )


def _too_large(limit: int) -> web.HTTPRequestEntityTooLarge:
    return web.HTTPRequestEntityTooLarge(
        max_size=limit,
        actual_size=limit + 1,
        text=f"Without an Authorization header a request carries at most {limit} bytes; "
        "send the key as a Bearer token for larger ones.",
    )


def _bearer(request: web.Request) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, if there is one."""
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else None
