"""A task record as the Redis store (store/redis.py) keeps it: one MessagePack array of
``TaskRecord``'s fields (no field names). A Struct only: a module compiled
with mypyc cannot define one (it would build a plain class)."""

from __future__ import annotations

import msgspec

from gateway.store.base import Delivery, TaskState
from protocol.frames import ErrorItem, ImageResult, ImageTask

__all__ = ["StoredRecord"]


class StoredRecord(msgspec.Struct, array_like=True, gc=False):
    tenant: str
    task: ImageTask
    upstream_uuid: str
    created: float
    session: str | None
    state: TaskState
    finished: float | None
    link: int | None
    window_epoch: int
    sends: int
    results: tuple[ImageResult, ...]
    error: ErrorItem | None
    deliveries: tuple[Delivery, ...]
    key_id: str | None
    cost: float
    trace: str | None
