"""A task record as the Redis store (store/redis.py) keeps it: one MessagePack array of
``TaskRecord``'s fields in their order (no field names), which is what a record's fields as
one tuple (``msgspec.structs.astuple``) encode to. A Struct only: a module compiled with mypyc
cannot define one (it would build a plain class)."""

from __future__ import annotations

import msgspec

from gateway.store.base import Delivery, TaskState
from protocol.frames import ErrorItem, ImageResult, ImageTask

__all__ = ["StoredRecord"]


class StoredRecord(msgspec.Struct, array_like=True, gc=False):
    tenant: str
    task: ImageTask
    upstream_uuid: str
    state: TaskState
    created: float
    finished: float | None
    link: int | None
    window_epoch: int
    sends: int
    results: tuple[ImageResult, ...]
    error: ErrorItem | None
    deliveries: tuple[Delivery, ...]
    session: str | None
    key_id: str | None
    cost: float
    trace: str | None
