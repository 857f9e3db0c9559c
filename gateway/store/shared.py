"""What replicas share about tasks (issue 13): the contract of a shared, asynchronous task store.

The registry keeps each replica's own records in a synchronous, in-process
``MemoryTaskStore`` (store/memory.py); with ``store.url`` they are also written here
(gateway/replication.py), so that several gateway replicas answer ``getResponse`` alike and
``conflictTaskUUID`` holds across them.

Two implementations pass one contract suite (tests/gateway/store/test_shared_contract.py):
``MemorySharedTasks`` (store/memory_shared.py; the contract's reference, in one process) and
``RedisSharedTasks`` (store/redis.py; what the gateway uses with ``store.url``).

The contract:

- A **claim** takes a tenant's taskUUID for one upstream UUID, atomically: of every replica that
  claims the same (tenant, taskUUID), exactly one wins; the same taskUUID under two tenants is
  two claims, and two spellings of one (upper and lower case: RFC 9562) are one. ``claim_many``
  claims a frame's tasks in one round trip. A claim lasts while its task does (and, in Redis,
  at most ``open_ttl`` without a finish: a replica that died between claim and finish does not
  hold the taskUUID forever); ``release`` gives back a claim whose task was refused before it
  started.
- **save** writes a record (msgspec bytes: a copy, never the caller's object); **load** finds
  it by (tenant, taskUUID). A claim without a saved record loads as None. (There is no read by
  upstream UUID: the gateway never needs one, and Redis would need an index for it.)
- **finish** writes the final record and starts its retention: ``retention`` seconds later it is
  gone (claim included, so the taskUUID can be used again). At most ``max_retained`` finished
  records are kept: past that bound the earliest finished is forgotten first.
- Every call ends within the store's deadline; a store it cannot reach raises
  ``StoreUnavailable`` (the caller answers ``serviceUnavailable``), never hangs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec

from gateway.store.base import TaskRecord

__all__ = ["RecordCodec", "SharedTasks", "StoreUnavailable"]


class StoreUnavailable(Exception):
    """The shared store did not answer within its deadline, or refused the connection."""


class RecordCodec:
    """A record as bytes and back: MessagePack, the record's own schema."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(TaskRecord)

    def encode(self, record: TaskRecord) -> bytes:
        return self._encoder.encode(record)

    def decode(self, data: bytes) -> TaskRecord:
        return self._decoder.decode(data)


class SharedTasks(Protocol):
    """Task records every replica sees: claims, records, retention. See the module's text."""

    @property
    def max_retained(self) -> int:
        """Finished records kept at most; past it the earliest finished is forgotten first."""

    async def claim(self, tenant: str, task_uuid: str, upstream_uuid: str) -> bool:
        """Take ``task_uuid`` for ``tenant``; False when it is already taken (by any replica)."""

    async def claim_many(self, tenant: str, claims: Sequence[tuple[str, str]]) -> list[bool]:
        """``claim`` for each (taskUUID, upstream UUID) of one frame, in order, in one round
        trip; a taskUUID twice in ``claims`` wins at most once."""

    async def release(self, tenant: str, task_uuid: str, upstream_uuid: str) -> None:
        """Give back a claim still held for ``upstream_uuid`` (a refused task); else nothing."""

    async def save(self, record: TaskRecord) -> None:
        """Write an open record (its claim is the caller's to have won first)."""

    async def load(self, tenant: str, task_uuid: str) -> TaskRecord | None: ...

    async def finish(self, record: TaskRecord, retention: float) -> None:
        """Write the final record; it and its claim are gone ``retention`` seconds later (at
        once for 0), or sooner when ``max_retained`` later finished records push it out."""

    async def close(self) -> None: ...
