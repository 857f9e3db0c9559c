"""Where client tasks come in, by WebSocket or REST alike: checked, registered, handed on."""

from __future__ import annotations

from typing import Any

from msgspec import UNSET

from gateway.delivery.egress import EgressGuard
from gateway.metrics import Metrics
from gateway.pool import UpstreamPool
from gateway.store.base import TaskRecord
from gateway.tasks import Subscriber, TaskRegistry
from protocol.codec import Outcome, decode_client_frame
from protocol.errors import error_item
from protocol.frames import ErrorItem, ImageTask, TaskAck
from protocol.models import Catalogue

__all__ = ["Intake"]


class Intake:
    def __init__(
        self,
        catalogue: Catalogue,
        registry: TaskRegistry,
        pool: UpstreamPool,
        keys: dict[str, str],
        metrics: Metrics,
        *,
        max_tasks_per_frame: int,
        guard: EgressGuard,
        deliveries: Subscriber,
    ) -> None:
        self.catalogue = catalogue
        self.registry = registry
        self.pool = pool
        self.keys = keys
        self.metrics = metrics
        self.max_tasks_per_frame = max_tasks_per_frame
        self.guard = guard
        self.deliveries = deliveries
        self.accepting = True  # False while the gateway drains for shutdown

    def tenant_of(self, api_key: str) -> str | None:
        return self.keys.get(api_key)

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
        refused = self._refused_destination(task)
        if refused is not None:
            self.metrics.errors.labels(refused.code).inc()
            return refused
        record = self.registry.register(tenant, task, subscriber)
        if not isinstance(record, TaskRecord):
            self.metrics.errors.labels(record.code).inc()
            return record
        if isinstance(task.webhookURL, str) or isinstance(task.uploadEndpoint, str):
            self.registry.subscribe(record, self.deliveries)
        self.pool.submit(record)
        return record

    def _refused_destination(self, task: ImageTask) -> ErrorItem | None:
        """A client-supplied URL whose host is a literal private address is refused here, with
        the parameter's own code; a name that resolves to one is refused at connect time."""
        if task.webhookURL is UNSET and task.uploadEndpoint is UNSET and not task.reference_images:
            return None  # most tasks: nothing to check
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
        socket (send the same taskUUID again), and it ends with the results, not a 30 s poll."""
        record = self.registry.lookup(tenant, task.taskUUID)
        if record is None or not record.open or record.task != task:
            return False
        self.registry.subscribe(record, subscriber)
        return True

    @staticmethod
    def ack(task: ImageTask) -> TaskAck:
        return TaskAck(taskType="imageInference", taskUUID=task.taskUUID)

    def poll(self, tenant: str, task_uuid: str) -> tuple[list[Any], list[ErrorItem]]:
        """``getResponse``: the gateway's own state of the task, never a question upstream."""
        record = self.registry.lookup(tenant, task_uuid)
        if record is None:
            return [], [
                error_item(
                    "taskNotFound",
                    parameter="taskUUID",
                    task_type="getResponse",
                    task_uuid=task_uuid,
                )
            ]
        return self.registry.response(record)
