"""The error catalogue: every code tenebra emits, its HTTP status and its default message.

Codes follow Runware's naming (``invalid*``, ``missing*``, ``unsupported*``, ``conflict*``), which
the official SDKs classify by prefix, so an SDK sorts tenebra's errors exactly as Runware's.
Only ``invalidApiKey``, ``missingApiKey``, ``conflictTaskUUID``, ``invalidPositivePrompt``,
``invalidPositivePromptLength``, ``missingPositivePrompt`` and ``timeoutProvider`` are attested on
Runware's wire; the rest are tenebra's choices in the same style (reference, 8.6).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from protocol.frames import ErrorItem

__all__ = ["CODES", "ErrorSpec", "error_item", "http_status"]


class ErrorSpec(NamedTuple):
    http_status: int
    message: str


_PLATFORM = "https://runware.ai/docs/platform"

# fmt: off
CODES: dict[str, ErrorSpec] = {
    # the frame and the task envelope
    "invalidJSON": ErrorSpec(400, "The message is not valid JSON."),
    "invalidFrame": ErrorSpec(400, "A message must be a JSON array of task objects."),
    "invalidTask": ErrorSpec(400, "A task must be a JSON object."),
    "missingTaskType": ErrorSpec(400, "Missing taskType parameter."),
    "unsupportedTaskType": ErrorSpec(400, "This taskType is not supported by this gateway."),
    "tooManyTasks": ErrorSpec(400, "Too many tasks in one message."),
    "unknownParameter": ErrorSpec(400, "Unknown parameter."),
    "unsupportedParameter": ErrorSpec(400, "This parameter is not supported by the model."),
    "incompatibleParameters": ErrorSpec(400, "These parameters cannot be used together."),
    # imageInference parameters
    "missingTaskUUID": ErrorSpec(400, "Missing taskUUID parameter."),
    "invalidTaskUUID": ErrorSpec(
        400, "Invalid value for taskUUID parameter. It must be a UUID v4."),
    "conflictTaskUUID": ErrorSpec(
        400, "Invalid value for taskUUID parameter. A task with this taskUUID already exists."),
    "missingModel": ErrorSpec(400, "Missing model parameter."),
    "invalidModel": ErrorSpec(400, "Invalid value for model parameter. Unknown model."),
    "missingPositivePrompt": ErrorSpec(400, "Missing positivePrompt parameter."),
    "invalidPositivePrompt": ErrorSpec(
        400, "Invalid value for positivePrompt parameter. Positive prompt must be a string value."),
    "invalidPositivePromptLength": ErrorSpec(
        400, "Invalid value for positivePrompt parameter. It must be 2 to 3000 characters long."),
    "invalidWidth": ErrorSpec(400, "Invalid value for width parameter."),
    "invalidHeight": ErrorSpec(400, "Invalid value for height parameter."),
    "missingWidth": ErrorSpec(400, "Missing width parameter. width and height go together."),
    "missingHeight": ErrorSpec(400, "Missing height parameter. width and height go together."),
    "unsupportedDimensions": ErrorSpec(
        400, "Invalid value for width and height parameters. "
             "The dimension combination is not supported by this model."),
    "invalidOutputType": ErrorSpec(400, "Invalid value for outputType parameter."),
    "invalidOutputFormat": ErrorSpec(400, "Invalid value for outputFormat parameter."),
    "invalidOutputQuality": ErrorSpec(
        400, "Invalid value for outputQuality parameter. It must be an integer from 20 to 99."),
    "invalidTtl": ErrorSpec(
        400, "Invalid value for ttl parameter. It must be an integer of at least 60 seconds."),
    "invalidNumberResults": ErrorSpec(
        400, "Invalid value for numberResults parameter. It must be an integer from 1 to 20."),
    "invalidDeliveryMethod": ErrorSpec(400, "Invalid value for deliveryMethod parameter."),
    "invalidIncludeCost": ErrorSpec(
        400, "Invalid value for includeCost parameter. It must be a boolean."),
    "invalidSafety": ErrorSpec(400, "Invalid value for safety parameter."),
    "invalidSafetyMode": ErrorSpec(400, "Invalid value for safety.mode parameter."),
    "invalidWebhookURL": ErrorSpec(
        400, "Invalid value for webhookURL parameter. It must be an absolute http(s) URL."),
    "invalidUploadEndpoint": ErrorSpec(
        400, "Invalid value for uploadEndpoint parameter. It must be an absolute http(s) URL."),
    "invalidReferenceImages": ErrorSpec(400, "Invalid value for referenceImages parameter."),
    "invalidInputs": ErrorSpec(400, "Invalid value for inputs parameter."),
    "invalidConnectionSessionUUID": ErrorSpec(
        400, "Invalid value for connectionSessionUUID parameter."),
    # authentication
    "missingApiKey": ErrorSpec(401, "Authenticate first: send an authentication task."),
    "invalidApiKey": ErrorSpec(401, "Invalid API key."),
    # task state
    "taskNotFound": ErrorSpec(404, "No task with this taskUUID exists for this API key."),
    # capacity and upstream
    "rateLimitExceeded": ErrorSpec(429, "Too many tasks in flight. Retry with backoff."),
    "insufficientCredits": ErrorSpec(402, "The daily budget of this API key is spent."),
    "serviceUnavailable": ErrorSpec(503, "The provider is unavailable. Retry with backoff."),
    "providerError": ErrorSpec(502, "The provider failed to process the task."),
    "timeoutProvider": ErrorSpec(
        504, "The provider did not respond within the timeout window."),
    "timeout": ErrorSpec(
        504, "The task did not finish within the request deadline. It keeps running: "
             "poll it with getResponse."),
    "internalServerError": ErrorSpec(500, "Internal error."),
}
# fmt: on

_TASK_DOCUMENTATION = {
    "authentication": f"{_PLATFORM}/authentication",
    "ping": f"{_PLATFORM}/authentication",
    "getResponse": f"{_PLATFORM}/task-polling",
}


def http_status(code: str) -> int:
    """The REST status of an error code; 500 for one the catalogue does not know (a bug)."""
    spec = CODES.get(code)
    return spec.http_status if spec else 500


def error_item(
    code: str,
    *,
    message: str | None = None,
    parameter: str | list[str] | None = None,
    type: str | None = None,
    documentation: str | None = None,
    task_type: str | None = None,
    task_uuid: str | None = None,
    allowed_values: list[Any] | None = None,
) -> ErrorItem:
    """An error item for ``code``; the catalogue's message unless a more precise one is given."""
    if documentation is None and task_type is not None:
        documentation = _TASK_DOCUMENTATION.get(task_type)
    return ErrorItem(
        code=code,
        message=message if message is not None else CODES[code].message,
        parameter=parameter,
        type=type,
        documentation=documentation,
        taskType=task_type,
        taskUUID=task_uuid,
        allowedValues=allowed_values,
    )
