"""Webhooks and uploads: every result of a task that names a ``webhookURL`` or an
``uploadEndpoint`` goes there too, reliably, through the egress guard.

Webhooks: one POST per result and one per task failure; the flat item by default, the
``{"data": [...]}`` envelope per tenant; Standard Webhooks headers (``webhook-id`` stable across
retries, ``webhook-timestamp``, ``webhook-signature`` where the tenant has a secret).
Uploads: one PUT of the image bytes per result, with the output's Content-Type, ``{imageUUID}``
and ``{index}`` filled in.

Both: 2xx is success; anything else, a timeout or a connection error is retried with full-jitter
exponential backoff, ``attempts`` times in all; 410 Gone stops at once; a redirect is never
followed and is reported as such. At most ``per_host`` requests run against one host at a time,
so one slow receiver never starves the others.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog

from gateway.backoff import full_jitter
from gateway.config import DeliverySettings, Tenant
from gateway.delivery.egress import EgressGuard, EgressRefused
from gateway.metrics import Metrics
from gateway.store.base import Delivery, TaskRecord
from protocol.codec import encode
from protocol.frames import CONTENT_TYPES, ImageResult

__all__ = ["Deliveries", "read_capped", "sign"]

log = structlog.get_logger("tenebra.delivery")


def sign(secret: str, message_id: str, timestamp: str, body: bytes) -> str:
    """Standard Webhooks: ``v1,<base64 HMAC-SHA256 of id.timestamp.body>``, keyed by the
    base64 part of a ``whsec_`` secret."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(digest.digest()).decode()


def _display(url: str) -> str:
    """The URL without userinfo, query or fragment: credentials and presigned signatures
    never reach a log or a view."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=host, query="", fragment="").geturl()


def _fill(url: str, image_uuid: str, index: int) -> str:
    for name, value in (("imageUUID", image_uuid), ("index", str(index))):
        url = url.replace("{" + name + "}", value).replace("%7B" + name + "%7D", value)
    return url


class _Give(Exception):
    """Stop retrying: the outcome is final."""


class Deliveries:
    """The subscriber of every task with a webhook or an upload."""

    def __init__(
        self,
        settings: DeliverySettings,
        guard: EgressGuard,
        metrics: Metrics,
        tenants: dict[str, Tenant],
        *,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        #: origins (scheme://host:port) of the provider's own image host: operator
        #: configuration, not client input, so uploads fetch from them around the guard
        self.trusted_origins: set[str] = set()
        self.settings = settings
        self.guard = guard
        self.metrics = metrics
        self.tenants = tenants
        self._rng = rng or random.Random()
        self._wall_clock = wall_clock
        self._hosts: defaultdict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(settings.per_host)
        )
        self._running: set[asyncio.Task[None]] = set()
        self._http: aiohttp.ClientSession | None = None
        self._trusted_http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout)
        self._http = self.guard.session(timeout=timeout)
        self._trusted_http = aiohttp.ClientSession(timeout=timeout)

    async def close(self) -> None:
        for job in list(self._running):
            job.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        for session in (self._http, self._trusted_http):
            if session is not None:
                await session.close()

    async def drain(self, deadline: float) -> None:
        """Wait for pending deliveries up to ``deadline`` seconds; what is left stays pending in
        the records (a shared store hands it to another replica)."""
        if self._running:
            await asyncio.wait(list(self._running), timeout=deadline)

    @property
    def pending(self) -> int:
        return len(self._running)

    # ------------------------------------------------------------------ as a subscriber

    def deliver(self, record: TaskRecord, frame: bytes) -> None:
        task = record.task
        if record.error is not None and not record.open:
            if isinstance(task.webhookURL, str):
                failure: Any = record.error
                if self._envelope(record):
                    failure = {"errors": [record.error]}
                self._start(
                    record, "webhook", task.webhookURL, None, self._webhook(record, failure)
                )
            return
        result = record.results[-1]
        index = len(record.results) - 1
        if isinstance(task.webhookURL, str):
            item: Any = {"data": [result]} if self._envelope(record) else result
            post = self._webhook(record, item)
            self._start(record, "webhook", task.webhookURL, result.imageUUID, post)
        if isinstance(task.uploadEndpoint, str):
            url = _fill(task.uploadEndpoint, result.imageUUID, index)
            self._start(record, "upload", url, result.imageUUID, self._upload(record, result))

    def settled(self, record: TaskRecord) -> None:
        pass

    def _envelope(self, record: TaskRecord) -> bool:
        tenant = self.tenants.get(record.tenant)
        return tenant is not None and tenant.webhook_envelope

    # ------------------------------------------------------------------ the attempts

    def _start(
        self,
        record: TaskRecord,
        kind: str,
        url: str,
        image_uuid: str | None,
        request: Callable[[Delivery, str], Coroutine[Any, Any, int]],
    ) -> None:
        key = f"{record.upstream_uuid}:{kind}:{image_uuid or 'failure'}"
        delivery = Delivery(
            id="msg_" + uuid.uuid5(uuid.NAMESPACE_URL, key).hex,
            kind=kind,  # type: ignore[arg-type]
            target=_display(url),
            image_uuid=image_uuid,
        )
        record.deliveries.append(delivery)
        job = asyncio.create_task(self._attempts(record, delivery, url, request))
        self._running.add(job)
        job.add_done_callback(self._running.discard)

    async def _attempts(
        self,
        record: TaskRecord,
        delivery: Delivery,
        url: str,
        request: Callable[[Delivery, str], Coroutine[Any, Any, int]],
    ) -> None:
        settings = self.settings
        host = urlsplit(url).hostname or ""
        with structlog.contextvars.bound_contextvars(
            task_uuid=record.task_uuid, tenant=record.tenant, delivery=delivery.id
        ):
            delays = full_jitter(settings.backoff_initial, settings.backoff_max, self._rng)
            for attempt in range(settings.attempts):
                if attempt:
                    await asyncio.sleep(next(delays))
                delivery.attempts += 1
                try:
                    if reason := self.guard.refusal_for_url(url):
                        raise _Give(f"egress refused: {reason}")
                    async with self._hosts[host]:
                        status = await request(delivery, url)
                except _Give as final:
                    delivery.last_error = str(final)
                    break
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    delivery.last_status, delivery.last_error = None, _reason(exc)
                    if _refused(exc):
                        break  # the guard's answer will not change: no retries towards it
                    continue
                delivery.last_status = status
                if 200 <= status < 300:
                    delivery.state, delivery.last_error = "delivered", None
                    break
                if status == 410:
                    delivery.last_error = "410 Gone: the receiver asked to stop"
                    break
                delivery.last_error = f"HTTP {status}"
            if delivery.state != "delivered":
                delivery.state = "failed"
            self.metrics.deliveries.labels(delivery.kind, delivery.state).inc()
            log.info(
                "delivery " + delivery.state,
                kind=delivery.kind,
                target=delivery.target,
                attempts=delivery.attempts,
                last_status=delivery.last_status,
                last_error=delivery.last_error,
            )

    async def _send(self, method: str, url: str, body: bytes, headers: dict[str, str]) -> int:
        assert self._http is not None
        async with self._http.request(
            method, url, data=body, headers=headers, allow_redirects=False
        ) as response:
            await response.content.read(self.settings.max_response_bytes)
            if 300 <= response.status < 400:
                where = _display(response.headers.get("Location", "?"))
                raise _Give(f"HTTP {response.status}: redirect to {where} not followed")
            return response.status

    def _webhook(
        self, record: TaskRecord, item: Any
    ) -> Callable[[Delivery, str], Coroutine[Any, Any, int]]:
        body = encode(item)
        tenant = self.tenants.get(record.tenant)
        secret = tenant.webhook_secret if tenant else None

        async def post(delivery: Delivery, url: str) -> int:
            timestamp = str(int(self._wall_clock()))
            headers = {
                "Content-Type": "application/json",
                "webhook-id": delivery.id,
                "webhook-timestamp": timestamp,
            }
            if secret:
                headers["webhook-signature"] = sign(secret, delivery.id, timestamp, body)
            return await self._send("POST", url, body, headers)

        return post

    def _upload(
        self, record: TaskRecord, result: ImageResult
    ) -> Callable[[Delivery, str], Coroutine[Any, Any, int]]:
        content_type = CONTENT_TYPES[record.task.outputFormat]
        image: bytes | None = None  # fetched once for all the attempts of this upload

        async def put(delivery: Delivery, url: str) -> int:
            nonlocal image
            if image is None:
                image = await self._image_bytes(result)
            return await self._send("PUT", url, image, {"Content-Type": content_type})

        return put

    async def _image_bytes(self, result: ImageResult) -> bytes:
        encoded = result.imageBase64Data or (result.imageDataURI or "").partition(",")[2]
        if encoded:
            try:
                return base64.b64decode(encoded, validate=True)
            except binascii.Error as exc:
                raise _Give("the result's image data is not valid base64") from exc
        if not result.imageURL:
            raise _Give("the result has no image to upload")
        trusted = _origin(result.imageURL) in self.trusted_origins
        http = self._trusted_http if trusted else self._http
        assert http is not None
        limit = self.settings.max_image_bytes
        async with http.get(result.imageURL, allow_redirects=False) as response:
            if response.status != 200:
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status,
                    message="fetching the image from the provider",
                )  # fmt: skip
            data = await read_capped(response.content, limit)
        if data is None:
            raise _Give(f"the image is larger than {limit} bytes")
        return data


async def read_capped(content: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole body, or None past ``limit`` bytes. (``read(n)`` returns what is buffered,
    up to n: reading once is not reading it all.)"""
    chunks: list[bytes] = []
    size = 0
    while chunk := await content.readany():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _refused(exc: BaseException) -> bool:
    """Refused by the egress guard when the name resolved (aiohttp wraps the resolver's
    error in a connector error)."""
    return isinstance(exc, EgressRefused) or isinstance(
        getattr(exc, "os_error", None), EgressRefused
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    return f"{type(exc).__name__}: {exc}"
