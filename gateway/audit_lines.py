"""The audit trail's lines (gateway.audit) as msgspec Structs, with the keys and shape of
structlog's JSON lines. A module of their own: gateway.audit is compiled with mypyc (``make
compiled``), which builds a Struct subclass as a plain class and loses its options."""

from __future__ import annotations

import msgspec

from gateway.store.base import TaskState

__all__ = ["AuthLine", "DeliveryLine", "LimitLine", "TaskLine"]


class TaskLine(msgspec.Struct, omit_defaults=True, kw_only=True, gc=False):
    event: str
    audit: str
    tenant: str
    key_id: str | None
    taskUUID: str
    state: TaskState  # encoded as its value, without a Python-level .value per line
    images: int
    cost: float
    latency_ms: float
    deliveries: dict[str, dict[str, int]] | None = None
    error: str | None = None
    level: str  # no default: always written (omit_defaults)
    timestamp: str


class AuthLine(msgspec.Struct, omit_defaults=True, kw_only=True, gc=False):
    event: str
    audit: str
    address: str
    reason: str
    door: str
    refused_for: float | None = None
    level: str  # no default: always written (omit_defaults)
    timestamp: str


class LimitLine(msgspec.Struct, omit_defaults=True, kw_only=True, gc=False):
    event: str
    audit: str
    tenant: str
    limit: str
    code: str
    key_id: str | None = None
    taskUUID: str | None = None
    level: str  # no default: always written (omit_defaults)
    timestamp: str


class DeliveryLine(msgspec.Struct, omit_defaults=True, kw_only=True, gc=False):
    event: str
    audit: str
    tenant: str
    taskUUID: str
    delivery: str
    kind: str
    state: str
    attempts: int
    last_status: int | None = None
    last_error: str | None = None
    level: str  # no default: always written (omit_defaults)
    timestamp: str
