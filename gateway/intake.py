"""Where client tasks come in, by WebSocket or REST alike: checked, registered, handed on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
from msgspec import UNSET

from gateway.audit import Audit, quota_limit
from gateway.delivery.egress import EgressGuard
from gateway.metrics import Metrics
from gateway.pool import UpstreamPool
from gateway.quotas import TenantQuotas
from gateway.replication import FrameClaims, Replication
from gateway.store.base import TaskRecord
from gateway.store.shared import StoreUnavailable
from gateway.tasks import Subscriber, TaskRegistry, conflict
from gateway.tenants import TenantTable
from protocol.codec import Outcome, decode_client_frame
from protocol.errors import error_item
from protocol.frames import Authentication, ErrorItem, GetResponse, ImageTask, TaskAck
from protocol.models import Catalogue

if TYPE_CHECKING:
    from gateway.telemetry import FrameTrace, Telemetry

__all__ = ["Intake"]

log = structlog.get_logger("tenebra.intake")


class Intake:
    def __init__(
        self,
        catalogue: Catalogue,
        registry: TaskRegistry,
        pool: UpstreamPool,
        tenants: TenantTable,
        metrics: Metrics,
        *,
        max_tasks_per_frame: int,
        guard: EgressGuard,
        deliveries: Subscriber,
        quotas: TenantQuotas,
        replication: Replication | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.registry = registry
        self.pool = pool
        self.tenants = tenants
        self.checked = tenants.checked  # tenants with limits to check per task, by name
        self.quotas = quotas
        self.metrics = metrics
        self.max_tasks_per_frame = max_tasks_per_frame
        self.guard = guard
        self.deliveries = deliveries
        self.accepting = True  # False while the gateway drains for shutdown
        self.replication = replication  # None: one replica, nothing shared
        if replication is not None:
            replication.rated = self._rated
            replication.take_tokens = self._take_tokens
        # the claims of the frame being dispatched (set around a synchronous dispatch only)
        self.frame: FrameClaims | None = None
        # who sent the frame being dispatched, set by its door before each (synchronous)
        # dispatch: the key id its tasks' records carry (gateway.audit.key_id), and while
        # tracing, the frame's trace context
        self.key_id: str | None = None
        self.frame_trace: FrameTrace | None = None
        self.audit: Audit | None = None  # limit hits, when the audit is on
        self.telemetry: Telemetry | None = None  # when tracing

    def tenant_of(self, api_key: str) -> str | None:
        return self.tenants.tenant_of(api_key)

    def use_tenants(self, table: TenantTable) -> None:
        """A reload's table, from the next authentication and the next task on."""
        self.tenants = table
        self.checked = table.checked

    def connect(self, tenant: str) -> ErrorItem | None:
        """A socket authenticated as ``tenant``: the error that refuses it past the tenant's
        ``max_connections``; otherwise to be matched by :meth:`disconnect` when it closes."""
        refused = self.quotas.connect(tenant, self.tenants.policies.get(tenant))
        if refused is not None:
            self.metrics.errors.labels(refused.code).inc()
            if self.audit is not None:
                self.audit.limit(tenant, "tenant_max_connections", refused.code, self.key_id)
        return refused

    def may_connect(self, tenant: str) -> bool:
        """Whether :meth:`connect` would let a socket of ``tenant`` in now (nothing counted)."""
        return self.quotas.has_room(tenant, self.tenants.policies.get(tenant))

    def disconnect(self, tenant: str) -> None:
        self.quotas.disconnect(tenant)

    def retry_after(self, tenant: str, code: str) -> int | None:
        """``Retry-After`` (s) for a REST answer whose status comes from ``code``."""
        return self.quotas.retry_after(tenant, code)

    def decode(self, frame: bytes) -> list[Outcome]:
        return decode_client_frame(frame, self.catalogue, max_tasks=self.max_tasks_per_frame)

    def submit(
        self, tenant: str, task: ImageTask, subscriber: Subscriber | None
    ) -> TaskRecord | ErrorItem:
        """Register and send on; the ack of an async task is the caller's to send first."""
        if not self.accepting:
            self.metrics.errors.labels("serviceUnavailable").inc()
            return error_item(
                "serviceUnavailable",
                message="The gateway is shutting down. Reconnect and retry elsewhere.",
                task_type="imageInference",
                task_uuid=task.taskUUID,
            )
        claimed: TaskRecord | None = None
        if self.replication is not None:  # first: a task another holds spends no token
            found = self._claimed(task)
            if isinstance(found, ErrorItem):
                self.metrics.errors.labels(found.code).inc()
                return found
            claimed = found
        policy = self.checked.get(tenant)  # None for a tenant without limits: nothing more
        price = 0.0
        if policy is not None:
            checked = self.quotas.check(policy, task)
            if isinstance(checked, ErrorItem):
                self.metrics.errors.labels(checked.code).inc()
                if self.audit is not None:
                    limit = quota_limit(checked)
                    self.audit.limit(tenant, limit, checked.code, self.key_id, task.taskUUID)
                return checked
            price = checked
        # most tasks: no URL to check, no delivery to subscribe (``inputs``, not the property
        # reference_images: compiled, a property is a call into the interpreter)
        delivered = task.webhookURL is not UNSET or task.uploadEndpoint is not UNSET
        if delivered or task.inputs is not UNSET:
            refused = self._refused_destination(task)
            if refused is not None:
                self.metrics.errors.labels(refused.code).inc()
                return refused
        record = self.registry.register(tenant, task, subscriber, claimed)
        if not isinstance(record, TaskRecord):
            self.metrics.errors.labels(record.code).inc()
            return record
        record.key_id = self.key_id
        if self.telemetry is not None:
            self.telemetry.begin(record, self.frame_trace)
        if price:  # held until the task ends (registry.on_final releases it)
            self.quotas.ledger.hold(record, price)
        if delivered:
            self.registry.subscribe(record, self.deliveries)
        self.pool.submit(record)
        return record

    async def claim(
        self, tenant: str | None, outcomes: list[Outcome], session: str | None = None
    ) -> FrameClaims | None:
        """Shared store: claim a frame's tasks before its dispatch (gateway.replication). The
        sender is the door's tenant, or the one the frame's own authentication names;
        ``session``, the client session its sync tasks stream to."""
        replication = self.replication
        if replication is None:
            return None
        if tenant is None:
            auth = next((o for o in outcomes if type(o) is Authentication), None)
            tenant = None if auth is None else self.tenant_of(auth.apiKey)
        if tenant is None or not any(type(o) in (ImageTask, GetResponse) for o in outcomes):
            return None
        registry = self.registry
        claims = await replication.claim(
            tenant,
            outcomes,
            lambda task_uuid: registry.lookup(tenant, task_uuid) is not None,
            session=session,
            created=registry.now(),
        )
        policy = self.checked.get(tenant)
        if policy is not None and policy.rate is not None and claims.won:
            # last: the tokens are the frame's to use with no await before its dispatch
            try:
                await self.quotas.prepare(tenant, policy, len(claims.won))
            except StoreUnavailable as exc:
                replication.release_unused(claims)
                claims.unavailable = str(exc)
                claims.won.clear()
        return claims

    def claim_then(
        self,
        tenant: str,
        outcomes: list[Outcome],
        session: str,
        then: Callable[[FrameClaims], None],
        *,
        behind: bool,
    ) -> bool:
        """:meth:`claim` without a wait, for a frame of an authenticated socket, ``behind``
        others of its socket still waiting for theirs: ``then`` gets its claims once they are
        answered, after theirs (gateway.replication); a tenant's rate tokens, where Redis counts
        them, taken with the batch, one take per tenant. False, and nothing done, for a frame
        that needs more than that before its dispatch (an authentication, a poll of a task
        another replica runs: :meth:`claim` is for those), and for one with nothing to claim
        and no frame ahead of it (dispatched at once)."""
        replication = self.replication
        if replication is None:
            return False
        lookup = self.registry.lookup
        claiming = behind
        for o in outcomes:
            if type(o) is ImageTask:
                claiming = True
            elif type(o) is Authentication or (
                type(o) is GetResponse and lookup(tenant, o.taskUUID) is None
            ):
                return False
        if claiming:
            replication.claim_then(
                tenant,
                outcomes,
                then,
                session=session,
                created=self.registry.now(),
            )
        return claiming

    def _rated(self, tenant: str) -> bool:
        """``Replication.rated``: whether Redis counts ``tenant``'s rate (read at each batch:
        a reload may have given or taken one while its frames waited)."""
        policy = self.checked.get(tenant)
        return policy is not None and policy.rate is not None and self.quotas.shared is not None

    async def _take_tokens(self, counts: dict[str, int]) -> dict[str, StoreUnavailable]:
        """``Replication.take_tokens``: the rate tokens of a claim batch's frames, one take per
        tenant, and every tenant's bucket set at once after the last, with the policy as it is
        then (the frames' dispatch follows with no await between); the tenants Redis did not
        answer for."""
        quotas = self.quotas
        takes = [
            (tenant, policy, count)
            for tenant, count in counts.items()
            if (policy := self.checked.get(tenant)) is not None and policy.rate is not None
        ]
        grants = await asyncio.gather(
            *(quotas.take(tenant, policy, count) for tenant, policy, count in takes),
            return_exceptions=True,
        )
        refused: dict[str, StoreUnavailable] = {}
        for (tenant, _, _), grant in zip(takes, grants, strict=True):
            if isinstance(grant, BaseException):
                if not isinstance(grant, StoreUnavailable):  # a bug: this tenant alone hears
                    if not isinstance(grant, asyncio.CancelledError):
                        log.error("rate tokens not taken", tenant=tenant, error=repr(grant))
                    grant = StoreUnavailable(repr(grant))
                refused[tenant] = grant
                continue
            policy = self.checked.get(tenant)  # a reload during the take: as it is now
            if grant is not None and policy is not None and policy.rate is not None:
                quotas.granted(tenant, policy, grant)
        return refused

    def released(self, claims: FrameClaims) -> None:
        """After the dispatch: the claims its refused tasks did not use go back."""
        if self.replication is not None:
            self.replication.release_unused(claims, self.registry.store.get)

    def _claimed(self, task: ImageTask) -> TaskRecord | ErrorItem:
        """The record the frame's claim won for ``task``, or why it has none."""
        frame = self.frame
        if frame is not None:
            record = frame.won.get(task.taskUUID)
            if record is not None and record.task is task:
                return record
            # another holds it, or the same taskUUID came earlier in this frame
            if task.taskUUID in frame.lost or record is not None:
                return conflict(task.taskUUID)
        return store_unavailable(
            "imageInference",
            task.taskUUID,
            frame.unavailable if frame is not None else None,
            "the task was not accepted",
        )

    def _refused_destination(self, task: ImageTask) -> ErrorItem | None:
        """A client-supplied URL whose host is a literal private address is refused here, with
        the parameter's own code; a name that resolves to one is refused at connect time."""
        urls = [
            ("webhookURL", "invalidWebhookURL", task.webhookURL),
            ("uploadEndpoint", "invalidUploadEndpoint", task.uploadEndpoint),
        ]
        urls.extend(
            ("inputs.referenceImages", "invalidReferenceImages", ref.image)
            for ref in task.reference_images
            if ref.image.startswith(("http://", "https://"))
        )
        for parameter, code, url in urls:
            if not isinstance(url, str):
                continue
            reason = self.guard.refusal_for_url(url)
            if reason is not None:
                return error_item(
                    code,
                    message=f"Invalid value for {parameter} parameter. Refused destination: "
                    f"{reason}.",
                    parameter=parameter,
                    type="string",
                    task_type="imageInference",
                    task_uuid=task.taskUUID,
                )
        return None

    def rejoin(self, tenant: str, task: ImageTask, subscriber: Subscriber) -> bool:
        """A sync task sent again, unchanged, while it still runs: the conflict stands, and the
        new socket gets the rest of its results too. This is what an SDK does after a dropped
        socket (send the same taskUUID again), and it ends with the results, not a 30 s poll.
        Its taskUUID in another case is not unchanged: its results carry the first spelling,
        which that sender would not match, so it is a conflict alone."""
        record = self.registry.lookup(tenant, task.taskUUID)
        if record is None or record.finished is not None or record.task != task:
            return False
        self.registry.subscribe(record, subscriber)
        return True

    @staticmethod
    def ack(task: ImageTask) -> TaskAck:
        return TaskAck(taskType="imageInference", taskUUID=task.taskUUID)

    def poll(self, tenant: str, task_uuid: str) -> tuple[list[Any], list[ErrorItem]]:
        """``getResponse``: the gateway's own state of the task, never a question upstream (with a
        shared store, the record another replica wrote, as of its last write)."""
        record = self.registry.lookup(tenant, task_uuid)
        frame = self.frame
        if record is None and frame is not None:
            record = frame.loaded.get(task_uuid)
            if record is None and frame.unread is not None:  # not known: not unknown either
                unavailable = store_unavailable(
                    "getResponse", task_uuid, frame.unread, "the task could not be read"
                )
                return [], [unavailable]
        if record is None:
            return [], [
                error_item(
                    "taskNotFound",
                    parameter="taskUUID",
                    task_type="getResponse",
                    task_uuid=task_uuid,
                )
            ]
        return self.registry.response(record, task_uuid)


def store_unavailable(task_type: str, task_uuid: str, reason: str | None, what: str) -> ErrorItem:
    """The shared store did not answer (``reason``): ``what`` became of the task."""
    return error_item(
        "serviceUnavailable",
        message="The gateway's shared store did not answer"
        + (f" ({reason})" if reason else "")
        + f": {what}. Retry with backoff.",
        task_type=task_type,
        task_uuid=task_uuid,
    )
