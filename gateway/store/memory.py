"""The in-memory task store: one process; open tasks bounded by the registry, finished ones
kept for the retention window and at most ``max_finished`` of them (oldest forgotten first)."""

from __future__ import annotations

from collections import deque

from gateway.store.base import TaskRecord

__all__ = ["MemoryTaskStore"]


def _key(tenant: str, task_uuid: str) -> str:
    """A string, not a (tenant, taskUUID) tuple: a tuple is a GC-tracked object, and one per
    retained record kept the collector running (see TaskRecord.results). The taskUUID is last
    and has no NUL (it is a validated UUID), so no two pairs meet. Lower-case: UUIDs are
    case-insensitive (RFC 9562), so two spellings of one are one task (the record keeps the
    client's own, which every item to that client carries)."""
    return f"{tenant}\x00{task_uuid.lower()}"


class MemoryTaskStore:
    """One dict holds every record kept (up to ``tasks.max_retained``, 200,000): at that size
    each probe is a cache miss or two, so a task costs two probes of it (its add and its
    forgetting), not seven. Open records are also in a dict of their own, small and hot, which
    is all ``by_upstream`` needs; the finished ones wait for their sweep in a queue."""

    def __init__(self, *, retention: float, max_finished: int = 1_000_000) -> None:
        self.retention = retention
        self.max_finished = max_finished
        self._by_key: dict[str, TaskRecord] = {}  # by _key(tenant, taskUUID)
        self._open: dict[str, TaskRecord] = {}  # by upstream UUID
        # in order of finishing; a record finishes once (no move leaves a final state)
        self._finished: deque[TaskRecord] = deque()

    def add(self, record: TaskRecord) -> bool:
        """Keep a new record; False when the tenant already has this taskUUID."""
        # one probe of the largest dict (every record kept), not a test and then an insert
        key = _key(record.tenant, record.task.taskUUID)
        if self._by_key.setdefault(key, record) is not record:
            return False
        self._open[record.upstream_uuid] = record
        return True

    def get(self, tenant: str, task_uuid: str) -> TaskRecord | None:
        return self._by_key.get(_key(tenant, task_uuid))

    def by_upstream(self, upstream_uuid: str) -> TaskRecord | None:
        """The open record sent upstream as ``upstream_uuid``; a finished one is found by
        (tenant, taskUUID) only: what the provider says of a task that ended is stray."""
        return self._open.get(upstream_uuid)

    def finish(self, record: TaskRecord) -> None:
        """The record reached a final state: its retention clock starts."""
        self._open.pop(record.upstream_uuid, None)
        finished = self._finished
        finished.append(record)
        if len(finished) > self.max_finished:  # a retention window too long for the rate
            self._forget(finished.popleft())

    def sweep(self, now: float) -> list[TaskRecord]:
        """Forget the finished records older than the retention window; return them."""
        horizon = now - self.retention
        finished = self._finished
        gone = []
        while finished:
            record = finished[0]
            if record.finished is None or record.finished > horizon:
                break
            finished.popleft()
            self._forget(record)
            gone.append(record)
        return gone

    def _forget(self, record: TaskRecord) -> None:
        self._by_key.pop(_key(record.tenant, record.task.taskUUID), None)

    def open_records(self) -> list[TaskRecord]:
        return list(self._open.values())

    @property
    def open_count(self) -> int:
        return len(self._open)

    def __len__(self) -> int:
        return len(self._by_key)
