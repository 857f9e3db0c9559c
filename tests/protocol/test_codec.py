"""Frame decoding task by task, encoding, and the decoder's promise never to raise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec import (
    decode_client_frame,
    decode_error_item,
    decode_image_result,
    decode_route,
    decode_server_frame,
    decode_tasks,
    encode,
    encode_answer,
    encode_data,
    encode_errors,
    encode_tasks,
)
from protocol.errors import error_item
from protocol.frames import (
    Authentication,
    ErrorItem,
    GetResponse,
    ImageResult,
    ImageTask,
    Ping,
    Pong,
    TaskAck,
)
from protocol.models import Catalogue, default_catalogue
from tests.protocol.conftest import MODEL, image_task

EXAMPLES = json.loads((Path(__file__).parent / "fixtures/model_card_examples.json").read_text())


# --------------------------------------------------------------------------- the model card


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e["request"]["taskUUID"][:8])
def test_model_card_requests_validate_and_reencode_equivalently(
    example: dict[str, Any], catalogue: Catalogue
) -> None:
    request = example["request"]
    [task] = decode_client_frame(encode_tasks([request]), catalogue)
    assert isinstance(task, ImageTask), task
    wire = msgspec.json.decode(encode(task))
    # everything the client said survives; reference images move to their canonical place
    for key, value in request.items():
        if key == "referenceImages":
            assert wire["inputs"]["referenceImages"] == value
        else:
            assert wire[key] == value
    # and the normalised form is a fixed point
    [again] = decode_client_frame(encode_tasks([wire]), catalogue)
    assert again == task


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e["response"]["taskUUID"][:8])
def test_model_card_responses_decode_as_result_items(example: dict[str, Any]) -> None:
    response = example["response"]
    result = decode_image_result(encode(response))
    assert result == ImageResult(**response)
    assert result.taskUUID == example["request"]["taskUUID"]
    assert msgspec.json.decode(encode(result)) == response
    assert decode_route(encode(response)).taskUUID == response["taskUUID"]


# --------------------------------------------------------------------------- frames


def test_mixed_frame_gives_one_outcome_per_task_in_order(catalogue: Catalogue) -> None:
    good = [image_task() for _ in range(3)]
    frame = [
        good[0],
        image_task(outputQuality=5),
        {"taskType": "ping", "ping": True},
        good[1],
        "not a task",
        {"taskType": "getResponse", "taskUUID": good[0]["taskUUID"]},
        image_task(width=1),
        {"taskType": "teleport", "taskUUID": good[2]["taskUUID"]},
        good[2],
    ]
    outcomes = decode_client_frame(encode_tasks(frame), catalogue)
    assert len(outcomes) == len(frame)
    kinds = [type(o).__name__ for o in outcomes]
    assert kinds == [
        "ImageTask",
        "ErrorItem",
        "Ping",
        "ImageTask",
        "ErrorItem",
        "GetResponse",
        "ErrorItem",
        "ErrorItem",
        "ImageTask",
    ]
    assert [o.taskUUID for o in outcomes if isinstance(o, ImageTask)] == [
        t["taskUUID"] for t in good
    ]
    codes = [o.code for o in outcomes if isinstance(o, ErrorItem)]
    assert codes == [
        "invalidOutputQuality",
        "invalidTask",
        "unsupportedDimensions",
        "unsupportedTaskType",
    ]


def test_bare_object_is_one_task(catalogue: Catalogue) -> None:
    [ping] = decode_client_frame(b'{"taskType": "ping", "ping": true}', catalogue)
    assert ping == Ping()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"", "invalidJSON"),
        (b"[", "invalidJSON"),
        (b'[{"taskType": "ping"}', "invalidJSON"),
        (b"{", "invalidJSON"),
        (b'"hello"', "invalidFrame"),
        (b"42", "invalidFrame"),
        (b"null", "invalidFrame"),
        (b"\xff\xfe", "invalidJSON"),
        (b'["\xff"]', "invalidTask"),
        (b'[{"taskType": "ping", "taskUUID": "\xff"}]', "invalidJSON"),
        (b'{"taskType": "ping", "taskUUID": "\xff"}', "invalidJSON"),
        (b'"\xff"', "invalidJSON"),
        (b"[" * 100_000, "invalidJSON"),
    ],
)
def test_bad_frames_give_one_error(frame: bytes, code: str, catalogue: Catalogue) -> None:
    [error] = decode_client_frame(frame, catalogue)
    assert isinstance(error, ErrorItem)
    assert error.code == code


def test_empty_array_is_no_tasks(catalogue: Catalogue) -> None:
    assert decode_client_frame(b"[]", catalogue) == []


def test_too_many_tasks(catalogue: Catalogue) -> None:
    frame = encode_tasks([{"taskType": "ping"}] * 5)
    assert len(decode_client_frame(frame, catalogue, max_tasks=5)) == 5
    [error] = decode_client_frame(frame, catalogue, max_tasks=4)
    assert isinstance(error, ErrorItem) and error.code == "tooManyTasks"


def test_client_task_kinds(catalogue: Catalogue) -> None:
    uuid = image_task()["taskUUID"]
    frame = [
        {"taskType": "authentication", "apiKey": "k", "connectionSessionUUID": uuid},
        {"taskType": "authentication", "apiKey": "k"},
        {"taskType": "ping", "taskUUID": uuid},
        {"taskType": "getResponse", "taskUUID": uuid},
    ]
    assert decode_client_frame(encode_tasks(frame), catalogue) == [
        Authentication(apiKey="k", connectionSessionUUID=uuid),
        Authentication(apiKey="k"),
        Ping(taskUUID=uuid),
        GetResponse(taskUUID=uuid),
    ]


@pytest.mark.parametrize(
    ("task", "code", "parameter"),
    [
        ({"taskType": "authentication"}, "missingApiKey", "apiKey"),
        ({"taskType": "authentication", "apiKey": 5}, "invalidApiKey", "apiKey"),
        ({"taskType": "getResponse"}, "missingTaskUUID", "taskUUID"),
        ({"taskType": "getResponse", "taskUUID": "x"}, "invalidTaskUUID", "taskUUID"),
        ({"taskUUID": "x"}, "missingTaskType", "taskType"),
        ({"taskType": 7}, "unsupportedTaskType", "taskType"),
    ],
)
def test_envelope_errors(
    task: dict[str, Any], code: str, parameter: str, catalogue: Catalogue
) -> None:
    [error] = decode_client_frame(encode_tasks([task]), catalogue)
    assert isinstance(error, ErrorItem)
    assert (error.code, error.parameter) == (code, parameter)
    assert error.taskType == (task["taskType"] if isinstance(task.get("taskType"), str) else None)


def test_getresponse_error_links_the_polling_page(catalogue: Catalogue) -> None:
    [error] = decode_client_frame(b'[{"taskType":"getResponse","taskUUID":"x"}]', catalogue)
    assert isinstance(error, ErrorItem)
    assert error.documentation == "https://runware.ai/docs/platform/task-polling"
    assert error.taskUUID == "x"


# --------------------------------------------------------------------------- encoding


def test_data_and_error_frames() -> None:
    ack = TaskAck(taskType="imageInference", taskUUID="u")
    assert msgspec.json.decode(encode_data([ack, Pong(taskUUID="p")])) == {
        "data": [
            {"taskType": "imageInference", "taskUUID": "u"},
            {"taskType": "ping", "pong": True, "taskUUID": "p"},
        ]
    }
    error = error_item("taskNotFound", parameter="taskUUID", task_type="getResponse", task_uuid="u")
    assert msgspec.json.decode(encode_errors([error])) == {
        "errors": [
            {
                "code": "taskNotFound",
                "message": "No task with this taskUUID exists for this API key.",
                "parameter": "taskUUID",
                "documentation": "https://runware.ai/docs/platform/task-polling",
                "taskType": "getResponse",
                "taskUUID": "u",
            }
        ]
    }


def test_success_items_carry_no_error_keys() -> None:
    result = ImageResult(
        taskType="imageInference",
        taskUUID="t",
        imageUUID="i",
        imageURL="https://x/i.jpg",
        status="success",
    )
    assert set(msgspec.json.decode(encode(result))) == {
        "taskType",
        "taskUUID",
        "imageUUID",
        "imageURL",
        "status",
    }


def test_server_frame_items_stay_raw_until_routed() -> None:
    item = b'{"taskType":"imageInference","taskUUID":"t","imageUUID":"i","imageURL":"u"}'
    frame = decode_server_frame(b'{"data":[' + item + b"]}")
    assert frame.errors == []
    [raw] = frame.data
    assert bytes(raw) == item
    assert encode_data(frame.data) == b'{"data":[' + item + b"]}"
    error = decode_server_frame(b'{"errors":[{"code":"timeoutProvider","message":"m"}]}')
    assert decode_error_item(error.errors[0]).code == "timeoutProvider"


# --------------------------------------------------------------------------- properties

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)
_task_like = st.fixed_dictionaries(
    {"taskType": st.sampled_from(["imageInference", "ping", "getResponse", "authentication"])},
    optional={
        "taskUUID": st.uuids(version=4).map(str) | st.text(),
        "model": st.just(MODEL) | st.text(),
        "positivePrompt": st.text(max_size=50) | st.integers(),
        "width": st.integers(-5, 6000) | _json,
        "height": st.integers(-5, 6000),
        "outputQuality": st.integers(0, 120) | _json,
        "numberResults": st.integers(-1, 25),
        "referenceImages": _json,
        "inputs": _json,
        "safety": _json,
        "apiKey": _json,
        "extra": _json,
    },
)


def _assert_outcomes(outcomes: list[Any]) -> None:
    for outcome in outcomes:
        assert isinstance(outcome, ImageTask | ErrorItem | Ping | GetResponse | Authentication)
        encode(outcome)  # whatever comes out can go back on the wire


@settings(max_examples=300, deadline=None)
@given(st.lists(_json | _task_like, max_size=6))
def test_arbitrary_json_frames_never_raise(frame: list[Any]) -> None:
    outcomes = decode_client_frame(json.dumps(frame).encode(), default_catalogue())
    assert len(outcomes) == len(frame)
    _assert_outcomes(outcomes)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_arbitrary_json_values_never_raise(value: Any) -> None:
    _assert_outcomes(decode_client_frame(json.dumps(value).encode(), default_catalogue()))


@settings(max_examples=500, deadline=None)
@given(
    st.binary(max_size=200)
    | st.text(max_size=200).map(str.encode)
    | st.tuples(_task_like, st.binary(max_size=4)).map(
        lambda p: json.dumps([p[0]]).encode().replace(b'"', b'"' + p[1], 1)
    )
)
def test_arbitrary_bytes_never_raise(frame: bytes) -> None:
    _assert_outcomes(decode_client_frame(frame, default_catalogue()))


_sizes = st.sampled_from(default_catalogue().get(MODEL).size_labels)  # type: ignore[union-attr]
_valid_tasks = st.builds(
    lambda uuid, prompt, size, extra: {
        "taskType": "imageInference",
        "taskUUID": str(uuid),
        "model": MODEL,
        "positivePrompt": prompt,
        "width": int(size.split("x")[0]),
        "height": int(size.split("x")[1]),
        **extra,
    },
    st.uuids(version=4),
    st.text(min_size=2, max_size=300).filter(lambda s: 2 <= len(s) <= 3000),
    _sizes,
    st.fixed_dictionaries(
        {},
        optional={
            "outputType": st.sampled_from(["URL", "dataURI", "base64Data"]),
            "outputFormat": st.sampled_from(["JPG", "png", "WebP"]),
            "outputQuality": st.integers(20, 99),
            "ttl": st.integers(60, 10**9),
            "numberResults": st.integers(1, 20),
            "deliveryMethod": st.sampled_from(["sync", "async"]),
            "includeCost": st.booleans(),
            "safety": st.fixed_dictionaries(
                {},
                optional={"checkContent": st.booleans(), "mode": st.sampled_from(["none", "fast"])},
            ),
            "webhookURL": st.just("https://hooks.example.com/runware?token=x"),
            "referenceImages": st.lists(st.uuids().map(str), min_size=1, max_size=1),
        },
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_valid_tasks, min_size=1, max_size=5))
def test_valid_tasks_round_trip(tasks: list[dict[str, Any]]) -> None:
    catalogue = default_catalogue()
    outcomes = decode_client_frame(encode_tasks(tasks), catalogue)
    assert all(isinstance(o, ImageTask) for o in outcomes), outcomes
    for sent, task in zip(tasks, outcomes, strict=True):
        assert isinstance(task, ImageTask)
        assert task.taskUUID == sent["taskUUID"]
        assert task.positivePrompt == sent["positivePrompt"]
        assert task.outputFormat == sent.get("outputFormat", "JPG").upper()
        assert task.numberResults == sent.get("numberResults", 1)
    # the checked form decodes to itself
    assert decode_client_frame(encode_tasks(outcomes), catalogue) == outcomes


def test_decode_tasks_accepts_text() -> None:
    assert decode_tasks('[{"taskType":"ping"}]') == [Ping()]


def test_an_answer_is_data_then_errors_never_in_one_frame() -> None:
    ack = TaskAck(taskType="imageInference", taskUUID="u")
    error = error_item("taskNotFound", task_type="getResponse", task_uuid="v")
    assert encode_answer([], []) == []
    assert encode_answer([ack], []) == [encode_data([ack])]
    assert encode_answer([], [error]) == [encode_errors([error])]
    assert encode_answer([ack], [error]) == [encode_data([ack]), encode_errors([error])]


NESTING = st.lists(st.sampled_from(["{", "["]), min_size=1, max_size=3000)


def _nested(openers: list[str], inner: str = "1") -> bytes:
    """Valid JSON nested as deep as ``openers`` says: objects get a key at every level."""
    text = inner
    for opener in reversed(openers):
        text = '{"a":' + text + "}" if opener == "{" else "[" + text + "]"
    return text.encode()


@settings(max_examples=60, deadline=None)
@given(openers=NESTING, wrap=st.sampled_from(["bare", "array", "task"]))
def test_nesting_of_any_depth_is_an_error_item_never_an_exception(
    openers: list[str], wrap: str
) -> None:
    catalogue = default_catalogue()
    nested = _nested(openers)
    if wrap == "array":
        nested = b"[" + nested + b"]"
    elif wrap == "task":
        task = json.dumps(image_task()).encode()
        nested = task[:-1] + b',"x":' + nested + b"}"
    outcomes = decode_client_frame(nested, catalogue, max_tasks=256)
    assert outcomes
    assert all(isinstance(o, ErrorItem) for o in outcomes)


@pytest.mark.parametrize("opener", ["{", "["])
def test_a_2kb_frame_nested_1000_deep_is_invalid_json(opener: str, catalogue: Catalogue) -> None:
    [outcome] = decode_client_frame(_nested([opener] * 1000), catalogue, max_tasks=256)
    assert isinstance(outcome, ErrorItem)
    assert outcome.code in ("invalidJSON", "invalidTask")
