"""One dispatch of a frame's tasks, shared by the WebSocket and REST doors.

A frame's outcomes (decoded and checked by :mod:`protocol.codec`) become an :class:`Answer`:
data items and error items, kept apart. What differs between the doors is behind :class:`Door`:
who the sender is, how an authentication task is taken, and where a sync task's results go.
Every error item the dispatch answers is counted in ``tenebra_errors_total`` here, apart from
those :meth:`Intake.submit` counts itself, so both doors count alike.

The loop is the gateway's hot path: an ``imageInference`` task is tested for first, by exact
type, and costs no allocation of its own beyond the intake's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from gateway.intake import Intake
from gateway.metrics import Metrics
from gateway.quotas import TokenBucket
from gateway.replication import FrameClaims
from protocol.codec import Outcome, encode_answer
from protocol.errors import error_item
from protocol.frames import Authentication, ErrorItem, GetResponse, ImageTask, Ping, Pong

__all__ = ["Answer", "Dispatch", "Door"]

_PONG = Pong()


class Answer:
    """What a frame's tasks answer. With ``send``, a door may send what is gathered so far
    (before an authentication reply, or a getResponse answer in a frame of its own)."""

    __slots__ = ("_send", "data", "errors")

    def __init__(self, send: Callable[[bytes], object] | None = None) -> None:
        self.data: list[Any] = []
        self.errors: list[ErrorItem] = []
        self._send = send

    def flush(self) -> None:
        """Data first, then errors, never in one frame (SDK 1.8 drops the data of such a frame)."""
        if self._send is None or not (self.data or self.errors):
            return  # most frames (sync tasks) answer nothing now: their results come later
        for frame in encode_answer(self.data, self.errors):
            self._send(frame)
        self.data.clear()
        self.errors.clear()


class Door(Protocol):
    """The door a frame came in by."""

    @property
    def tenant(self) -> str | None:
        """Who sent the frame; None before authentication."""

    @property
    def polls(self) -> TokenBucket:
        """The sender's getResponse allowance."""

    def authenticate(self, auth: Authentication, answer: Answer) -> None: ...

    def submit_sync(self, tenant: str, task: ImageTask) -> ErrorItem | None:
        """Submit a sync task with the door's subscriber for its results; its error, if any
        (already counted by the intake)."""


class Dispatch:
    def __init__(self, intake: Intake, metrics: Metrics) -> None:
        self.intake = intake
        self.metrics = metrics

    def frame(
        self, outcomes: list[Outcome], door: Door, answer: Answer, claims: FrameClaims | None = None
    ) -> None:
        """``claims``: what the shared store holds for the frame (``Intake.claim``), if any."""
        if claims is None:
            self._dispatch(outcomes, door, answer)
            return
        intake = self.intake
        intake.frame = claims
        try:
            self._dispatch(outcomes, door, answer)
        finally:
            intake.frame = None
            intake.released(claims)

    def _dispatch(self, outcomes: list[Outcome], door: Door, answer: Answer) -> None:
        intake = self.intake
        data, errors = answer.data, answer.errors
        tenant = door.tenant
        for outcome in outcomes:
            if type(outcome) is ImageTask and tenant is not None:  # nearly every task
                if outcome.deliveryMethod == "sync":
                    refused = door.submit_sync(tenant, outcome)
                    if refused is not None:
                        errors.append(refused)
                else:
                    record = intake.submit(tenant, outcome, None)
                    if isinstance(record, ErrorItem):
                        errors.append(record)
                    else:
                        data.append(intake.ack(outcome))
            elif type(outcome) is Ping:
                data.append(_PONG if outcome.taskUUID is None else Pong(taskUUID=outcome.taskUUID))
            elif type(outcome) is ErrorItem:
                self._error(outcome, errors)
            elif type(outcome) is Authentication:
                door.authenticate(outcome, answer)
                tenant = door.tenant
            elif tenant is None and isinstance(outcome, (GetResponse, ImageTask)):
                task_type = "getResponse" if type(outcome) is GetResponse else "imageInference"
                self._error(
                    error_item("missingApiKey", task_type=task_type, task_uuid=outcome.taskUUID),
                    errors,
                )
            elif type(outcome) is GetResponse and tenant is not None:
                self._poll(tenant, outcome, door, answer)

    def _poll(self, tenant: str, poll: GetResponse, door: Door, answer: Answer) -> None:
        if not door.polls.take():
            message = "Too many getResponse tasks on this connection. Retry with backoff."
            refused = error_item(
                "rateLimitExceeded",
                message=message,
                parameter="taskUUID",
                task_type="getResponse",
                task_uuid=poll.taskUUID,
            )
            self._error(refused, answer.errors)
            return
        found, failed = self.intake.poll(tenant, poll.taskUUID)
        if found:
            # a frame of its own, so that no frame holds more than one task's results
            answer.flush()
            answer.data.extend(found)
            answer.flush()
        for error in failed:
            self._error(error, answer.errors)

    def _error(self, error: ErrorItem, errors: list[ErrorItem]) -> None:
        self.metrics.errors.labels(error.code).inc()
        errors.append(error)
