"""The console's summary of a finished task (gateway/console/producer.py), without a gateway."""

from __future__ import annotations

import uuid

from gateway.console.producer import _Ended
from gateway.store.base import Delivery, TaskRecord, TaskState
from tests.gateway.test_dispatch import image_task


def test_a_delivery_that_begins_after_its_task_ended_is_shown_while_the_record_is_kept() -> None:
    """On a shared store a task's last webhook begins once its final write is done: after the
    console summarised the task. Deliveries are a tuple replaced as each begins, so the summary
    reads them from the registry at each tick, and keeps the last seen once the record is gone."""
    record = TaskRecord(
        tenant="studio", task=image_task(), upstream_uuid=str(uuid.uuid4()), created=1.0
    )
    record.state, record.finished = TaskState.DONE, 2.0
    ended = _Ended(record)
    hook = Delivery(id="msg_1", kind="webhook", target="http://127.0.0.1:9/hook")
    record.deliveries = (*record.deliveries, hook)

    def kept(tenant: str, task_uuid: str) -> TaskRecord | None:
        return record if (tenant, task_uuid) == (record.tenant, record.task_uuid) else None

    shown = ended.view(0.0, kept)["deliveries"]
    assert shown == [{"kind": "webhook", "state": "pending", "attempts": 0, "status": None}]
    hook.state, hook.attempts, hook.last_status = "delivered", 1, 200
    assert ended.view(0.0, lambda _tenant, _task: None)["deliveries"] == [
        {"kind": "webhook", "state": "delivered", "attempts": 1, "status": 200}
    ]  # the record gone (its retention): as last seen
