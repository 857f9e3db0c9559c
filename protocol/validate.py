"""The rules a task must pass before it may cost money.

Most rules are types in :mod:`protocol.frames` and are checked while decoding; this module turns a
decoding failure into a Runware-style error item, and applies what a type cannot say: the model
catalogue (sizes, formats, safety modes, supported parameters) and the cross-field rules (width
with height, ttl only with URL output, one upload URL per result, one place for reference images).

Every function here returns an :class:`~protocol.frames.ErrorItem` for bad input; none raises.
"""

from __future__ import annotations

import re
from operator import attrgetter
from typing import NamedTuple, get_args
from urllib.parse import urlsplit

import msgspec
from msgspec import UNSET, UnsetType
from msgspec.structs import astuple

from protocol.errors import error_item
from protocol.frames import (
    GENERIC_PARAMETERS,
    NO_SAFETY,
    DeliveryMethod,
    ErrorItem,
    ImageInference,
    ImageTask,
    Inputs,
    OutputType,
    ReferenceImage,
    Safety,
    TaskHeader,
)
from protocol.models import Catalogue, ModelSpec

__all__ = [
    "TASK_TYPES",
    "UPLOAD_PLACEHOLDERS",
    "decode_error",
    "is_http_url",
    "validate_image_inference",
]

TASK_TYPES = ["authentication", "ping", "imageInference", "getResponse"]
UPLOAD_PLACEHOLDERS = ("{imageUUID}", "{index}")
_DOC_FALLBACK_SLUG = "exactly-photo-extreme-contrast"


class _Param(NamedTuple):
    invalid: str
    missing: str | None
    type: str
    allowed: tuple[str, ...] = ()


_PARAMS: dict[str, _Param] = {
    "taskUUID": _Param("invalidTaskUUID", "missingTaskUUID", "string"),
    "model": _Param("invalidModel", "missingModel", "string"),
    "positivePrompt": _Param("invalidPositivePrompt", "missingPositivePrompt", "string"),
    "width": _Param("invalidWidth", "missingWidth", "integer"),
    "height": _Param("invalidHeight", "missingHeight", "integer"),
    "outputType": _Param("invalidOutputType", None, "string", get_args(OutputType)),
    "outputFormat": _Param("invalidOutputFormat", None, "string"),
    "outputQuality": _Param("invalidOutputQuality", None, "integer"),
    "ttl": _Param("invalidTtl", None, "integer"),
    "numberResults": _Param("invalidNumberResults", None, "integer"),
    "deliveryMethod": _Param("invalidDeliveryMethod", None, "string", get_args(DeliveryMethod)),
    "includeCost": _Param("invalidIncludeCost", None, "boolean"),
    "safety": _Param("invalidSafety", None, "object"),
    "safety.checkContent": _Param("invalidSafety", None, "boolean"),
    "safety.mode": _Param("invalidSafetyMode", None, "string"),
    "webhookURL": _Param("invalidWebhookURL", None, "string"),
    "uploadEndpoint": _Param("invalidUploadEndpoint", None, "string"),
    "inputs": _Param("invalidInputs", None, "object"),
    "inputs.referenceImages": _Param("invalidReferenceImages", None, "array"),
    "referenceImages": _Param("invalidReferenceImages", None, "array"),
    "apiKey": _Param("invalidApiKey", "missingApiKey", "string"),
    "connectionSessionUUID": _Param("invalidConnectionSessionUUID", None, "string"),
    "taskType": _Param("unsupportedTaskType", "missingTaskType", "string", tuple(TASK_TYPES)),
}

# Arrays of objects are reported as the whole parameter, as Runware documents them.
_COLLAPSED = ("inputs.referenceImages", "referenceImages")
_MISSING = re.compile(r"^Object missing required field `([^`]+)`(?: - at `([^`]+)`)?$")
_UNKNOWN = re.compile(r"^Object contains unknown field `([^`]+)`(?: - at `([^`]+)`)?$")
_AT = re.compile(r"^(.*) - at `([^`]+)`$")
_INDEX = re.compile(r"\[\d+\]")


def _parameter(path: str | None, field: str | None = None) -> str:
    """``$.inputs.referenceImages[0].image`` -> ``inputs.referenceImages``: the documented name."""
    name = _INDEX.sub("", path or "$").removeprefix("$").removeprefix(".")
    if field:
        name = f"{name}.{field}" if name else field
    for collapsed in _COLLAPSED:
        if name.startswith(collapsed):
            return collapsed
    return name


# An error item echoes what it can of the task's identity, but never a long string: echoed at
# length, a bad taskUUID turned one inbound frame into as large an outbound one.
_ECHO_MAX = 64


def _header_str(value: object) -> str | None:
    return value if isinstance(value, str) and len(value) <= _ECHO_MAX else None


def decode_error(exc: msgspec.ValidationError, header: TaskHeader) -> ErrorItem:
    """The error item for a task that failed to decode, naming the parameter at fault."""
    task_type = _header_str(header.taskType)
    task_uuid = _header_str(header.taskUUID)
    text = str(exc)

    def item(code: str, parameter: str, message: str | None = None) -> ErrorItem:
        param = _PARAMS.get(parameter)
        return error_item(
            code,
            message=message,
            parameter=parameter,
            type=param.type if param else None,
            documentation=_documentation(task_type, parameter),
            task_type=task_type,
            task_uuid=task_uuid,
            allowed_values=list(param.allowed) if param and param.allowed else None,
        )

    if match := _MISSING.match(text):
        parameter = _parameter(match[2], match[1])
        param = _PARAMS.get(parameter)
        code = param.missing or param.invalid if param else "invalidTask"
        return item(code, parameter, f"Missing {parameter} parameter.")
    if match := _UNKNOWN.match(text):
        parameter = _parameter(match[2], match[1])
        if not match[2] and match[1] in GENERIC_PARAMETERS:
            return item(
                "unsupportedParameter",
                parameter,
                f"Invalid parameter {parameter}. It is not supported by this model.",
            )
        if parameter in _COLLAPSED:
            return item(
                _PARAMS[parameter].invalid,
                parameter,
                f"Invalid value for {parameter} parameter. Unknown field {match[1]!r}.",
            )
        return item("unknownParameter", parameter, f"Unknown parameter: {parameter}.")
    match = _AT.match(text)
    detail, parameter = (match[1], _parameter(match[2])) if match else (text, "")
    param = _PARAMS.get(parameter)
    if param is None:
        return item("invalidTask", parameter or "task", f"Invalid task: {text}.")
    code = param.invalid
    if parameter == "positivePrompt" and "length" in detail:
        code = "invalidPositivePromptLength"
    if parameter == "taskType" and detail.startswith("Invalid value"):
        return item(code, parameter, f"Unsupported taskType {header.taskType!r}.")
    return item(code, parameter)


def _documentation(task_type: str | None, parameter: str) -> str | None:
    if parameter not in _PARAMS:
        return None  # an unknown parameter has no page to link to
    if task_type in (None, "imageInference"):
        return f"https://runware.ai/docs/models/{_DOC_FALLBACK_SLUG}#request-" + (
            parameter.replace(".", "-").lower()
        )
    return None  # error_item() links the platform page of the task type


# --------------------------------------------------------------------------- imageInference

#: Model-level parameters: valid only where the model's catalogue entry lists them. Everything
#: else optional is a platform-level option that Runware takes for every model.
MODEL_PARAMETERS = ("width", "height", "inputs", "referenceImages")

_UUID_ANY = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
_DATA_URI = re.compile(r"data:image/(?:png|jpeg|jpg|webp);base64,([A-Za-z0-9+/]+={0,2})", re.I)
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_URL_MAX = 2048


def is_http_url(value: str) -> bool:
    """An absolute http(s) URL with a host, of sane length and without blanks."""
    if len(value) > _URL_MAX or any(c.isspace() or ord(c) < 0x20 for c in value):
        return False
    try:
        parts = urlsplit(value)
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname) and port_ok


def _is_image_reference(value: str) -> bool:
    if _UUID_ANY.fullmatch(value) or is_http_url(value):
        return True
    if match := _DATA_URI.fullmatch(value):
        return len(match[1]) % 4 == 0
    return len(value) >= 16 and len(value) % 4 == 0 and _BASE64.fullmatch(value) is not None


class _ModelRules:
    """What checking a task against one model needs, computed once per model.

    Validation runs for every task on the hot path; the scan for unsupported parameters is a
    single C-level ``attrgetter`` call rather than a Python loop over every optional field, and
    what the checks read of the model is here, in this (compiled) class's own fields: a field of
    the model's Struct costs a generic attribute lookup each time.
    """

    def __init__(self, model: ModelSpec) -> None:
        self.model = model
        self.unsupported = tuple(n for n in MODEL_PARAMETERS if n not in model.supported_parameters)
        # attrgetter of one name returns the value, not a 1-tuple; a second name keeps it a tuple
        self.read_unsupported = (
            attrgetter("taskUUID", *self.unsupported) if self.unsupported else None
        )
        self.sizes = {(size.width, size.height) for size in model.sizes}
        default_width, _, default_height = model.default_size.partition("x")
        self.default_size = (int(default_width), int(default_height))
        self.output_types = frozenset(model.output_types)
        self.output_formats = frozenset(model.output_formats)
        self.safety_modes = frozenset(model.safety_modes)
        self.default_safety_allowed = NO_SAFETY.mode in self.safety_modes


_RULES: dict[str, _ModelRules] = {}


def _rules(model: ModelSpec) -> _ModelRules:
    rules = _RULES.get(model.air)
    if rules is None or rules.model is not model:  # another catalogue's model of that name
        rules = _RULES[model.air] = _ModelRules(model)
    return rules


class _Rejected(Exception):
    """Carries a rule's error item out of the checks; never leaves this module."""

    def __init__(
        self,
        task: ImageInference,
        model: ModelSpec,
        code: str,
        parameter: str | list[str],
        *,
        message: str | None = None,
        allowed: list[str] | None = None,
    ) -> None:
        self.item = _reject(task, model, code, parameter, message=message, allowed=allowed)


def validate_image_inference(task: ImageInference, catalogue: Catalogue) -> ImageTask | ErrorItem:
    """The task checked against its model and normalised, or the first rule it breaks."""
    model = catalogue.get(task.model)
    if model is None:
        return _reject(
            task,
            None,
            "invalidModel",
            "model",
            allowed=catalogue.airs,
            message=f"Invalid value for model parameter. Unknown model {task.model!r}.",
        )
    try:
        return _normalise(task, model, _rules(model))
    except _Rejected as rejected:
        return rejected.item


def _reject(
    task: ImageInference,
    model: ModelSpec | None,
    code: str,
    parameter: str | list[str],
    *,
    message: str | None = None,
    allowed: list[str] | None = None,
) -> ErrorItem:
    first = parameter if isinstance(parameter, str) else parameter[0]
    param = _PARAMS.get(first)
    slug = model.slug if model else _DOC_FALLBACK_SLUG
    return error_item(
        code,
        message=message,
        parameter=parameter,
        type=param.type if param else None,
        documentation=f"https://runware.ai/docs/models/{slug}#request-"
        + first.replace(".", "-").lower(),
        task_type="imageInference",
        task_uuid=task.taskUUID,
        allowed_values=allowed,
    )


def _normalise(task: ImageInference, model: ModelSpec, rules: _ModelRules) -> ImageTask:
    if rules.read_unsupported is not None:
        given = rules.read_unsupported(task)[1:]
        if given.count(UNSET) != len(given):
            name = next(n for n, v in zip(rules.unsupported, given, strict=True) if v is not UNSET)
            raise _Rejected(
                task, model, "unsupportedParameter", name,
                message=f"Invalid parameter {name}. It is not supported by model {model.air}.",
            )  # fmt: skip

    # Every field in one C call, in ImageInference's declared order (a test gives each field a
    # value of its own): compiled, each attribute read of a Struct is a generic lookup (20-30 ns
    # at the ceiling, 17 of them), and this runs for every task.
    (
        task_uuid, model_air, prompt, width, height, output_type, output_format, quality, ttl,
        number_results, delivery, include_cost, safety, webhook, upload, inputs, references,
    ) = astuple(task)  # fmt: skip

    width, height = _dimensions(task, model, rules, width, height)

    if output_type not in rules.output_types:
        raise _Rejected(task, model, "invalidOutputType", "outputType", allowed=model.output_types)

    if output_format not in rules.output_formats:
        output_format = output_format.upper()
        if output_format not in rules.output_formats:
            raise _Rejected(
                task, model, "invalidOutputFormat", "outputFormat", allowed=model.output_formats
            )

    if safety is NO_SAFETY:
        allowed = rules.default_safety_allowed
    else:
        safety = _safety(safety)
        allowed = safety.mode in rules.safety_modes
    if not allowed:
        raise _Rejected(task, model, "invalidSafetyMode", "safety.mode", allowed=model.safety_modes)

    if webhook is not UNSET and not is_http_url(webhook):
        raise _Rejected(task, model, "invalidWebhookURL", "webhookURL")
    if upload is not UNSET:
        if not is_http_url(upload):
            raise _Rejected(task, model, "invalidUploadEndpoint", "uploadEndpoint")
        if number_results > 1 and not any(p in upload for p in UPLOAD_PLACEHOLDERS):
            raise _Rejected(
                task, model, "incompatibleParameters", ["uploadEndpoint", "numberResults"],
                message="uploadEndpoint holds one object, so numberResults must be 1, unless the "
                "URL carries an {imageUUID} or {index} placeholder filled in per result.",
            )  # fmt: skip

    if inputs is not UNSET or references is not UNSET:
        found = _references(task, model, inputs, references)
        inputs = Inputs(referenceImages=list(found)) if found else UNSET
    # Positional: this runs for every task, and keyword construction costs a third more.
    return ImageTask(
        task_uuid,
        model_air,
        prompt,
        width,
        height,
        output_type,
        output_format,
        quality,
        number_results,
        delivery,
        include_cost,
        safety,
        # Runware: ttl "has no effect on other output types" -- accepted there, so dropped here
        # rather than rejected, and never forwarded where it means nothing.
        ttl if output_type == "URL" else UNSET,
        webhook,
        upload,
        inputs,
    )


def _dimensions(
    task: ImageInference,
    model: ModelSpec,
    rules: _ModelRules,
    width: int | UnsetType,
    height: int | UnsetType,
) -> tuple[int, int]:
    if width is UNSET and height is UNSET:
        return rules.default_size
    if height is UNSET:
        raise _Rejected(task, model, "missingHeight", "height")
    if width is UNSET:
        raise _Rejected(task, model, "missingWidth", "width")
    if (width, height) not in rules.sizes:
        raise _Rejected(
            task, model, "unsupportedDimensions", ["width", "height"], allowed=model.size_labels,
            message=f"Invalid value for width and height parameters. {width}x{height} "
            f"is not a size of model {model.air}.",
        )  # fmt: skip
    return width, height


def _safety(safety: Safety) -> Safety:
    """Resolve safety: ``mode`` wins over ``checkContent``, which alone means ``fast``."""
    if safety.mode is not UNSET and safety.checkContent is (safety.mode != "none"):
        return safety
    mode = safety.mode
    if mode is UNSET:
        mode = "fast" if safety.checkContent is True else "none"
    return Safety(checkContent=mode != "none", mode=mode)


def _references(
    task: ImageInference,
    model: ModelSpec,
    inputs: Inputs | UnsetType,
    top: list[ReferenceImage | str] | UnsetType,
) -> list[ReferenceImage]:
    nested = UNSET if inputs is UNSET else inputs.referenceImages
    if nested is not UNSET and top is not UNSET:
        raise _Rejected(
            task, model, "incompatibleParameters", ["referenceImages", "inputs.referenceImages"],
            message="Reference images go in one place: inputs.referenceImages or referenceImages.",
        )  # fmt: skip
    given = nested if nested is not UNSET else top
    if given is UNSET:
        return []
    where = "inputs.referenceImages" if nested is not UNSET else "referenceImages"
    if len(given) > model.max_reference_images:
        raise _Rejected(
            task, model, "invalidReferenceImages", where,
            message=f"Invalid value for {where} parameter. Model {model.air} takes at most "
            f"{model.max_reference_images} reference image(s); {len(given)} given.",
        )  # fmt: skip
    references = [ReferenceImage(image=ref) if isinstance(ref, str) else ref for ref in given]
    for ref in references:
        if not _is_image_reference(ref.image):
            raise _Rejected(
                task, model, "invalidReferenceImages", where,
                message=f"Invalid value for {where} parameter. An image must be an image UUID, "
                "an http(s) URL, a data URI or base64 data.",
            )  # fmt: skip
    return references
