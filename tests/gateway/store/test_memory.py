from __future__ import annotations

import uuid

from gateway.store.base import TaskRecord
from gateway.store.memory import MemoryTaskStore
from protocol.codec import decode_client_frame, encode_tasks
from protocol.frames import ImageTask
from protocol.models import default_catalogue
from tests.protocol.conftest import image_task


def record(tenant: str, upstream: str, task_uuid: str | None = None) -> TaskRecord:
    body = image_task() if task_uuid is None else image_task(taskUUID=task_uuid)
    [task] = decode_client_frame(encode_tasks([body]), default_catalogue())
    assert isinstance(task, ImageTask)
    return TaskRecord(tenant=tenant, task=task, upstream_uuid=upstream, created=0.0)


def test_keys_are_per_tenant() -> None:
    store = MemoryTaskStore(retention=10)
    first = record("a", "u1")
    assert store.add(first)
    assert not store.add(record("a", "u2", first.task_uuid))
    assert store.add(record("b", "u3", first.task_uuid))
    assert store.get("a", first.task_uuid) is first
    assert store.by_upstream("u1") is first
    assert store.open_count == 2 and len(store) == 2


def test_two_spellings_of_one_task_uuid_are_one_key() -> None:
    """UUIDs are case-insensitive (RFC 9562): an upper-case and a lower-case spelling of one
    taskUUID are one task of the tenant, found and forgotten by either; the record keeps the
    spelling its client sent."""
    store = MemoryTaskStore(retention=10)
    task_uuid = str(uuid.uuid4())
    upper = record("a", "u1", task_uuid.upper())
    assert store.add(upper)
    assert not store.add(record("a", "u2", task_uuid))
    assert store.add(record("b", "u3", task_uuid))  # another tenant's is still another task
    assert store.get("a", task_uuid) is upper and store.get("a", task_uuid.upper()) is upper
    assert upper.task_uuid == task_uuid.upper()
    upper.finished = 1.0
    store.finish(upper)
    assert store.sweep(20.0) == [upper]
    assert store.get("a", task_uuid) is None and store.add(record("a", "u4", task_uuid))


def test_retention_starts_when_a_task_finishes() -> None:
    store = MemoryTaskStore(retention=10)
    early, late, running = record("a", "u1"), record("a", "u2"), record("a", "u3")
    for r in (early, late, running):
        store.add(r)
    early.finished, late.finished = 5.0, 8.0
    store.finish(early)
    store.finish(late)
    assert store.open_records() == [running]
    assert store.sweep(14.9) == []
    assert store.sweep(15.0) == [early]
    assert store.sweep(100.0) == [late]
    assert store.get("a", running.task_uuid) is running and len(store) == 1


def test_past_max_finished_the_oldest_finished_are_forgotten_first() -> None:
    store = MemoryTaskStore(retention=3600, max_finished=2)
    records = [record("a", f"u{i}") for i in range(4)]
    for r in records:
        store.add(r)
    for i, r in enumerate(records[:3]):
        r.finished = float(i)
        store.finish(r)
    assert store.get("a", records[0].task_uuid) is None  # within retention, past the count
    assert [store.get("a", r.task_uuid) for r in records[1:]] == records[1:]
    assert store.open_count == 1 and len(store) == 3


def test_by_upstream_finds_open_records_only() -> None:
    """What the provider says of a task that ended is stray: the registry counts it so."""
    store = MemoryTaskStore(retention=10)
    done, running = record("a", "u1"), record("a", "u2")
    store.add(done)
    store.add(running)
    done.finished = 1.0
    store.finish(done)
    assert store.by_upstream("u1") is None and store.by_upstream("u2") is running
    assert store.get("a", done.task_uuid) is done
