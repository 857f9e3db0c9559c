"""The task registry without any socket: lifecycle, conflicts, routing, getResponse."""

from __future__ import annotations

import gc
import itertools
import uuid
from typing import Any

import msgspec
import pytest

from gateway.metrics import Metrics
from gateway.store.base import TaskRecord, TaskState
from gateway.store.memory import MemoryTaskStore
from gateway.tasks import FINAL, TRANSITIONS, IllegalTransition, TaskRegistry, UpstreamUUIDs
from protocol.codec import decode_client_frame, encode, encode_tasks
from protocol.errors import error_item
from protocol.frames import ErrorItem, ImageResult, ImageTask
from protocol.models import default_catalogue
from tests.gateway.conftest import Clock
from tests.protocol.conftest import image_task

S = TaskState


class Subscriber:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.settled_records: list[TaskRecord] = []

    def deliver(self, record: TaskRecord, frame: bytes) -> None:
        self.frames.append(msgspec.json.decode(frame))

    def settled(self, record: TaskRecord) -> None:
        self.settled_records.append(record)


def checked(**overrides: object) -> ImageTask:
    [task] = decode_client_frame(encode_tasks([image_task(**overrides)]), default_catalogue())
    assert isinstance(task, ImageTask)
    return task


@pytest.fixture
def registry(clock: Clock) -> TaskRegistry:
    counter = itertools.count()
    return TaskRegistry(
        MemoryTaskStore(retention=60),
        max_open=3,
        clock=clock,
        metrics=Metrics(),
        new_uuid=lambda: f"up-{next(counter)}",
    )


def result(upstream: str, image: str, cost: float = 0.195) -> msgspec.Raw:
    item = ImageResult(
        taskType="imageInference", taskUUID=upstream, imageUUID=image, imageURL="u", cost=cost
    )
    return msgspec.Raw(encode(item))


def test_upstream_uuids_are_v4_and_unique_within_and_across_processes() -> None:
    mine, another = UpstreamUUIDs(), UpstreamUUIDs()
    issued = [mine() for _ in range(10_000)]
    assert len(set(issued)) == len(issued)
    assert all(uuid.UUID(u).version == 4 and str(uuid.UUID(u)) == u for u in issued[::997])
    assert another() not in issued  # another process draws another random prefix
    assert mine().endswith(f"{len(issued) + 1:012x}")  # the sequence: 48 bits, zero-filled


def test_the_lifecycle_table_is_closed() -> None:
    assert set(TRANSITIONS) == set(TaskState)
    for state in FINAL:
        assert TRANSITIONS[state] == frozenset()
    for targets in TRANSITIONS.values():
        assert S.RECEIVED not in targets  # nothing goes back to the start


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ([], S.DONE),
        ([], S.PARTIAL),
        ([S.QUEUED], S.DONE),
        ([S.SUBMITTED], S.RECEIVED),
        ([S.SUBMITTED, S.PARTIAL], S.QUEUED),  # a task with results was accepted: billed
        ([S.SUBMITTED, S.DONE], S.FAILED),
        ([S.FAILED], S.SUBMITTED),
    ],
)
def test_illegal_transitions_raise(
    registry: TaskRegistry, path: list[TaskState], illegal: TaskState
) -> None:
    record = registry.register("t", checked(), None)
    assert isinstance(record, TaskRecord)
    for state in path:
        registry.move(record, state)
    with pytest.raises(IllegalTransition):
        registry.move(record, illegal)


def test_results_route_relabel_dedupe_and_finish(registry: TaskRegistry, clock: Clock) -> None:
    watcher = Subscriber()
    task = checked(numberResults=2)
    record = registry.register("t", task, watcher)
    assert isinstance(record, TaskRecord)
    registry.move(record, S.SUBMITTED)
    registry.on_result(record.upstream_uuid, result(record.upstream_uuid, "i1"))
    registry.on_result(record.upstream_uuid, result(record.upstream_uuid, "i1"))  # a replay
    assert record.state is S.PARTIAL
    clock.advance(2.5)
    registry.on_result(record.upstream_uuid, result(record.upstream_uuid, "i2"))
    assert str(record.state) == "done" and record.finished == clock.now
    assert [f["data"][0]["imageUUID"] for f in watcher.frames] == ["i1", "i2"]
    for frame in watcher.frames:
        item = frame["data"][0]
        assert item["taskUUID"] == task.taskUUID and "cost" not in item
    assert watcher.settled_records == [record]
    # a result after the end goes nowhere
    registry.on_result(record.upstream_uuid, result(record.upstream_uuid, "i3"))
    assert len(record.results) == 2


def test_cost_is_kept_when_asked(registry: TaskRegistry) -> None:
    record = registry.register("t", checked(includeCost=True), None)
    assert isinstance(record, TaskRecord)
    registry.move(record, S.SUBMITTED)
    registry.on_result(record.upstream_uuid, result(record.upstream_uuid, "i1"))
    assert record.results[0].cost == 0.195


def test_conflicts_are_per_tenant_and_capacity_is_bounded(registry: TaskRegistry) -> None:
    task = checked()
    assert isinstance(registry.register("a", task, None), TaskRecord)
    conflict = registry.register("a", task, None)
    assert isinstance(conflict, ErrorItem) and conflict.code == "conflictTaskUUID"
    assert isinstance(registry.register("b", task, None), TaskRecord)
    assert isinstance(registry.register("c", task, None), TaskRecord)
    full = registry.register("d", task, None)  # max_open is 3
    assert isinstance(full, ErrorItem) and full.code == "rateLimitExceeded"


def test_get_response_is_cumulative(registry: TaskRegistry) -> None:
    record = registry.register("t", checked(numberResults=3), None)
    assert isinstance(record, TaskRecord)
    registry.move(record, S.SUBMITTED)
    registry.on_result(record.upstream_uuid, result(record.upstream_uuid, "i1"))
    data, errors = registry.response(record, record.task_uuid)
    assert [getattr(i, "status", None) for i in data] == ["success", "processing", "processing"]
    assert errors == []
    registry.on_error(record.upstream_uuid, error_item("timeoutProvider", task_uuid="x"))
    data, errors = registry.response(record, record.task_uuid)
    assert [getattr(i, "status", None) for i in data] == ["success"]
    assert [(e.code, e.status, e.taskUUID) for e in errors] == [
        ("timeoutProvider", "error", record.task_uuid)
    ]


def test_two_spellings_of_one_task_uuid_are_one_task_each_answered_in_its_own(
    registry: TaskRegistry,
) -> None:
    """UUIDs are case-insensitive on input (RFC 9562): a taskUUID in another case is the same
    task (a conflict, found by getResponse), yet every item a client gets carries the taskUUID
    as that client spelled it, which is what the SDKs match their answers by."""
    watcher = Subscriber()
    task_uuid = str(uuid.uuid4())
    first = checked(taskUUID=task_uuid.upper(), numberResults=3)
    record = registry.register("t", first, watcher)
    assert isinstance(record, TaskRecord)
    again = registry.register("t", checked(taskUUID=task_uuid), None)
    assert isinstance(again, ErrorItem)
    assert (again.code, again.taskUUID) == ("conflictTaskUUID", task_uuid)
    assert registry.lookup("t", task_uuid) is record
    registry.move(record, S.SUBMITTED)
    registry.on_result(record.upstream_uuid, result(record.upstream_uuid, "i1"))
    assert [f["data"][0]["taskUUID"] for f in watcher.frames] == [task_uuid.upper()]
    for spelling in (task_uuid, task_uuid.upper()):
        data, _ = registry.response(record, spelling)
        assert [(i.taskUUID, i.status) for i in data] == [
            (spelling, "success"),
            (spelling, "processing"),
            (spelling, "processing"),
        ]
    registry.on_error(record.upstream_uuid, error_item("timeoutProvider", task_uuid="x"))
    assert watcher.frames[-1]["errors"][0]["taskUUID"] == task_uuid.upper()
    data, errors = registry.response(record, task_uuid)
    assert [i.taskUUID for i in data] == [task_uuid]
    assert [(e.code, e.taskUUID) for e in errors] == [("timeoutProvider", task_uuid)]
    assert record.results[0].taskUUID == task_uuid.upper()  # the record is not changed


def test_finished_tasks_are_forgotten_after_retention(registry: TaskRegistry, clock: Clock) -> None:
    record = registry.register("t", checked(), None)
    assert isinstance(record, TaskRecord)
    registry.fail(record, error_item("serviceUnavailable", task_uuid=record.task_uuid))
    clock.advance(59)
    assert registry.sweep() == 0
    clock.advance(2)
    assert registry.sweep() == 1
    assert registry.lookup("t", record.task_uuid) is None


def test_late_tasks_expire_whether_at_the_provider_or_waiting_for_it(
    registry: TaskRegistry, clock: Clock
) -> None:
    watcher, waiter = Subscriber(), Subscriber()
    running = registry.register("t", checked(), watcher)
    waiting = registry.register("t", checked(), waiter)
    assert isinstance(running, TaskRecord) and isinstance(waiting, TaskRecord)
    registry.move(running, S.SUBMITTED)
    registry.move(waiting, S.QUEUED)
    clock.advance(599)
    assert registry.expire(600) == 0
    clock.advance(1)
    assert registry.expire(600) == 2
    assert str(running.state) == "expired" and str(waiting.state) == "expired"
    [frame] = watcher.frames
    assert frame["errors"][0]["code"] == "timeoutProvider"
    assert frame["errors"][0]["taskUUID"] == running.task_uuid
    [frame] = waiter.frames
    assert frame["errors"][0]["code"] == "timeoutProvider"
    assert "waited 600 s for provider capacity" in frame["errors"][0]["message"]


def test_retained_records_leave_the_garbage_collector_nothing_to_walk(clock: Clock) -> None:
    """Finished records are kept (retention, max_retained: up to 200,000). When each kept a
    GC-tracked object (a list of results, a tuple key), every collection walked all of them:
    gen0 every few thousand tasks, 107 ms full collections at 10,000 tasks/s. Kept records must
    add nothing the collector tracks once it has seen them."""
    registry = TaskRegistry(
        MemoryTaskStore(retention=60), max_open=10, clock=clock, metrics=Metrics()
    )
    subscriber = Subscriber()

    def run_tasks(count: int) -> None:
        for _ in range(count):
            record = registry.register("studio", checked(numberResults=2), subscriber)
            assert isinstance(record, TaskRecord)
            registry.move(record, S.SUBMITTED)
            for _ in range(2):
                registry.on_result(
                    record.upstream_uuid, result(record.upstream_uuid, str(uuid.uuid4()))
                )
            assert record.state is S.DONE
        subscriber.frames.clear()
        subscriber.settled_records.clear()

    run_tasks(50)  # whatever is made once (caches, the first frames) is made
    gc.collect()
    before = len(gc.get_objects())
    run_tasks(2_000)
    gc.collect()
    assert len(registry.store) == 2_050
    assert len(gc.get_objects()) - before < 100  # not one (or three) per record kept


def test_a_task_out_again_after_a_refusal_expires_as_one_that_waited_for_capacity(
    registry: TaskRegistry, clock: Clock
) -> None:
    """The provider refused it, and at the deadline it happens to be out again (the pool's
    retry): it waited for capacity, it did not run too long."""
    watcher = Subscriber()
    record = registry.register("t", checked(), watcher)
    assert isinstance(record, TaskRecord)
    registry.move(record, S.SUBMITTED)
    clock.advance(600)
    assert registry.expire(600, refused=lambda r: r is record) == 1
    [frame] = watcher.frames
    assert "waited 600 s for provider capacity" in frame["errors"][0]["message"]
