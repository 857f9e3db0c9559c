"""The shared dispatch of a frame's tasks, without sockets: a fake intake and a fake door."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

import gateway.dispatch
from gateway.dispatch import Answer, Dispatch
from gateway.metrics import Metrics
from gateway.quotas import TokenBucket
from protocol.codec import Outcome
from protocol.errors import error_item
from protocol.frames import (
    NO_SAFETY,
    Authentication,
    ErrorItem,
    GetResponse,
    ImageTask,
    Ping,
    TaskAck,
)
from tests.compiled import pure_python_only


def image_task(delivery: str = "sync") -> ImageTask:
    return ImageTask(
        taskUUID=str(uuid.uuid4()),
        model="m",
        positivePrompt="pp",
        width=64,
        height=64,
        outputType="URL",
        outputFormat="JPG",
        outputQuality=95,
        numberResults=1,
        deliveryMethod=delivery,  # type: ignore[arg-type]
        includeCost=False,
        safety=NO_SAFETY,
    )


class FakeIntake:
    def __init__(self) -> None:
        self.submitted: list[tuple[str, str]] = []

    def submit(self, tenant: str, task: ImageTask, subscriber: object) -> object:
        self.submitted.append((tenant, task.taskUUID))
        return object()

    @staticmethod
    def ack(task: ImageTask) -> TaskAck:
        return TaskAck(taskType="imageInference", taskUUID=task.taskUUID)

    def poll(self, tenant: str, task_uuid: str) -> tuple[list[Any], list[ErrorItem]]:
        if task_uuid.startswith("0"):
            return [], [error_item("taskNotFound", task_type="getResponse", task_uuid=task_uuid)]
        return [{"taskUUID": task_uuid, "status": "success"}], []


class FakeDoor:
    def __init__(self, tenant: str | None = None, burst: int = 10) -> None:
        self.tenant = tenant
        self.polls = TokenBucket(0.0, burst, lambda: 0.0)
        self.synced: list[str] = []

    def authenticate(self, auth: Authentication, answer: Answer) -> None:
        answer.flush()
        self.tenant = auth.apiKey  # the fake's keys are tenants

    def submit_sync(self, tenant: str, task: ImageTask) -> ErrorItem | None:
        self.synced.append(task.taskUUID)
        return None


# a duck-typed intake: Dispatch, compiled, accepts only the real one
needs_python = pure_python_only(gateway.dispatch)


def run(outcomes: list[Outcome], door: FakeDoor) -> tuple[list[bytes], Metrics]:
    metrics = Metrics()
    sent: list[bytes] = []
    answer = Answer(sent.append)
    Dispatch(FakeIntake(), metrics).frame(outcomes, door, answer)  # type: ignore[arg-type]
    answer.flush()
    return sent, metrics


def frames(sent: list[bytes]) -> list[dict[str, Any]]:
    return [msgspec.json.decode(frame) for frame in sent]


def counted(metrics: Metrics) -> dict[str, float]:
    return {
        sample.labels["code"]: sample.value
        for family in metrics.errors.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }


@needs_python
def test_before_authentication_tasks_are_refused_and_counted_what_follows_it_goes_on() -> None:
    early, late = image_task(), image_task("async")
    door = FakeDoor()
    sent, metrics = run([early, Ping(), Authentication(apiKey="alpha"), late], door)
    assert frames(sent) == [
        {"data": [{"taskType": "ping", "pong": True}]},
        {"errors": [msgspec.to_builtins(error_item(
            "missingApiKey", task_type="imageInference", task_uuid=early.taskUUID
        ))]},
        {"data": [{"taskType": "imageInference", "taskUUID": late.taskUUID}]},
    ]  # fmt: skip
    assert counted(metrics) == {"missingApiKey": 1.0}


@needs_python
def test_sync_tasks_go_to_the_door_async_ones_are_acked() -> None:
    sync, later = image_task(), image_task("async")
    door = FakeDoor("alpha")
    sent, _ = run([sync, later], door)
    assert door.synced == [sync.taskUUID]
    assert frames(sent) == [{"data": [{"taskType": "imageInference", "taskUUID": later.taskUUID}]}]


@needs_python
def test_decode_errors_are_answered_and_counted() -> None:
    bad = error_item("invalidJSON")
    sent, metrics = run([bad, bad], FakeDoor("alpha"))
    assert [len(f["errors"]) for f in frames(sent)] == [2]
    assert counted(metrics) == {"invalidJSON": 2.0}


@needs_python
def test_each_get_response_answer_is_a_frame_of_its_own_past_the_burst_refused() -> None:
    found = ["1" + str(uuid.uuid4())[1:] for _ in range(3)]  # the fake finds these
    missing = "0" + str(uuid.uuid4())[1:]  # and not this one, which the burst refuses anyway
    polls: list[Outcome] = [GetResponse(taskUUID=u) for u in [*found, missing]]
    sent, metrics = run([Ping(), *polls], FakeDoor("alpha", burst=3))
    assert frames(sent) == [
        {"data": [{"taskType": "ping", "pong": True}]},
        *({"data": [{"taskUUID": u, "status": "success"}]} for u in found),
        {"errors": [msgspec.to_builtins(error_item(
            "rateLimitExceeded",
            message="Too many getResponse tasks on this connection. Retry with backoff.",
            parameter="taskUUID",
            task_type="getResponse",
            task_uuid=missing,
        ))]},
    ]  # fmt: skip
    assert counted(metrics) == {"rateLimitExceeded": 1.0}


def test_a_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    now = [0.0]
    bucket = TokenBucket(2.0, 3, lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] = 0.5  # one token back
    assert [bucket.take() for _ in range(2)] == [True, False]
    now[0] = 100.0  # never more than the burst
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
