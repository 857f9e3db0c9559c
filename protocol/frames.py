"""Every frame the Runware WebSocket and REST APIs carry, as msgspec Structs.

Client tasks form a tagged union on ``taskType``, so one decoder dispatches and checks types and
ranges in a single pass: validation *is* decoding. What a type cannot say (cross-field rules, the
model catalogue) lives in :mod:`protocol.validate`.

Two shapes of ``imageInference`` exist on purpose: :class:`ImageInference` is what a client may
send (optional fields unset), :class:`ImageTask` is what the gateway checked and forwards (every
default filled in, one place for reference images).

Every Struct here is ``gc=False``: frames hold strings, numbers and other frames, never a cycle,
so the cycle collector has no reason to track them. Tracked, the tasks and results a busy
gateway holds made its collections cost 7% of its CPU.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Raw, Struct, UnsetType

__all__ = [
    "CONTENT_TYPES",
    "EXTENSIONS",
    "GENERIC_PARAMETERS",
    "NO_SAFETY",
    "UUID_V4_PATTERN",
    "Authentication",
    "AuthenticationResult",
    "ClientTask",
    "DataFrame",
    "ErrorFrame",
    "ErrorItem",
    "GetResponse",
    "ImageInference",
    "ImageResult",
    "ImageTask",
    "Inputs",
    "ItemRoute",
    "Ping",
    "Pong",
    "ProcessingItem",
    "ReferenceImage",
    "Safety",
    "ServerFrame",
    "TaskAck",
    "TaskHeader",
]

# Canonical 8-4-4-4-12 hex form, version 4, RFC 4122 variant. Either case is accepted and kept as
# sent: the taskUUID is the client's key and is echoed back byte for byte. Two spellings of one
# UUID are one task (case-insensitive, RFC 9562): the gateway's stores key it in lower case.
# msgspec searches the pattern: \Z, since $ also matches before a final newline.
UUID_V4_PATTERN = (
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-4[0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}\Z"
)
TaskUUID = Annotated[str, Meta(pattern=UUID_V4_PATTERN)]

#: Each outputFormat's media type (for Content-Type, data URIs) and file extension.
CONTENT_TYPES = {"JPG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
EXTENSIONS = {"JPG": "jpg", "PNG": "png", "WEBP": "webp"}
Prompt = Annotated[str, Meta(min_length=2, max_length=3000)]
Quality = Annotated[int, Meta(ge=20, le=99)]
Ttl = Annotated[int, Meta(ge=60)]
NumberResults = Annotated[int, Meta(ge=1, le=20)]
Dimension = Annotated[int, Meta(ge=1)]
Strength = Annotated[float, Meta(ge=0.0, le=1.0)]
OutputType = Literal["URL", "dataURI", "base64Data"]
DeliveryMethod = Literal["sync", "async"]


# --------------------------------------------------------------------------- client -> server


class Authentication(
    Struct, tag_field="taskType", tag="authentication", omit_defaults=True, gc=False
):
    apiKey: str
    connectionSessionUUID: str | None = None


class Ping(Struct, tag_field="taskType", tag="ping", omit_defaults=True, gc=False):
    """The taskUUID is echoed in the pong, so it is a UUID like every other: unbounded, it was
    a way to make the gateway queue megabytes for a socket that had not even authenticated."""

    ping: bool = True
    taskUUID: TaskUUID | None = None


class GetResponse(Struct, tag_field="taskType", tag="getResponse", gc=False):
    taskUUID: TaskUUID


class Safety(Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    checkContent: bool | UnsetType = UNSET
    mode: str | UnsetType = UNSET


NO_SAFETY = Safety(checkContent=False, mode="none")


class ReferenceImage(Struct, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    """One reference image: a UUID, an http(s) URL, a data URI or raw base64."""

    image: str
    type: str | UnsetType = UNSET
    role: str | UnsetType = UNSET
    tag: str | UnsetType = UNSET
    strength: Strength | UnsetType = UNSET


class Inputs(Struct, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    referenceImages: list[ReferenceImage | str] | UnsetType = UNSET


# Parameters of Runware's generic imageInference API that no catalogued model takes. A task that
# sends one gets `unsupportedParameter` (a known parameter, wrong model) rather than
# `unknownParameter`. A model that takes one gets a typed, constrained field in ImageInference.
GENERIC_PARAMETERS = frozenset(
    {
        "negativePrompt", "seed", "steps", "CFGScale", "scheduler", "clipSkip", "strength",
        "seedImage", "maskImage", "maskMargin", "lora", "controlNet", "vae", "refiner",
        "outpaint", "promptWeighting", "checkNSFW", "acceleratorOptions", "advancedFeatures",
        "providerSettings", "routing", "embeddings", "ipAdapters", "outputs",
    }
)  # fmt: skip


class ImageInference(
    Struct,
    gc=False,
    tag_field="taskType",
    tag="imageInference",
    forbid_unknown_fields=True,
    kw_only=True,
):
    """An ``imageInference`` task as a client sends it.

    The platform-level options (output, delivery, safety, cost) decode with their documented
    defaults, so msgspec fills them in C; what has no default stays unset until validate.py
    checks it against the model.
    """

    taskUUID: TaskUUID
    model: str
    positivePrompt: Prompt
    width: Dimension | UnsetType = UNSET
    height: Dimension | UnsetType = UNSET
    outputType: OutputType = "URL"
    outputFormat: str = "JPG"
    outputQuality: Quality = 95
    ttl: Ttl | UnsetType = UNSET
    numberResults: NumberResults = 1
    deliveryMethod: DeliveryMethod = "sync"
    includeCost: bool = False
    safety: Safety = NO_SAFETY
    webhookURL: str | UnsetType = UNSET
    uploadEndpoint: str | UnsetType = UNSET
    inputs: Inputs | UnsetType = UNSET
    referenceImages: list[ReferenceImage | str] | UnsetType = UNSET


ClientTask = Authentication | Ping | GetResponse | ImageInference


class TaskHeader(Struct, gc=False):
    """What an error item needs from a task that did not decode: taken leniently."""

    taskType: Any = None
    taskUUID: Any = None


# --------------------------------------------------------------------------- checked task


class ImageTask(Struct, tag_field="taskType", tag="imageInference", gc=False):
    """An ``imageInference`` task as the gateway checked it: what it forwards, and no more.

    Every default is explicit, ``outputFormat`` is upper-case, ``safety`` is resolved, reference
    images live only at ``inputs.referenceImages``, and ``ttl`` exists only with URL output.
    """

    taskUUID: str
    model: str
    positivePrompt: str
    width: int
    height: int
    outputType: OutputType
    outputFormat: str
    outputQuality: int
    numberResults: int
    deliveryMethod: DeliveryMethod
    includeCost: bool
    safety: Safety
    ttl: int | UnsetType = UNSET
    webhookURL: str | UnsetType = UNSET
    uploadEndpoint: str | UnsetType = UNSET
    inputs: Inputs | UnsetType = UNSET

    @property
    def reference_images(self) -> list[ReferenceImage]:
        if isinstance(self.inputs, UnsetType) or isinstance(self.inputs.referenceImages, UnsetType):
            return []
        return [ref for ref in self.inputs.referenceImages if isinstance(ref, ReferenceImage)]

    @property
    def safety_checked(self) -> bool:
        return self.safety.mode not in (UNSET, "none")


# --------------------------------------------------------------------------- server -> client


class AuthenticationResult(Struct, tag_field="taskType", tag="authentication", gc=False):
    connectionSessionUUID: str


class Pong(Struct, tag_field="taskType", tag="ping", gc=False):
    pong: bool = True
    taskUUID: str | UnsetType = UNSET


class TaskAck(Struct, gc=False):
    """The immediate answer to an async task: only its identity."""

    taskType: str
    taskUUID: str


class ImageResult(Struct, omit_defaults=True, kw_only=True, gc=False):
    """One generated image. Carries no ``code``/``error`` key: SDK 0.5 reads those as errors.

    Optional fields default to None and are left out of the encoding; a field that must always
    be on the wire has no default, since ``omit_defaults`` would drop it.
    """

    taskType: str
    taskUUID: str
    imageUUID: str
    status: Literal["success"] | None = None
    imageURL: str | None = None
    imageBase64Data: str | None = None
    imageDataURI: str | None = None
    seed: int | None = None
    NSFWContent: bool | None = None
    cost: float | None = None


class ProcessingItem(Struct, kw_only=True, gc=False):
    """A generation still running, as ``getResponse`` reports it."""

    taskType: str
    taskUUID: str
    status: Literal["processing"] = "processing"
    progress: int | UnsetType = UNSET


class ErrorItem(Struct, omit_defaults=True, kw_only=True, gc=False):
    """A Runware-style error: names the parameter and the task it belongs to."""

    code: str
    message: str
    parameter: str | list[str] | None = None
    type: str | None = None
    documentation: str | None = None
    taskType: str | None = None
    taskUUID: str | None = None
    allowedValues: list[Any] | None = None
    status: Literal["error"] | None = None


class DataFrame(Struct, gc=False):
    data: list[Any]


class ErrorFrame(Struct, gc=False):
    errors: list[ErrorItem]


class ServerFrame(Struct, gc=False):
    """A server frame as a relay reads it: items stay undecoded until routed."""

    data: list[Raw] = msgspec.field(default_factory=list)
    errors: list[Raw] = msgspec.field(default_factory=list)


class ItemRoute(Struct, gc=False):
    """The part of a server item that routes it to its task."""

    taskType: str | None = None
    taskUUID: str | None = None
