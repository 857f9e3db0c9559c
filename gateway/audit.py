"""The audit trail: one info line per finished task, per failed authentication, per limit hit,
per finished delivery.

Every line carries ``"audit"`` (``task``, ``auth``, ``limit``, ``delivery``), so one filter
finds them all. A key appears only as its **key id**: the first 12 hex digits of the key's
SHA-256 (the gateway holds keys as their SHA-256 only, and ``key_sha256`` in the configuration
starts with the same digits), never the key.

Cost (``python -m bench.audit``): a task's line is made in the registry's ``on_final`` hook,
and only there. With JSON logs (the default off a TTY) lines skip structlog's processor chain,
which cost about ten times as much per line: each is a msgspec struct with the keys and shape of
structlog's lines (``level``, ``timestamp``: the event's own), and the lines waiting are encoded
in one call and written to the same stream in one system call, at most ``FLUSH_INTERVAL`` after
the first of them or at ``FLUSH_LINES``, and as the gateway stops (a write per line cost more
than the line). So a line can lag its event by a tenth of a second, and a process killed
outright loses at most that much. On a TTY (the console renderer) lines go through structlog,
where nobody counts microseconds. ``server.audit = false`` or a log level above info: no Audit
at all, and every hook is a ``None`` test.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, BinaryIO, TextIO

import msgspec
import structlog

from gateway.audit_lines import AuthLine, DeliveryLine, LimitLine, TaskLine
from gateway.log import log_output
from gateway.store.base import Delivery, TaskRecord
from protocol.frames import ErrorItem

__all__ = ["Audit", "key_id", "quota_limit"]

# Lines wait at most this long, or until this many are waiting, to be written together: one
# system call for many lines (a write per line, or per loop turn, cost more than the lines)
FLUSH_INTERVAL = 0.1
FLUSH_LINES = 512
KEY_ID_HEX = 12  # 48 bits: tells a deployment's keys apart, and tells nothing of the key

log = structlog.get_logger("tenebra.audit")


def key_id(digest: bytes) -> str:
    """The key id of a key whose SHA-256 is ``digest`` (gateway.tenants.hash_key)."""
    return digest[: KEY_ID_HEX // 2].hex()


def quota_limit(error: ErrorItem) -> str:
    """Which of a tenant's limits (``tenebra_tenant_refused``'s ``limit``) refused a task with
    ``error``, from ``TenantQuotas.check``: each limit answers a code of its own there, and the
    two ``unsupportedParameter`` limits name their parameter."""
    code = error.code
    if code == "rateLimitExceeded":
        return "tenant_rate"
    if code == "insufficientCredits":
        return "tenant_budget_per_day"
    if code == "invalidNumberResults":
        return "tenant_max_number_results"
    if code == "unsupportedParameter":
        return (
            "tenant_allow_webhooks" if error.parameter == "webhookURL" else "tenant_allow_uploads"
        )
    return code


class _Stamps:
    """ISO 8601 UTC timestamps like structlog's TimeStamper's (``...ssZ``), to the millisecond:
    made once per millisecond (a busy gateway ends many tasks in one), the date and time once
    per second."""

    __slots__ = ("_clock", "_ms", "_prefix", "_second", "_stamp")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._ms = self._second = -1
        self._prefix = self._stamp = ""

    def __call__(self) -> str:
        ms = int(self._clock() * 1000.0)
        if ms == self._ms:
            return self._stamp
        self._ms = ms
        second = ms // 1000
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        self._stamp = f"{self._prefix}.{ms % 1000:03d}Z"
        return self._stamp


class Audit:
    """The audit lines. ``write`` takes one line's text (newline included): the log stream's by
    default (:meth:`from_logging`); None writes through structlog instead. A public attribute:
    a test (or an embedding application) points it elsewhere."""

    def __init__(
        self,
        write: Callable[[bytes], object] | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.write = write
        self._stamp = _Stamps(wall_clock)
        self._encode_lines = msgspec.json.Encoder().encode_lines
        self._pending: list[Any] = []  # lines not yet written (FLUSH_INTERVAL, FLUSH_LINES)

    @classmethod
    def from_logging(cls, enabled: bool) -> Audit | None:
        """As configured: None when off (``server.audit``) or when info lines are filtered
        out; JSON lines straight to the log stream when logs are JSON."""
        output = log_output()
        if not enabled or (output is not None and output.level > logging.INFO):
            return None
        if output is None or not output.json:
            return cls()
        return cls(_line_writer(output.stream))

    def _emit(self, line: Any) -> None:
        if self.write is None:
            fields = msgspec.structs.asdict(line)
            del fields["level"], fields["timestamp"]
            log.info(fields.pop("event"), **{k: v for k, v in fields.items() if v is not None})
            return
        self._emit_many([line])

    def flush(self) -> None:
        """The lines waiting, in one write (also called as the gateway stops)."""
        pending, self._pending = self._pending, []
        if pending and self.write is not None:
            self.write(self._encode_lines(pending))

    # ------------------------------------------------------------------ the lines

    def tasks(self, records: list[TaskRecord]) -> None:
        """``registry.on_final_batch``: :meth:`task` for each (one timestamp for the batch:
        they ended in the same loop turn)."""
        if self.write is None:
            for record in records:
                self.task(record)
            return
        stamp = self._stamp()
        self._emit_many([_task_line(record, stamp) for record in records])

    def _emit_many(self, lines: list[Any]) -> None:
        if not lines or self.write is None:
            return
        pending = self._pending
        if not pending:
            try:
                asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)
            except RuntimeError:  # no loop (a script): written at once
                self.write(self._encode_lines(lines))
                return
        pending.extend(lines)
        if len(pending) >= FLUSH_LINES:
            self.flush()  # the timer flushes what comes after, or nothing

    def task(self, record: TaskRecord) -> None:
        """``registry.on_final``: the task's line."""
        self._emit(_task_line(record, self._stamp()))

    def auth_failed(
        self, address: str, reason: str, door: str, refused_for: float | None = None
    ) -> None:
        """A key refused (``invalidApiKey``) or missing (``missingApiKey``); ``refused_for``:
        the address is refused that many seconds from this failure on."""
        self._emit(
            AuthLine(
                event="authentication failed",
                audit="auth",
                address=address,
                reason=reason,
                door=door,
                refused_for=refused_for or None,
                level="info",
                timestamp=self._stamp(),
            )
        )

    def limit(
        self,
        tenant: str,
        limit: str,
        code: str,
        key: str | None = None,
        task_uuid: str | None = None,
    ) -> None:
        """A tenant's limit (``tenebra_tenant_refused``'s ``limit``) refused a task or a
        connection, with the code its client was answered."""
        self._emit(
            LimitLine(
                event="limit hit",
                audit="limit",
                tenant=tenant,
                limit=limit,
                code=code,
                key_id=key,
                taskUUID=task_uuid,
                level="info",
                timestamp=self._stamp(),
            )
        )

    def delivery(self, tenant: str, task_uuid: str, delivery: Delivery) -> None:
        """A webhook or upload reached its final outcome (``Deliveries.on_outcome``)."""
        self._emit(
            DeliveryLine(
                event="delivery finished",
                audit="delivery",
                tenant=tenant,
                taskUUID=task_uuid,
                delivery=delivery.id,
                kind=delivery.kind,
                state=delivery.state,
                attempts=delivery.attempts,
                last_status=delivery.last_status,
                last_error=delivery.last_error,
                level="info",
                timestamp=self._stamp(),
            )
        )


def _deliveries(deliveries: tuple[Delivery, ...]) -> dict[str, dict[str, int]]:
    """``{"webhook": {"delivered": 1, "pending": 1}}``: by kind, then state."""
    summary: dict[str, dict[str, int]] = {}
    for delivery in deliveries:
        states = summary.setdefault(delivery.kind, {})
        states[delivery.state] = states.get(delivery.state, 0) + 1
    return summary


def _line_writer(stream: TextIO) -> Callable[[bytes], object]:
    """Whole lines, flushed as structlog's PrintLogger flushes its own after each: never
    interleaved with another line. To the stream's bytes underneath where it has them (the
    text layer holds nothing between structlog's flushed lines)."""
    raw: BinaryIO | None = getattr(stream, "buffer", None)
    if raw is None:

        def write_text(data: bytes) -> None:
            stream.write(data.decode())
            stream.flush()

        return write_text

    def write(data: bytes) -> None:
        raw.write(data)
        raw.flush()

    return write


def _tenths(value: float) -> float:
    """``value`` to one decimal, half up. round(value, 1) rounds through a decimal string
    (correctly rounded, dtoa and back): 1.5% of the gateway's CPU at its ceiling, for a latency
    in a log line; n / 10.0 is the double nearest n tenths all the same. What is not a finite
    latency of this process's clock (NaN, infinite, negative: a record another replica
    started, on its own clock) is left to round as before."""
    if 0.0 <= value < 1e15:
        return int(value * 10.0 + 0.5) / 10.0
    return round(value, 1)


def _task_line(record: TaskRecord, stamp: str) -> TaskLine:
    """A finished task's line: its deliveries as they stand at its end (each one's outcome is a
    ``delivery`` line of its own)."""
    created = record.created
    finished = record.finished
    error = record.error
    deliveries = record.deliveries
    return TaskLine(
        event="task finished",
        audit="task",
        tenant=record.tenant,
        key_id=record.key_id,
        taskUUID=record.task.taskUUID,
        state=record.state,
        images=len(record.results),
        cost=record.cost,
        latency_ms=_tenths((finished - created) * 1000.0) if finished is not None else 0.0,
        deliveries=_deliveries(deliveries) if deliveries else None,
        error=error.code if error is not None else None,
        level="info",
        timestamp=stamp,
    )
