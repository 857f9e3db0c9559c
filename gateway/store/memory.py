"""The in-memory task store: one process; open tasks bounded by the registry, finished ones
kept for the retention window and at most ``max_finished`` of them (oldest forgotten first)."""

from __future__ import annotations

from collections import OrderedDict

from gateway.store.base import TaskRecord

__all__ = ["MemoryTaskStore"]


def _key(tenant: str, task_uuid: str) -> str:
    """A string, not a (tenant, taskUUID) tuple: a tuple is a GC-tracked object, and one per
    retained record kept the collector running (see TaskRecord.results). The taskUUID is last
    and has no NUL (it is a validated UUID), so no two pairs meet."""
    return f"{tenant}\x00{task_uuid}"


class MemoryTaskStore:
    def __init__(self, *, retention: float, max_finished: int = 1_000_000) -> None:
        self.retention = retention
        self.max_finished = max_finished
        self._by_key: dict[str, TaskRecord] = {}  # by _key(tenant, taskUUID)
        self._by_upstream: dict[str, TaskRecord] = {}
        self._open: dict[str, TaskRecord] = {}
        self._finished: OrderedDict[str, TaskRecord] = OrderedDict()  # in order of finishing

    def add(self, record: TaskRecord) -> bool:
        # one probe of the largest dict (every record kept), not a test and then an insert
        key = _key(record.tenant, record.task.taskUUID)
        if self._by_key.setdefault(key, record) is not record:
            return False
        self._by_upstream[record.upstream_uuid] = record
        self._open[record.upstream_uuid] = record
        return True

    def get(self, tenant: str, task_uuid: str) -> TaskRecord | None:
        return self._by_key.get(_key(tenant, task_uuid))

    def by_upstream(self, upstream_uuid: str) -> TaskRecord | None:
        return self._by_upstream.get(upstream_uuid)

    def finish(self, record: TaskRecord) -> None:
        self._open.pop(record.upstream_uuid, None)
        self._finished[record.upstream_uuid] = record
        if len(self._finished) > self.max_finished:  # a retention window too long for the rate
            self._forget(self._finished.popitem(last=False)[1])

    def sweep(self, now: float) -> list[TaskRecord]:
        horizon = now - self.retention
        gone = []
        while self._finished:
            record = next(iter(self._finished.values()))
            if record.finished is None or record.finished > horizon:
                break
            self._finished.popitem(last=False)
            self._forget(record)
            gone.append(record)
        return gone

    def _forget(self, record: TaskRecord) -> None:
        self._by_key.pop(_key(record.tenant, record.task.taskUUID), None)
        self._by_upstream.pop(record.upstream_uuid, None)

    def open_records(self) -> list[TaskRecord]:
        return list(self._open.values())

    @property
    def open_count(self) -> int:
        return len(self._open)

    def __len__(self) -> int:
        return len(self._by_key)
