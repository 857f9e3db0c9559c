"""A task record's two parts in the Redis store (store/redis.py), as MessagePack arrays: what
never changes, written once with its claim, and its state, written at each change. Structs
only: a module compiled with mypyc cannot define them (it would build a plain class)."""

from __future__ import annotations

import msgspec

from gateway.store.base import Delivery, TaskState
from protocol.frames import ErrorItem, ImageResult, ImageTask

__all__ = ["StatePart", "StaticPart"]


class StaticPart(msgspec.Struct, array_like=True, gc=False):
    tenant: str
    task: ImageTask
    upstream_uuid: str
    created: float
    session: str | None


class StatePart(msgspec.Struct, array_like=True, gc=False):
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
