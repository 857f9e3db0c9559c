"""What replicas share about tasks (issue 13): the contract of a shared, asynchronous task store.

The registry keeps each replica's own records in a synchronous, in-process ``TaskStore``
(store/base.py); with ``store.url`` they are also written here (gateway/replication.py), so that
several gateway replicas answer ``getResponse`` alike and ``conflictTaskUUID`` holds across them.

Two implementations pass one contract suite (tests/gateway/store/test_shared_contract.py):
``MemorySharedTasks`` (store/memory_shared.py; the contract's reference, in one process) and
``RedisSharedTasks`` (store/redis.py; what the gateway uses with ``store.url``).

The contract:

- A **claim** takes a tenant's taskUUID for one upstream UUID, atomically: of every replica that
  claims the same (tenant, taskUUID), exactly one wins; the same taskUUID under two tenants is
  two claims. ``claim_many`` claims a frame's tasks in one round trip. A claim lasts while its
  task does (and, in Redis, at most ``open_ttl`` without a finish: a replica that died between
  claim and finish does not hold the taskUUID forever); ``release`` gives back a claim whose
  task was refused before it started.
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

from gateway.store.base import Delivery, TaskRecord, TaskState
from protocol.frames import ErrorItem, ImageResult, ImageTask

__all__ = ["RecordCodec", "RecordParts", "SharedTasks", "StoreUnavailable"]


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


class _Static(msgspec.Struct, array_like=True, gc=False):
    tenant: str
    task: ImageTask
    upstream_uuid: str
    created: float
    session: str | None


class _State(msgspec.Struct, array_like=True, gc=False):
    state: TaskState
    finished: float | None
    link: int | None
    window_epoch: int
    sends: int
    results: tuple[ImageResult, ...]
    error: ErrorItem | None
    deliveries: tuple[Delivery, ...]
    # set after the claim wrote the static part (gateway.intake), so written with the state;
    # defaults: a record written by an older version still reads
    key_id: str | None = None
    cost: float = 0.0
    trace: str | None = None


class RecordParts:
    """A record as two MessagePack arrays: what never changes, written once, and its state,
    written at each change (store/redis.py). A record with no state written yet is as it was
    received (``fresh``): a claim writes its static part alone."""

    def __init__(self) -> None:
        self._encode = msgspec.msgpack.Encoder().encode
        self._static = msgspec.msgpack.Decoder(_Static)
        self._state = msgspec.msgpack.Decoder(_State)

    @staticmethod
    def fresh(r: TaskRecord) -> bool:
        """Whether ``r``'s state is what a record without a state reads as (``join``): every
        state field at the record's default."""
        return (
            r.state is TaskState.RECEIVED and r.finished is None and r.link is None
            and not r.window_epoch and not r.sends and not r.results and r.error is None
            and not r.deliveries and r.key_id is None and not r.cost and r.trace is None
        )  # fmt: skip

    def static(self, r: TaskRecord) -> bytes:
        return self._encode(_Static(r.tenant, r.task, r.upstream_uuid, r.created, r.session))

    def state(self, r: TaskRecord) -> bytes:
        return self._encode(
            _State(
                r.state, r.finished, r.link, r.window_epoch, r.sends, r.results, r.error,
                r.deliveries, r.key_id, r.cost, r.trace,
            )
        )  # fmt: skip

    def join(self, static: bytes, state: bytes | None) -> TaskRecord:
        """The record of its two parts; with no state, as it was received (``fresh``)."""
        a = self._static.decode(static)
        if state is None:
            return TaskRecord(
                tenant=a.tenant, task=a.task, upstream_uuid=a.upstream_uuid, created=a.created,
                session=a.session,
            )  # fmt: skip
        b = self._state.decode(state)
        return TaskRecord(
            tenant=a.tenant, task=a.task, upstream_uuid=a.upstream_uuid, created=a.created,
            session=a.session, state=b.state, finished=b.finished, link=b.link,
            window_epoch=b.window_epoch, sends=b.sends, results=b.results, error=b.error,
            deliveries=b.deliveries, key_id=b.key_id, cost=b.cost, trace=b.trace,
        )  # fmt: skip


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
