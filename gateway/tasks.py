"""The task registry: every task's lifecycle, its subscribers and its results, in one place.

The lifecycle is one explicit state machine (:data:`TRANSITIONS`); an illegal transition raises
:class:`IllegalTransition`, which is always a bug. Records live in a :class:`MemoryTaskStore`; the
registry keeps only what is live: who is waiting on which task.

Tenants are isolated twice over: a record is found by (tenant, taskUUID), and the provider only
ever sees the gateway's own UUID for a task, so two tenants' identical taskUUIDs never meet.
A taskUUID is found in any case (UUIDs are case-insensitive, RFC 9562: the store's key is
lower-case), so two spellings of one are one task; every item to a client carries the taskUUID
as that client sent it (its task's, or its getResponse's), since SDKs match answers by it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any, Final, Protocol

import msgspec

from gateway.metrics import Metrics
from gateway.store.base import TaskRecord
from gateway.store.memory import MemoryTaskStore
from gateway.store.states import TaskState
from protocol.codec import decode_image_result, encode_data, encode_errors
from protocol.errors import error_item
from protocol.frames import ErrorItem, ImageResult, ImageTask, ProcessingItem

__all__ = [
    "TRANSITIONS",
    "IllegalTransition",
    "Subscriber",
    "TaskRegistry",
    "UpstreamUUIDs",
    "conflict",
]

TRANSITIONS: Final[dict[TaskState, frozenset[TaskState]]] = {
    TaskState.RECEIVED: frozenset({TaskState.QUEUED, TaskState.SUBMITTED, TaskState.FAILED}),
    TaskState.QUEUED: frozenset({TaskState.SUBMITTED, TaskState.FAILED, TaskState.EXPIRED}),
    # back to QUEUED only when the provider refused it before accepting it (unbilled)
    TaskState.SUBMITTED: frozenset(
        {TaskState.QUEUED, TaskState.PARTIAL, TaskState.DONE, TaskState.FAILED, TaskState.EXPIRED}
    ),
    TaskState.PARTIAL: frozenset(
        {TaskState.PARTIAL, TaskState.DONE, TaskState.FAILED, TaskState.EXPIRED}
    ),
    TaskState.DONE: frozenset(),
    TaskState.FAILED: frozenset(),
    TaskState.EXPIRED: frozenset(),
}
FINAL: Final = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.EXPIRED})
# the states a shared store is told of (gateway.replication)
WRITTEN: Final = FINAL | {TaskState.PARTIAL}
# Only a task the provider was sent can hear from it: an item about any other (one still
# waiting at the gateway, whose upstream UUID a provider could guess) is a stray.
AT_PROVIDER: Final = frozenset({TaskState.SUBMITTED, TaskState.PARTIAL})


class UpstreamUUIDs:
    """The gateway's own task UUIDs: valid v4 UUIDs, 74 random bits fixed per process and a
    48-bit sequence. uuid.uuid4() per task cost 7% of the gateway's CPU; these are only ever
    seen by the provider, where they need to be unique, not unguessable. ``hex`` of a number
    with a 49th bit set, not a format spec: compiled, an f-string's ``:012x`` cost 360 ns."""

    def __init__(self) -> None:
        self.prefix = str(uuid.uuid4())[:24]  # 8-4-4-4- with the version and variant nibbles
        self.sequence = 1 << 48

    def __call__(self) -> str:
        self.sequence += 1
        return self.prefix + hex(self.sequence)[3:]  # past "0x1"


def conflict(task_uuid: str) -> ErrorItem:
    """The tenant has a task of this taskUUID already (on this replica or another)."""
    return error_item(
        "conflictTaskUUID",
        parameter="taskUUID",
        type="string",
        task_type="imageInference",
        task_uuid=task_uuid,
    )


def _deliver(subscribers: list[Subscriber], record: TaskRecord, frame: bytes) -> None:
    for subscriber in subscribers:
        subscriber.deliver(record, frame)


class IllegalTransition(Exception):
    """A task was asked to move where its lifecycle does not go: a bug, never bad input."""


class Subscriber(Protocol):
    """Who receives a task's frames as they happen (a client session, a REST request)."""

    def deliver(self, record: TaskRecord, frame: bytes) -> None: ...

    def settled(self, record: TaskRecord) -> None: ...


class TaskRegistry:
    def __init__(
        self,
        store: MemoryTaskStore,
        *,
        max_open: int,
        clock: Callable[[], float],
        metrics: Metrics,
        new_uuid: Callable[[], str] | None = None,
    ) -> None:
        # by its class, not a protocol: compiled, a call through a protocol is a method looked
        # up by name, and the registry calls the store for every task
        self.store = store
        self.max_open = max_open
        self._clock = clock
        self._metrics = metrics
        self.new_uuid = new_uuid or UpstreamUUIDs()
        self._subscribers: dict[str, list[Subscriber]] = {}
        self.on_final: list[Callable[[TaskRecord], None]] = []  # e.g. the link's in-flight count
        # what need not run per task at once (the audit's lines, the usage ledger): the records
        # finished in one loop turn, in the order they finished, once at the end of that turn
        # (call_soon) or at flush_final (the gateway's stop flushes before its audit and usage)
        self.on_final_batch: list[Callable[[list[TaskRecord]], None]] = []
        self._finished: list[TaskRecord] = []
        # every change of a record (registered, moved, a result): the shared store's write
        self.changed: Callable[[TaskRecord], None] | None = None
        # with a shared store, a task's frames leave once the write of what they tell is done
        # (gateway.replication): a replica that takes the task over knows every image its
        # client was sent, and sends none twice
        self.durable: Callable[[Callable[[], None]], None] | None = None
        # every move, set only while tracing (gateway.telemetry): None costs one test per move
        self.moved: Callable[[TaskRecord, TaskState], None] | None = None

    def now(self) -> float:
        return self._clock()

    # ------------------------------------------------------------------ lifecycle

    def move(self, record: TaskRecord, state: TaskState) -> None:
        if state not in TRANSITIONS[record.state]:
            raise IllegalTransition(f"{record.task.taskUUID}: {record.state} -> {state}")
        record.state = state
        if self.moved is not None:
            self.moved(record, state)
        # a result or the end: the claim wrote the record as it came, and a replica taking the
        # task over asks the provider about every open task, sent or not (gateway.takeover),
        # so a write per queueing or send would buy nothing
        if self.changed is not None and state in WRITTEN:
            self.changed(record)
        if state in FINAL:
            record.finished = finished = self._clock()
            self.store.finish(record)
            self._metrics.tasks.ended(state, finished - record.created)
            for hook in self.on_final:
                hook(record)
            if self.on_final_batch:
                self._batch(record)
            for subscriber in self._subscribers.pop(record.upstream_uuid, ()):
                subscriber.settled(record)

    def _batch(self, record: TaskRecord) -> None:
        finished = self._finished
        if not finished:
            try:
                asyncio.get_running_loop().call_soon(self.flush_final)
            except RuntimeError:  # no loop (a script, a unit test): at once
                for hook in self.on_final_batch:
                    hook([record])
                return
        finished.append(record)

    def flush_final(self) -> None:
        """The batch hooks on the records finished since the last call (idempotent)."""
        finished = self._finished
        if finished:
            self._finished = []
            for hook in self.on_final_batch:
                hook(finished)

    def register(
        self,
        tenant: str,
        task: ImageTask,
        subscriber: Subscriber | None,
        claimed: TaskRecord | None = None,
    ) -> TaskRecord | ErrorItem:
        """A new task of ``tenant``, or the error that refuses it (conflict, capacity); the
        record ``claimed`` with it in the shared store, where there is one."""
        store = self.store
        if store.open_count >= self.max_open:
            if store.get(tenant, task.taskUUID) is not None:
                return conflict(task.taskUUID)
            return error_item(
                "rateLimitExceeded",
                message=f"The gateway holds {self.max_open} open tasks. Retry with backoff.",
                task_type="imageInference",
                task_uuid=task.taskUUID,
            )
        if claimed is None:
            upstream_uuid = self.new_uuid()
            record = TaskRecord(
                tenant=tenant, task=task, upstream_uuid=upstream_uuid, created=self._clock()
            )
        else:
            record, upstream_uuid = claimed, claimed.upstream_uuid
        if not store.add(record):  # the check for a conflict is the insert itself
            return conflict(task.taskUUID)
        if subscriber is not None:
            self._subscribers[upstream_uuid] = [subscriber]
        return record

    def adopt(self, record: TaskRecord, subscribers: list[Subscriber]) -> bool:
        """A record another replica ran (gateway.takeover), kept here from now on; False when
        this tenant's taskUUID is here already."""
        if not self.store.add(record):
            return False
        if subscribers:
            self._subscribers[record.upstream_uuid] = subscribers
        if self.changed is not None:
            self.changed(record)
        return True

    def subscribe(self, record: TaskRecord, subscriber: Subscriber) -> None:
        if record.finished is not None:
            subscriber.settled(record)
            return
        subscribers = self._subscribers.setdefault(record.upstream_uuid, [])
        if subscriber not in subscribers:  # subscribed twice would mean every frame twice
            subscribers.append(subscriber)

    def unsubscribe(self, record: TaskRecord, subscriber: Subscriber) -> None:
        subscribers = self._subscribers.get(record.upstream_uuid)
        if subscribers and subscriber in subscribers:
            subscribers.remove(subscriber)

    # ------------------------------------------------------------------ what the provider says

    def on_result(self, upstream_uuid: str, item: msgspec.Raw) -> None:
        record = self.store.by_upstream(upstream_uuid)
        if record is None or record.state not in AT_PROVIDER:
            self._metrics.stray_items.inc()  # a task we forgot, not yet sent, or ended
            return
        try:
            result = decode_image_result(item)
        except msgspec.DecodeError:
            return  # not an image (an ack of a task sent before a reconnect): nothing to relay
        self._image(record, upstream_uuid, result)

    def on_image(self, upstream_uuid: str, result: ImageResult) -> None:
        """:meth:`on_result` of an item the link decoded as an image already (one decode per
        item, not two); ``result`` is the registry's from here on, changed in place."""
        record = self.store.by_upstream(upstream_uuid)
        if record is None or record.state not in AT_PROVIDER:
            self._metrics.stray_items.inc()  # a task we forgot, not yet sent, or ended
            return
        self._image(record, upstream_uuid, result)

    def _image(self, record: TaskRecord, upstream_uuid: str, result: ImageResult) -> None:
        results = record.results
        if results and any(r.imageUUID == result.imageUUID for r in results):
            return  # delivered again after a resume: exactly once means once
        task = record.task
        cost = result.cost
        if cost is not None:
            self._metrics.tasks.spent(record.tenant, cost)
            record.cost += cost  # kept apart: the result keeps it only with includeCost
            if not task.includeCost:
                result.cost = None
        # the client's own taskUUID back in (the result is freshly decoded: nobody else has it)
        result.taskUUID = task.taskUUID
        record.results = results = (*results, result)
        frame = encode_data([result])
        state = TaskState.DONE if len(results) >= task.numberResults else TaskState.PARTIAL
        if self.durable is None:
            for subscriber in self._subscribers.get(upstream_uuid, ()):
                subscriber.deliver(record, frame)
            self.move(record, state)
            return
        subscribers = list(self._subscribers.get(upstream_uuid, ()))
        self.move(record, state)
        self.durable(lambda: _deliver(subscribers, record, frame))

    def on_error(self, upstream_uuid: str, error: ErrorItem) -> None:
        record = self.store.by_upstream(upstream_uuid)
        if record is None or record.state not in AT_PROVIDER:
            self._metrics.stray_items.inc()
            return
        self.fail(record, msgspec.structs.replace(error, taskUUID=record.task.taskUUID))

    def fail(self, record: TaskRecord, error: ErrorItem) -> None:
        """End a task with ``error``, told to its subscribers."""
        if record.finished is None:
            self._end(record, error, TaskState.FAILED)

    def _end(self, record: TaskRecord, error: ErrorItem, state: TaskState) -> None:
        record.error = error
        self._metrics.errors.labels(error.code).inc()
        frame = encode_errors([error])
        subscribers = list(self._subscribers.get(record.upstream_uuid, ()))
        self.move(record, state)
        if self.durable is None:
            _deliver(subscribers, record, frame)
        else:  # behind the task's results still waiting for their write
            self.durable(lambda: _deliver(subscribers, record, frame))

    # ------------------------------------------------------------------ getResponse

    def lookup(self, tenant: str, task_uuid: str) -> TaskRecord | None:
        return self.store.get(tenant, task_uuid)

    def response(self, record: TaskRecord, task_uuid: str) -> tuple[list[Any], list[ErrorItem]]:
        """Cumulative state, one item per generation: successes, then what is still running;
        a failure as an error item. Always the original taskType, never ``getResponse``. Every
        item carries ``task_uuid``, the taskUUID as the getResponse spelled it: it finds the
        task in any case (the store's key is lower-case), and an SDK matches its answer by the
        string it sent."""
        data: list[Any] = [
            msgspec.structs.replace(r, status="success", taskUUID=task_uuid) for r in record.results
        ]
        errors: list[ErrorItem] = []
        missing = record.task.numberResults - len(record.results)
        if record.error is not None:
            errors.append(msgspec.structs.replace(record.error, status="error", taskUUID=task_uuid))
        elif missing > 0 and record.finished is None:
            data.extend(
                ProcessingItem(taskType="imageInference", taskUUID=task_uuid)
                for _ in range(missing)
            )
        return data, errors

    def expire(self, timeout: float, refused: Callable[[TaskRecord], bool] | None = None) -> int:
        """Tasks with results still missing ``timeout`` after acceptance end as EXPIRED,
        whether the provider has them or they still wait for its capacity at the gateway.
        ``refused``: whether the provider refused a task before (the pool's): one sent again
        and out at the moment still waited for capacity, not for the provider to finish it."""
        horizon = self._clock() - timeout
        late = [
            r
            for r in self.store.open_records()
            if r.created <= horizon
            and r.state in (TaskState.QUEUED, TaskState.SUBMITTED, TaskState.PARTIAL)
        ]
        for record in late:
            waited = record.state is TaskState.QUEUED or (
                record.state is TaskState.SUBMITTED and refused is not None and refused(record)
            )
            if waited:
                message = (
                    f"The task waited {timeout:g} s for provider capacity (the provider kept "
                    "refusing new work, or the queue ahead of it was long)."
                )
            else:
                message = f"The provider did not finish the task within {timeout:g} s."
            error = error_item(
                "timeoutProvider",
                message=message,
                task_type="imageInference",
                task_uuid=record.task.taskUUID,
            )
            self._end(record, error, TaskState.EXPIRED)
        return len(late)

    def sweep(self) -> int:
        return len(self.store.sweep(self._clock()))
