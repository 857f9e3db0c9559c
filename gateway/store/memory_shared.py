"""``SharedTasks`` in one process: the embedded default, and the contract's reference.

Records are kept as bytes, as Redis keeps them, so a caller never shares an object with the store
and both implementations answer alike. Retention runs on an injected clock; expired records are
dropped as they are met and from the front of the finishing order on every finish.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from gateway.store.base import TaskRecord
from gateway.store.shared import RecordCodec

__all__ = ["MemorySharedTasks"]

_Key = tuple[str, str]  # (tenant, taskUUID in lower case)


def _key(tenant: str, task_uuid: str) -> _Key:
    """Two spellings of one UUID are one claim (RFC 9562: case-insensitive), as in Redis."""
    return (tenant, task_uuid.lower())


class MemorySharedTasks:
    def __init__(self, *, max_retained: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_retained = max_retained
        self._clock = clock
        self._codec = RecordCodec()
        self._claims: dict[_Key, str] = {}  # -> upstream UUID
        self._records: dict[str, tuple[bytes, _Key]] = {}  # upstream UUID -> record, its claim
        self._finished: OrderedDict[str, float] = OrderedDict()  # upstream -> expiry, by finish

    @property
    def max_retained(self) -> int:
        return self._max_retained

    async def claim(self, tenant: str, task_uuid: str, upstream_uuid: str) -> bool:
        [won] = await self.claim_many(tenant, [(task_uuid, upstream_uuid)])
        return won

    async def claim_many(self, tenant: str, claims: Sequence[tuple[str, str]]) -> list[bool]:
        won = []
        for task_uuid, upstream_uuid in claims:
            key = _key(tenant, task_uuid)
            held = self._claims.get(key)
            if held is not None and self._expired(held):
                self._forget(held)
                held = None
            if held is None:
                self._claims[key] = upstream_uuid
            won.append(held is None)
        return won

    async def release(self, tenant: str, task_uuid: str, upstream_uuid: str) -> None:
        key = _key(tenant, task_uuid)
        if self._claims.get(key) == upstream_uuid:
            del self._claims[key]
            self._records.pop(upstream_uuid, None)
            self._finished.pop(upstream_uuid, None)

    async def save(self, record: TaskRecord) -> None:
        key = _key(record.tenant, record.task_uuid)
        self._records[record.upstream_uuid] = (self._codec.encode(record), key)

    async def load(self, tenant: str, task_uuid: str) -> TaskRecord | None:
        upstream_uuid = self._claims.get(_key(tenant, task_uuid))
        return None if upstream_uuid is None else self._record(upstream_uuid)

    def _record(self, upstream_uuid: str) -> TaskRecord | None:
        if self._expired(upstream_uuid):
            self._forget(upstream_uuid)
            return None
        kept = self._records.get(upstream_uuid)
        return None if kept is None else self._codec.decode(kept[0])

    async def finish(self, record: TaskRecord, retention: float) -> None:
        upstream_uuid = record.upstream_uuid
        self._finished.pop(upstream_uuid, None)
        if retention <= 0:
            self._forget(upstream_uuid, _key(record.tenant, record.task_uuid))
            return
        await self.save(record)
        now = self._clock()
        self._finished[upstream_uuid] = now + retention
        # The front expires first when every finish has the same retention (the gateway's
        # case); a longer one met later is still dropped when read. Bounded by the count.
        for _ in range(len(self._finished)):
            first, expiry = next(iter(self._finished.items()))
            if expiry > now:
                break
            self._forget(first)
        while len(self._finished) > self._max_retained:
            self._forget(next(iter(self._finished)))

    async def close(self) -> None:
        pass

    def _expired(self, upstream_uuid: str) -> bool:
        expiry = self._finished.get(upstream_uuid)
        return expiry is not None and expiry <= self._clock()

    def _forget(self, upstream_uuid: str, key: _Key | None = None) -> None:
        self._finished.pop(upstream_uuid, None)
        kept = self._records.pop(upstream_uuid, None)
        if kept is not None:
            key = kept[1]
        if key is not None and self._claims.get(key) == upstream_uuid:
            del self._claims[key]
