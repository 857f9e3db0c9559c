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

Durability (jobs.py, holds.py): with Redis every delivery is a job held by the replica that runs
it and acked at its final outcome. One killed mid-retries leaves its jobs pending; another claims
them a lease later and goes on from the recorded attempts and next attempt time, with the same
``webhook-id`` and body, signed with its own copy of the tenant's secret: at least once. Redis
unreachable when a delivery starts costs only durability (it runs in memory;
``tenebra_delivery_not_durable_total``). So does Redis restarting empty under a running job:
its replica runs it on in memory (``Hold.FORGOTTEN`` in jobs.py), counted there too, and logged.
A job's hash in Redis expires a while after its last write (``job_ttl`` in ``__init__``).
``on_outcome`` reports every attempt, since the replica that runs a job may not hold its task
record.

Nothing here dies silently: an attempt that raises what no receiver causes (a bug, a job from
another version) fails the job at once, logged with its traceback, instead of killing its task
and leaving the job to be claimed and crash again, a lease later, for ever; the keeper logs what
it did not expect and goes on after a bounded backoff. Memory: every job held is in
``Holds.entries`` (at most ``max_jobs``); per-host semaphores exist only while a delivery to that
host runs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import structlog

from gateway.backoff import full_jitter
from gateway.config import DeliverySettings, Tenant
from gateway.delivery.egress import EgressGuard
from gateway.delivery.holds import Holds
from gateway.delivery.jobs import DeliveryJob, DeliveryJobs, MemoryJobs
from gateway.delivery.sending import (
    Final,
    display,
    fetch_image,
    fill,
    origin,
    read_capped,
    reason,
    refused,
    send,
    sign,
)
from gateway.metrics import Metrics
from gateway.store.base import Delivery, TaskRecord
from gateway.store.shared import StoreUnavailable
from protocol.codec import encode
from protocol.frames import CONTENT_TYPES

__all__ = ["Deliveries", "OnOutcome", "read_capped", "sign"]

log = structlog.get_logger("tenebra.delivery")


def _stop_if_cancelled() -> None:
    """After a Redis call: the client may swallow a cancellation that lands inside it (seen
    with redis-py), and a task that goes on after ``cancel()`` makes ``close`` wait for ever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


#: called with (tenant, client taskUUID, delivery) after every attempt and at the final outcome
OnOutcome = Callable[[str, str, Delivery], None]


class Deliveries:
    """The subscriber of every task with a webhook or an upload, and the runner of delivery jobs
    (its own, and those it claims from dead replicas)."""

    def __init__(
        self,
        settings: DeliverySettings,
        guard: EgressGuard,
        metrics: Metrics,
        tenants: dict[str, Tenant],
        *,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
        jobs: DeliveryJobs | None = None,
        replica: str = "local",
        lease: float = 5.0,
        on_outcome: OnOutcome | None = None,
        max_jobs: int = 4096,
        claim_batch: int = 64,
    ) -> None:
        #: origins (scheme://host:port) of the provider's own image host: operator
        #: configuration, not client input, so uploads fetch from them around the guard
        self.trusted_origins: set[str] = set()
        self.settings = settings
        self.guard = guard
        self.metrics = metrics
        self.tenants = tenants
        self.on_outcome = on_outcome
        # Twice the longest a job can take from its creation (each attempt an upload's fetch
        # and PUT, each backoff its longest), for the leases lost to takeovers and the time in
        # Redis before a claim, and ten leases more: a hash never expires while its job could
        # still be tried, and every progress write starts it again.
        job_ttl = 2 * settings.attempts * (2 * settings.timeout + settings.backoff_max) + 10 * lease
        self.holds = Holds(
            jobs or MemoryJobs(),
            replica=replica,
            lease=lease,
            max_jobs=max_jobs,
            claim_batch=claim_batch,
            ttl=job_ttl,
            on_forgotten=self._forgotten,
        )
        self._rng = rng or random.Random()
        self._wall_clock = wall_clock
        # host -> (its semaphore, deliveries using it): dropped at zero, else one per host ever
        # delivered to, for the life of the process
        self._hosts: dict[str, tuple[asyncio.Semaphore, int]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._by_id: dict[str, asyncio.Task[None]] = {}
        self._keeper: asyncio.Task[None] | None = None
        self._claiming = True
        self._outage = False
        self._http: aiohttp.ClientSession | None = None
        self._trusted_http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the HTTP sessions; with a durable backend, start refreshing and claiming jobs."""
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout)
        self._http = self.guard.session(timeout=timeout)
        self._trusted_http = aiohttp.ClientSession(timeout=timeout)
        if self.holds.jobs.durable:
            self._keeper = asyncio.create_task(self._keep())

    async def close(self) -> None:
        """Stop at once. Nothing is acked: durable jobs still pending stay in Redis, and another
        replica claims them a lease later. The backend's connection is the caller's to close."""
        tasks = [*self._running, *([self._keeper] if self._keeper else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._keeper = None
        for session in (self._http, self._trusted_http):
            if session is not None:
                await session.close()

    async def drain(self, deadline: float) -> None:
        """Stop claiming, and wait for the deliveries running here up to ``deadline`` seconds.
        What is left is not acked: in Redis it stays pending for another replica (which takes it
        a lease after ``close``); in memory it stays pending in the records."""
        self._claiming = False
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
                self._start(record, "webhook", task.webhookURL, None, body=encode(failure))
            return
        result = record.results[-1]
        index = len(record.results) - 1
        if isinstance(task.webhookURL, str):
            item: Any = {"data": [result]} if self._envelope(record) else result
            self._start(record, "webhook", task.webhookURL, result.imageUUID, body=encode(item))
        if isinstance(task.uploadEndpoint, str):
            encoded = result.imageBase64Data or (result.imageDataURI or "").partition(",")[2]
            self._start(
                record,
                "upload",
                fill(task.uploadEndpoint, result.imageUUID, index),
                result.imageUUID,
                content_type=CONTENT_TYPES[task.outputFormat],
                image_url=result.imageURL,
                image_base64=encoded or None,
            )

    def settled(self, record: TaskRecord) -> None:
        pass

    def _envelope(self, record: TaskRecord) -> bool:
        tenant = self.tenants.get(record.tenant)
        return tenant is not None and tenant.webhook_envelope

    def _start(
        self,
        record: TaskRecord,
        kind: Literal["webhook", "upload"],
        url: str,
        image_uuid: str | None,
        **what: Any,
    ) -> None:
        key = f"{record.upstream_uuid}:{kind}:{image_uuid or 'failure'}"
        job = DeliveryJob(
            kind=kind,
            id="msg_" + uuid.uuid5(uuid.NAMESPACE_URL, key).hex,
            tenant=record.tenant,
            task_uuid=record.task_uuid,
            upstream_uuid=record.upstream_uuid,
            url=url,
            image_uuid=image_uuid,
            **what,
        )
        delivery = Delivery(id=job.id, kind=kind, target=display(url), image_uuid=image_uuid)
        record.deliveries = (*record.deliveries, delivery)
        self._spawn(job, delivery, None)

    def _spawn(self, job: DeliveryJob, delivery: Delivery, entry: str | None) -> None:
        run = asyncio.create_task(self._run(job, delivery, entry))
        self._running.add(run)
        self._by_id[job.id] = run
        run.add_done_callback(self._running.discard)

    # ------------------------------------------------------------------ one job

    async def _run(self, job: DeliveryJob, delivery: Delivery, entry: str | None) -> None:
        """``entry`` None: a new delivery, made durable here first (a claimed job has one)."""
        with structlog.contextvars.bound_contextvars(
            task_uuid=job.task_uuid, tenant=job.tenant, delivery=job.id
        ):
            try:
                if entry is None and self.holds.jobs.durable:
                    entry = await self._enlist(job)
                    if entry == "":
                        return
                await self._attempts(job, delivery, entry)
            except Exception:
                # a task's exception is only seen when it is collected: log it now
                log.exception("delivery job failed unexpectedly")
            finally:
                if entry:  # not "": a job held elsewhere keeps its hold here, if it is ours
                    self.holds.release(job.id)
                if self._by_id.get(job.id) is asyncio.current_task():
                    del self._by_id[job.id]

    async def _enlist(self, job: DeliveryJob) -> str | None:
        """The job's entry; None when it runs in memory only (Redis unavailable); "" when it
        is not to run here (see Holds.add)."""
        try:
            entry = await self.holds.add(job)
            _stop_if_cancelled()
        except StoreUnavailable as exc:
            _stop_if_cancelled()
            self.metrics.delivery_not_durable.inc()
            if not self._outage:
                self._outage = True
                log.warning("deliveries not durable: redis unavailable", error=str(exc))
            return None
        if self._outage:
            self._outage = False
            log.info("deliveries durable again")
        return "" if entry is None else entry

    async def _attempts(self, job: DeliveryJob, delivery: Delivery, entry: str | None) -> None:
        settings = self.settings
        try:
            host = urlsplit(job.url).hostname or ""
        except ValueError:
            host = ""  # refused below by the guard, as any URL it cannot read
        delays = full_jitter(settings.backoff_initial, settings.backoff_max, self._rng)
        # a continued job backs off from where it was, not from the first ceiling
        delays = itertools.islice(delays, job.attempts, None)
        if job.attempts:
            # capped: another replica's clock may be ahead of ours
            wait = min(job.next_at - self._wall_clock(), settings.backoff_max)
            if wait > 0:
                await asyncio.sleep(wait)
        image: bytes | None = None  # fetched once for all the attempts made here
        delivered = False
        while job.attempts < settings.attempts:
            job.attempts += 1
            try:
                if refusal := self.guard.refusal_for_url(job.url):
                    raise Final(f"egress refused: {refusal}")
                async with self._host(host):
                    if job.kind == "upload":
                        if image is None:
                            image = await self._image_bytes(job)
                        headers = {"Content-Type": job.content_type}
                        status = await self._send("PUT", job.url, image, headers)
                    else:
                        status = await self._send("POST", job.url, job.body, self._headers(job))
            except Final as final:
                job.last_error = str(final)
                break
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                job.last_status, job.last_error = None, reason(exc)
                if refused(exc):
                    break  # the guard's answer will not change: no retries towards it
            except Exception as exc:
                # not the receiver's doing, and not something a retry mends: a bug, or a job
                # this version cannot perform
                log.exception("delivery attempt failed unexpectedly")
                job.last_status, job.last_error = None, f"internal error: {type(exc).__name__}"
                break
            else:
                job.last_status = status
                if 200 <= status < 300:
                    job.last_error, delivered = None, True
                    break
                if status == 410:
                    job.last_error = "410 Gone: the receiver asked to stop"
                    break
                job.last_error = f"HTTP {status}"
            if job.attempts >= settings.attempts:
                break
            delay = next(delays)
            job.next_at = self._wall_clock() + delay
            if not await self._progress(job, delivery, entry):
                log.info("delivery taken over by another replica", attempts=job.attempts)
                return
            await asyncio.sleep(delay)
        await self._finish(job, delivery, entry, "delivered" if delivered else "failed")

    async def _progress(self, job: DeliveryJob, delivery: Delivery, entry: str | None) -> bool:
        """Recorded (in Redis when durable), then reported; False when the job is not ours."""
        if entry is not None:
            held = await self.holds.progress(entry, job)
            _stop_if_cancelled()
            if not held:
                return False
        self._report(job, delivery, "pending")
        return True

    async def _finish(
        self,
        job: DeliveryJob,
        delivery: Delivery,
        entry: str | None,
        state: Literal["delivered", "failed"],
    ) -> None:
        self.metrics.deliveries.labels(job.kind, state).inc()
        self._report(job, delivery, state)
        log.info(
            "delivery " + state,
            kind=job.kind,
            target=delivery.target,
            attempts=job.attempts,
            last_status=job.last_status,
            last_error=job.last_error,
        )
        if entry is None:
            return
        await self.holds.finish(entry, job)

    def _forgotten(self, delivery_id: str) -> None:
        self.metrics.delivery_not_durable.inc()

    @contextlib.asynccontextmanager
    async def _host(self, host: str) -> AsyncIterator[None]:
        """At most ``per_host`` requests to ``host`` at a time."""
        semaphore, users = self._hosts.get(host) or (asyncio.Semaphore(self.settings.per_host), 0)
        self._hosts[host] = (semaphore, users + 1)
        try:
            async with semaphore:
                yield
        finally:
            semaphore, users = self._hosts[host]
            if users == 1:
                del self._hosts[host]
            else:
                self._hosts[host] = (semaphore, users - 1)

    def _report(self, job: DeliveryJob, delivery: Delivery, state: Any) -> None:
        delivery.state, delivery.attempts = state, job.attempts
        delivery.last_status, delivery.last_error = job.last_status, job.last_error
        if self.on_outcome is not None:
            try:
                self.on_outcome(job.tenant, job.task_uuid, delivery)
            except Exception:
                log.exception("on_outcome failed")

    # ------------------------------------------------------------------ the keeper

    async def _keep(self) -> None:
        """Every third of the lease: see Holds.keep. Neither Redis failing nor anything else
        stops it (a keeper that died would leave every job here to be taken over and run twice):
        it is delayed by a bounded backoff, never longer than a period more."""
        period = self.holds.lease / 3
        failures = full_jitter(period / 4, period, self._rng)
        down = False
        while True:
            try:
                taken, claimed = await self.holds.keep(self._claiming)
                _stop_if_cancelled()
                for delivery_id in taken:
                    if run := self._by_id.get(delivery_id):
                        log.info("delivery taken over by another replica", delivery=delivery_id)
                        run.cancel()
                for entry, job in claimed:
                    try:
                        self._start_claimed(entry, job)
                    except Exception:
                        # one job must not leave the others of this claim held and never run
                        log.exception("delivery claimed but not started", delivery=job.id)
                        self.holds.release(job.id)  # back to the claimers, a lease later
            except Exception as exc:
                _stop_if_cancelled()
                if not isinstance(exc, StoreUnavailable):
                    log.exception("delivery jobs: keeping failed")
                elif not down:
                    log.warning("delivery jobs: redis unavailable", error=str(exc))
                down = True
                await asyncio.sleep(period / 8 + next(failures))
                continue
            if down:
                log.info("delivery jobs: redis answers again")
                down, failures = False, full_jitter(period / 4, period, self._rng)
            await asyncio.sleep(period)

    def _start_claimed(self, entry: str, job: DeliveryJob) -> None:
        log.info("delivery claimed", delivery=job.id, attempts=job.attempts)
        try:
            target = display(job.url)
        except ValueError:
            target = "(not a URL)"  # its attempt fails it: see _attempts
        delivery = Delivery(
            id=job.id,
            kind=job.kind,
            target=target,
            image_uuid=job.image_uuid,
            attempts=job.attempts,
            last_status=job.last_status,
            last_error=job.last_error,
        )
        self._spawn(job, delivery, entry)

    # ------------------------------------------------------------------ HTTP

    async def _send(self, method: str, url: str, body: bytes, headers: dict[str, str]) -> int:
        assert self._http is not None
        return await send(self._http, method, url, body, headers, self.settings.max_response_bytes)

    def _headers(self, job: DeliveryJob) -> dict[str, str]:
        """Signed at each attempt with this replica's copy of the tenant's secret: a job carries
        no secret, and a rotated secret applies from the next attempt."""
        timestamp = str(int(self._wall_clock()))
        headers = {
            "Content-Type": job.content_type,
            "webhook-id": job.id,
            "webhook-timestamp": timestamp,
        }
        tenant = self.tenants.get(job.tenant)
        if tenant is not None and tenant.webhook_secret:
            headers["webhook-signature"] = sign(tenant.webhook_secret, job.id, timestamp, job.body)
        return headers

    async def _image_bytes(self, job: DeliveryJob) -> bytes:
        if job.image_base64:
            try:
                return base64.b64decode(job.image_base64, validate=True)
            except binascii.Error as exc:
                raise Final("the result's image data is not valid base64") from exc
        if not job.image_url:
            raise Final("the result has no image to upload")
        trusted = origin(job.image_url) in self.trusted_origins
        http = self._trusted_http if trusted else self._http
        assert http is not None
        return await fetch_image(http, job.image_url, self.settings.max_image_bytes)
