"""The task record.

A record is plain data (msgspec), so a shared store can keep it across replicas; live things
(sockets, futures) are never in it. Plain data makes no reference cycles, so records are not
tracked by the cycle collector (``gc=False``, as the frames they hold).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from gateway.store.states import TaskState
from protocol.frames import ErrorItem, ImageResult, ImageTask

__all__ = ["Delivery", "TaskRecord", "TaskState"]


class Delivery(msgspec.Struct, kw_only=True, gc=False):
    """One webhook POST or upload PUT and how it went: its own small state machine,
    pending -> delivered | failed, with attempts counted in between."""

    id: str  # stable across retries: the receiver's de-duplication key
    kind: Literal["webhook", "upload"]
    target: str  # the URL without its query: never a presigned signature in a log or a view
    image_uuid: str | None = None  # None for the webhook of a task's failure
    state: Literal["pending", "delivered", "failed"] = "pending"
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None


class TaskRecord(msgspec.Struct, kw_only=True, gc=False):
    tenant: str
    task: ImageTask  # as the client sent it, checked and normalised
    upstream_uuid: str  # the gateway's own taskUUID: all the provider ever sees
    state: TaskState = TaskState.RECEIVED
    created: float
    finished: float | None = None
    link: int | None = None  # the provider link it went out on
    window_epoch: int = 0  # that link's window epoch at its last send (see gateway.admission)
    sends: int = 0  # frames it went out in: more than one only when the provider confirmed
    # (taskNotFound under a resumed session) that the earlier ones never reached it
    # tuples, not lists: a list is a GC-tracked object, and a retained record holding one made
    # the collector walk every record kept (a 107 ms pause at 200,000); a tuple of untracked
    # Structs is untracked at the first collection that sees it
    results: tuple[ImageResult, ...] = ()
    error: ErrorItem | None = None
    deliveries: tuple[Delivery, ...] = ()
    # the client session its sync results stream to: where a replica that takes the task over
    # sends them (gateway.roaming)
    session: str | None = None
    # who sent it: the first 12 hex digits of its key's SHA-256 (gateway.audit.key_id), never
    # the key; for the audit line and the usage ledger per key
    key_id: str | None = None
    # the provider's cost of its results so far (USD), whether or not the client asked to see it
    cost: float = 0.0
    # the W3C traceparent of its trace, only while tracing (gateway.telemetry): the spans of its
    # deliveries join it, here or on the replica that takes it over
    trace: str | None = None

    # the modules compiled with mypyc (the Makefile's COMPILED_MODULES) read ``task.taskUUID``
    # and ``finished is None`` instead: a property is a call into Python from compiled code
    @property
    def task_uuid(self) -> str:
        return self.task.taskUUID

    @property
    def open(self) -> bool:
        return self.finished is None
