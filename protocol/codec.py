"""Bytes in, values out, and back: the one place frames are decoded and encoded.

A client frame is decoded task by task: the frame is first split into undecoded elements
(:class:`msgspec.Raw`), then each element is decoded and validated on its own, so one bad task
yields its own error item and the others go on. Nothing here raises on bad input.

Server frames are read the way a relay needs them: items stay :class:`msgspec.Raw` until routed,
and only the routing fields are decoded.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from protocol.errors import error_item
from protocol.frames import (
    Authentication,
    AuthenticationResult,
    ClientTask,
    DataFrame,
    ErrorFrame,
    ErrorItem,
    GetResponse,
    ImageInference,
    ImageResult,
    ImageTask,
    ItemRoute,
    Ping,
    ServerFrame,
    TaskHeader,
)
from protocol.models import Catalogue
from protocol.validate import decode_error, validate_image_inference

__all__ = [
    "Outcome",
    "decode_auth_reply",
    "decode_client_frame",
    "decode_error_item",
    "decode_image_result",
    "decode_route",
    "decode_server_frame",
    "decode_tasks",
    "encode",
    "encode_answer",
    "encode_data",
    "encode_errors",
    "encode_tasks",
]

#: What one element of a client frame becomes: a task ready to act on, or its error item.
Outcome = Authentication | Ping | GetResponse | ImageTask | ErrorItem

_elements = msgspec.json.Decoder(list[msgspec.Raw])
_tasks = msgspec.json.Decoder(list[ClientTask])
_task = msgspec.json.Decoder(ClientTask)
_header = msgspec.json.Decoder(TaskHeader)
_server_frame = msgspec.json.Decoder(ServerFrame)
_route = msgspec.json.Decoder(ItemRoute)
_image_result = msgspec.json.Decoder(ImageResult)
_error_item = msgspec.json.Decoder(ErrorItem)
_auth_reply = msgspec.json.Decoder(AuthenticationResult)
_encoder = msgspec.json.Encoder()

_WHITESPACE = b" \t\r\n"


def _elements_of(frame: bytes) -> list[msgspec.Raw] | ErrorItem:
    try:
        return _split(frame)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return error_item("invalidJSON")
    except RecursionError:  # msgspec's own depth limit, whatever the outer type
        return error_item("invalidJSON", message="The message is nested too deeply.")


def _split(frame: bytes) -> list[msgspec.Raw] | ErrorItem:
    start = frame.lstrip(_WHITESPACE)[:1]
    if start == b"{":
        # A bare object is one task; SDKs always send arrays, accepting both costs nothing.
        _header.decode(frame)
        return [msgspec.Raw(frame)]
    if start != b"[":
        msgspec.json.decode(frame)
        return error_item("invalidFrame")
    return _elements.decode(frame)


def decode_tasks(
    frame: bytes | str, *, max_tasks: int | None = None
) -> list[ClientTask | ErrorItem]:
    """Each element of a client frame, decoded on its own (types and ranges checked).

    A frame that is not JSON, not an array or object, or holds more than ``max_tasks`` tasks
    gives a single error item. The result has exactly one entry per task otherwise, in order.
    """
    data = frame.encode() if isinstance(frame, str) else frame
    # Fast path: a frame of good tasks decodes in one pass; on any error, go task by task.
    try:
        tasks: list[ClientTask | ErrorItem] = list(_tasks.decode(data))
        if max_tasks is None or len(tasks) <= max_tasks:
            return tasks
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        pass
    elements = _elements_of(data)
    if isinstance(elements, ErrorItem):
        return [elements]
    if max_tasks is not None and len(elements) > max_tasks:
        return [
            error_item(
                "tooManyTasks",
                message=f"Too many tasks in one message: {len(elements)}, at most {max_tasks}.",
            )
        ]
    return [_decode_one(raw) for raw in elements]


def _decode_one(raw: msgspec.Raw) -> ClientTask | ErrorItem:
    try:
        task: ClientTask = _task.decode(raw)
        return task
    except msgspec.ValidationError as exc:
        try:
            header = _header.decode(raw)
        except msgspec.ValidationError:
            return error_item("invalidTask")
        except UnicodeDecodeError:
            return error_item("invalidJSON")
        return decode_error(exc, header)
    except (msgspec.DecodeError, UnicodeDecodeError):
        # The frame split fine but an element is not valid JSON, e.g. bad UTF-8 in a string
        # (which msgspec reports as UnicodeDecodeError, not DecodeError).
        return error_item("invalidJSON")
    except RecursionError:
        return error_item("invalidTask", message="The task is nested too deeply.")


def decode_client_frame(
    frame: bytes | str, catalogue: Catalogue, *, max_tasks: int | None = None
) -> list[Outcome]:
    """A client frame decoded and validated: one outcome per task, in order."""
    outcomes: list[Outcome] = []
    for task in decode_tasks(frame, max_tasks=max_tasks):
        if isinstance(task, ImageInference):
            outcomes.append(validate_image_inference(task, catalogue))
        else:
            outcomes.append(task)
    return outcomes


def decode_server_frame(frame: bytes | str) -> ServerFrame:
    """A provider's frame with its items left undecoded. Raises msgspec.DecodeError."""
    return _server_frame.decode(frame)


def decode_route(item: msgspec.Raw | bytes) -> ItemRoute:
    """The routing fields of one server item. Raises msgspec.DecodeError."""
    return _route.decode(item)


def decode_image_result(item: msgspec.Raw | bytes) -> ImageResult:
    """One image result item. Raises msgspec.DecodeError."""
    return _image_result.decode(item)


def decode_auth_reply(item: msgspec.Raw | bytes) -> AuthenticationResult:
    """The provider's answer to our authentication. Raises msgspec.DecodeError."""
    return _auth_reply.decode(item)


def decode_error_item(item: msgspec.Raw | bytes) -> ErrorItem:
    """One error item. Raises msgspec.DecodeError."""
    return _error_item.decode(item)


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


def encode_data(items: Iterable[Any]) -> bytes:
    """A ``{"data": [...]}`` frame. Items may be Structs, dicts or msgspec.Raw."""
    return _encoder.encode(DataFrame(list(items)))


def encode_errors(items: Iterable[ErrorItem]) -> bytes:
    """An ``{"errors": [...]}`` frame. Never mixed with data: SDK 1.8 drops the data of such a
    frame (reference, 1.7)."""
    return _encoder.encode(ErrorFrame(list(items)))


def encode_answer(data: Iterable[Any], errors: Iterable[ErrorItem]) -> list[bytes]:
    """An answer as frames: the data frame first, then the errors frame, each only if it has
    items. Never one frame with both: SDK 1.8 drops the data of such a frame."""
    data, errors = list(data), list(errors)
    frames = []
    if data:
        frames.append(encode_data(data))
    if errors:
        frames.append(encode_errors(errors))
    return frames


def encode_tasks(tasks: Iterable[Any]) -> bytes:
    """A client -> server frame: always an array, as every SDK sends."""
    return _encoder.encode(list(tasks))
