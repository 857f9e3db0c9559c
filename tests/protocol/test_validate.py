"""Every rule of validate.py at and beyond its boundaries, checking the whole error item."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

from protocol.codec import decode_client_frame, encode, encode_tasks
from protocol.frames import ErrorItem, ImageInference, ImageTask
from protocol.models import Catalogue, default_catalogue, load_catalogue
from tests.protocol.conftest import DROP, MODEL, image_task

DOC = "https://runware.ai/docs/models/exactly-photo-extreme-contrast#request-"


def outcome(task: dict[str, Any], catalogue: Catalogue | None = None) -> ImageTask | ErrorItem:
    [result] = decode_client_frame(encode_tasks([task]), catalogue or default_catalogue())
    assert isinstance(result, ImageTask | ErrorItem)
    return result


def accepted(**overrides: Any) -> ImageTask:
    result = outcome(image_task(**overrides))
    assert isinstance(result, ImageTask), result
    return result


def rejected(code: str, parameter: str | list[str], **overrides: Any) -> ErrorItem:
    task = image_task(**overrides)
    result = outcome(task)
    assert isinstance(result, ErrorItem), result
    assert result.code == code
    assert result.parameter == parameter
    assert result.taskType == "imageInference"
    sent_uuid = task.get("taskUUID")
    assert result.taskUUID == (sent_uuid if isinstance(sent_uuid, str) else None)
    assert result.message
    return result


# --------------------------------------------------------------------------- numeric ranges


@pytest.mark.parametrize(
    ("parameter", "code", "good", "bad"),
    [
        ("outputQuality", "invalidOutputQuality", [20, 21, 95, 98, 99], [19, 100, -1, 0, 1000]),
        ("numberResults", "invalidNumberResults", [1, 2, 19, 20], [0, 21, -1, 100]),
        ("ttl", "invalidTtl", [60, 61, 3600, 86400 * 30], [59, 0, -60, 1]),
    ],
)
def test_integer_ranges(parameter: str, code: str, good: list[int], bad: list[int]) -> None:
    for value in good:
        assert getattr(accepted(**{parameter: value}), parameter) == value
    for value in bad:
        error = rejected(code, parameter, **{parameter: value})
        assert error.type == "integer"
        assert error.documentation == DOC + parameter.lower()


@pytest.mark.parametrize(
    ("parameter", "code"),
    [
        ("outputQuality", "invalidOutputQuality"),
        ("numberResults", "invalidNumberResults"),
        ("ttl", "invalidTtl"),
        ("width", "invalidWidth"),
        ("height", "invalidHeight"),
    ],
)
@pytest.mark.parametrize("value", ["95", 95.5, None, True, [95], {"v": 95}])
def test_integers_reject_other_types(parameter: str, code: str, value: Any) -> None:
    rejected(code, parameter, **{parameter: value})


def test_defaults_are_filled_in_explicitly() -> None:
    task = accepted(width=DROP, height=DROP)
    assert (task.width, task.height) == (1024, 1024)
    assert task.outputType == "URL"
    assert task.outputFormat == "JPG"
    assert task.outputQuality == 95
    assert task.numberResults == 1
    assert task.deliveryMethod == "sync"
    assert task.includeCost is False
    assert (task.safety.checkContent, task.safety.mode) == (False, "none")
    wire = msgspec.json.decode(encode(task))
    for key in ("outputType", "outputFormat", "outputQuality", "numberResults", "safety"):
        assert key in wire
    assert "ttl" not in wire and "webhookURL" not in wire and "inputs" not in wire


# --------------------------------------------------------------------------- the prompt


@pytest.mark.parametrize("length", [2, 3, 2999, 3000])
def test_prompt_length_accepted(length: int) -> None:
    assert len(accepted(positivePrompt="x" * length).positivePrompt) == length


@pytest.mark.parametrize("length", [0, 1, 3001, 10_000])
def test_prompt_length_rejected(length: int) -> None:
    rejected("invalidPositivePromptLength", "positivePrompt", positivePrompt="x" * length)


def test_prompt_counts_characters_not_bytes() -> None:
    assert accepted(positivePrompt="é" * 3000).positivePrompt == "é" * 3000
    rejected("invalidPositivePromptLength", "positivePrompt", positivePrompt="🌑" * 3001)


@pytest.mark.parametrize("value", [5, None, ["a prompt"], {"text": "a prompt"}])
def test_prompt_must_be_a_string(value: Any) -> None:
    rejected("invalidPositivePrompt", "positivePrompt", positivePrompt=value)


def test_prompt_is_required() -> None:
    rejected("missingPositivePrompt", "positivePrompt", positivePrompt=DROP)


# --------------------------------------------------------------------------- sizes

ALL_SIZES = default_catalogue().get(MODEL).size_labels  # type: ignore[union-attr]


@pytest.mark.parametrize("size", ALL_SIZES)
def test_every_catalogue_size_is_accepted(size: str) -> None:
    width, height = map(int, size.split("x"))
    task = accepted(width=width, height=height)
    assert (task.width, task.height) == (width, height)


@pytest.mark.parametrize(
    "size",
    [
        "1264x849",
        "1263x848",
        "848x848",
        "1024x1025",
        "1024x768",
        "512x512",
        "4096x4095",
        "5096x3393",
        "1280x832",
        "2048x1024",
        "6336x2688",
        "1376x768",
    ],
)
def test_near_miss_sizes_are_rejected_with_the_allowed_list(size: str) -> None:
    width, height = map(int, size.split("x"))
    error = rejected("unsupportedDimensions", ["width", "height"], width=width, height=height)
    assert error.allowedValues == ALL_SIZES
    assert error.documentation == DOC + "width"
    assert size in error.message


def test_width_and_height_go_together() -> None:
    rejected("missingHeight", "height", height=DROP)
    rejected("missingWidth", "width", width=DROP)


@pytest.mark.parametrize("value", [0, -1848])
def test_dimensions_are_positive(value: int) -> None:
    rejected("invalidWidth", "width", width=value)
    rejected("invalidHeight", "height", height=value)


# --------------------------------------------------------------------------- enumerations


@pytest.mark.parametrize("value", ["URL", "dataURI", "base64Data"])
def test_output_types(value: str) -> None:
    assert accepted(outputType=value).outputType == value


@pytest.mark.parametrize("value", ["url", "base64", "png", "", 1])
def test_bad_output_type(value: Any) -> None:
    error = rejected("invalidOutputType", "outputType", outputType=value)
    if isinstance(value, str):
        assert error.allowedValues == ["URL", "dataURI", "base64Data"]


@pytest.mark.parametrize(
    ("value", "normal"),
    [("JPG", "JPG"), ("jpg", "JPG"), ("Png", "PNG"), ("webp", "WEBP"), ("WEBP", "WEBP")],
)
def test_output_format_is_case_insensitive(value: str, normal: str) -> None:
    assert accepted(outputFormat=value).outputFormat == normal


@pytest.mark.parametrize("value", ["GIF", "jpeg", "TIFF", ""])
def test_bad_output_format(value: str) -> None:
    error = rejected("invalidOutputFormat", "outputFormat", outputFormat=value)
    assert error.allowedValues == ["JPG", "PNG", "WEBP"]


def test_output_format_must_be_a_string() -> None:
    rejected("invalidOutputFormat", "outputFormat", outputFormat=1)


@pytest.mark.parametrize("value", ["sync", "async"])
def test_delivery_methods(value: str) -> None:
    assert accepted(deliveryMethod=value).deliveryMethod == value


@pytest.mark.parametrize("value", ["stream", "SYNC", None])
def test_bad_delivery_method(value: Any) -> None:
    rejected("invalidDeliveryMethod", "deliveryMethod", deliveryMethod=value)


def test_include_cost_is_boolean() -> None:
    assert accepted(includeCost=True).includeCost is True
    rejected("invalidIncludeCost", "includeCost", includeCost="yes")
    rejected("invalidIncludeCost", "includeCost", includeCost=1)


# --------------------------------------------------------------------------- ttl


def test_ttl_kept_with_url_output() -> None:
    assert accepted(ttl=60, outputType="URL").ttl == 60


@pytest.mark.parametrize("output_type", ["dataURI", "base64Data"])
def test_ttl_dropped_where_it_has_no_effect(output_type: str) -> None:
    task = accepted(ttl=120, outputType=output_type)
    assert "ttl" not in msgspec.json.decode(encode(task))


def test_ttl_checked_even_where_it_has_no_effect() -> None:
    rejected("invalidTtl", "ttl", ttl=10, outputType="base64Data")


# --------------------------------------------------------------------------- safety


@pytest.mark.parametrize(
    ("safety", "check", "mode"),
    [
        ({}, False, "none"),
        ({"checkContent": False}, False, "none"),
        ({"checkContent": True}, True, "fast"),
        ({"mode": "fast"}, True, "fast"),
        ({"mode": "none"}, False, "none"),
        # mode takes precedence over checkContent, both ways
        ({"checkContent": True, "mode": "none"}, False, "none"),
        ({"checkContent": False, "mode": "fast"}, True, "fast"),
    ],
)
def test_safety_precedence(safety: dict[str, Any], check: bool, mode: str) -> None:
    task = accepted(safety=safety)
    assert (task.safety.checkContent, task.safety.mode) == (check, mode)
    assert task.safety_checked is check


@pytest.mark.parametrize("mode", ["full", "FAST", ""])
def test_bad_safety_mode(mode: str) -> None:
    error = rejected("invalidSafetyMode", "safety.mode", safety={"mode": mode})
    assert error.allowedValues == ["none", "fast"]


def test_bad_safety_shapes() -> None:
    rejected("invalidSafety", "safety", safety="fast")
    rejected("invalidSafety", "safety.checkContent", safety={"checkContent": "yes"})
    rejected("unknownParameter", "safety.tolerance", safety={"tolerance": 1})


# --------------------------------------------------------------------------- URLs

GOOD_URLS = [
    "https://example.com/hook",
    "http://example.com:8080/hook?token=abc&x=1",
    "https://bucket.s3.amazonaws.com/a.jpg?X-Amz-Signature=abc&X-Amz-Expires=3600",
    "HTTPS://EXAMPLE.COM/",
]
BAD_URLS = [
    "ftp://example.com/a",
    "/relative/path",
    "example.com/hook",
    "http://",
    "https:///nohost",
    "javascript:alert(1)",
    "https://exa mple.com/",
    "https://example.com/\n",
    "http://example.com:99999/",
    "https://example.com/" + "a" * 2100,
    "",
]


@pytest.mark.parametrize(
    ("parameter", "code"),
    [("webhookURL", "invalidWebhookURL"), ("uploadEndpoint", "invalidUploadEndpoint")],
)
def test_urls(parameter: str, code: str) -> None:
    for url in GOOD_URLS:
        assert getattr(accepted(**{parameter: url}), parameter) == url
    for url in BAD_URLS:
        rejected(code, parameter, **{parameter: url})
    rejected(code, parameter, **{parameter: 42})


def test_one_upload_url_holds_one_object() -> None:
    rejected(
        "incompatibleParameters",
        ["uploadEndpoint", "numberResults"],
        uploadEndpoint="https://example.com/out.jpg",
        numberResults=2,
    )
    for placeholder in ("{imageUUID}", "{index}"):
        url = f"https://example.com/out-{placeholder}.jpg"
        assert accepted(uploadEndpoint=url, numberResults=4).uploadEndpoint == url
    assert accepted(uploadEndpoint="https://example.com/a.jpg", numberResults=1).numberResults == 1


# --------------------------------------------------------------------------- reference images

PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode()
GOOD_IMAGES = [
    str(uuid.uuid4()),
    "https://assets.runware.ai/assets/inputs/86a452f1-71e7-4382-b4c8-86b572f48a48.jpg",
    f"data:image/png;base64,{PNG_B64}",
    f"data:image/jpeg;base64,{PNG_B64}",
    f"data:image/webp;base64,{PNG_B64}",
    PNG_B64,
]
BAD_IMAGES = [
    "not an image",
    "",
    "data:text/plain;base64,aGVsbG8=",
    "abc",
    "ftp://x/y.jpg",
    "data:image/png;base64,abc",
]


@pytest.mark.parametrize("image", GOOD_IMAGES)
@pytest.mark.parametrize("where", ["top", "inputs"])
@pytest.mark.parametrize("form", ["string", "object"])
def test_reference_images_end_up_in_one_place(image: str, where: str, form: str) -> None:
    entry: Any = image if form == "string" else {"image": image, "type": "reference"}
    placed = (
        {"referenceImages": [entry]} if where == "top" else {"inputs": {"referenceImages": [entry]}}
    )
    task = accepted(**placed)
    [ref] = task.reference_images
    assert ref.image == image
    wire = msgspec.json.decode(encode(task))
    assert "referenceImages" not in wire
    assert wire["inputs"]["referenceImages"][0]["image"] == image


@pytest.mark.parametrize("image", BAD_IMAGES)
def test_bad_reference_images(image: str) -> None:
    rejected("invalidReferenceImages", "referenceImages", referenceImages=[image])
    rejected(
        "invalidReferenceImages",
        "inputs.referenceImages",
        inputs={"referenceImages": [{"image": image}]},
    )


def test_at_most_one_reference_image() -> None:
    two = [GOOD_IMAGES[0], GOOD_IMAGES[1]]
    error = rejected("invalidReferenceImages", "referenceImages", referenceImages=two)
    assert "at most 1" in error.message
    rejected("invalidReferenceImages", "inputs.referenceImages", inputs={"referenceImages": two})


def test_reference_images_in_both_places() -> None:
    rejected(
        "incompatibleParameters",
        ["referenceImages", "inputs.referenceImages"],
        referenceImages=[GOOD_IMAGES[0]],
        inputs={"referenceImages": [GOOD_IMAGES[1]]},
    )


@pytest.mark.parametrize(
    "entry",
    [
        {"image": GOOD_IMAGES[0], "strength": 1.5},
        {"type": "reference"},
        {"image": 5},
        {"image": GOOD_IMAGES[0], "colour": "red"},
        5,
    ],
)
def test_bad_reference_image_objects(entry: Any) -> None:
    rejected("invalidReferenceImages", "referenceImages", referenceImages=[entry])


def test_reference_image_fields_are_kept() -> None:
    entry = {"image": GOOD_IMAGES[0], "type": "character", "strength": 0.4, "role": "r", "tag": "t"}
    [ref] = accepted(referenceImages=[entry]).reference_images
    assert msgspec.to_builtins(ref) == entry


# --------------------------------------------------------------------------- identity


@pytest.mark.parametrize(
    "value",
    ["b91cb66e-4cd3-4fbe-9863-feab29154eda", "B91CB66E-4CD3-4FBE-9863-FEAB29154EDA"],
)
def test_task_uuid_v4_either_case(value: str) -> None:
    assert accepted(taskUUID=value).taskUUID == value


@pytest.mark.parametrize(
    "value",
    [
        "b91cb66e-4cd3-1fbe-9863-feab29154eda",  # version 1
        "b91cb66e-4cd3-4fbe-c863-feab29154eda",  # wrong variant
        "b91cb66e4cd34fbe9863feab29154eda",  # not canonical
        "{b91cb66e-4cd3-4fbe-9863-feab29154eda}",
        "b91cb66e-4cd3-4fbe-9863-feab29154ed",
        "b91cb66e-4cd3-4fbe-9863-feab29154eda\n",  # "$" alone would match before it
        "",
    ],
)
def test_task_uuid_must_be_canonical_v4(value: str) -> None:
    rejected("invalidTaskUUID", "taskUUID", taskUUID=value)


def test_task_uuid_required() -> None:
    rejected("missingTaskUUID", "taskUUID", taskUUID=DROP)
    rejected("invalidTaskUUID", "taskUUID", taskUUID=123)


def test_model_required_and_known() -> None:
    rejected("missingModel", "model", model=DROP)
    error = rejected("invalidModel", "model", model="runware:101@1")
    assert error.allowedValues == [MODEL]


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("name", ["seed", "negativePrompt", "steps", "CFGScale", "lora"])
def test_generic_parameters_the_model_lacks_are_unsupported(name: str) -> None:
    error = rejected("unsupportedParameter", name, **{name: 7})
    assert name in error.message


@pytest.mark.parametrize("name", ["foo", "imageWidth", "Seed"])
def test_unknown_parameters(name: str) -> None:
    error = rejected("unknownParameter", name, **{name: 1})
    assert error.documentation is None


def test_supported_parameters_come_from_the_catalogue(tmp_path: Path) -> None:
    source = Path(__file__).parents[2] / "protocol/catalogue/exactly-photo-extreme-contrast.toml"
    text = source.read_text().replace('"inputs", "referenceImages"', '"inputs"')
    (tmp_path / "no-refs.toml").write_text(text.replace("exactly:photo@", "test:no-refs@"))
    catalogue = load_catalogue(tmp_path)
    model = "test:no-refs@extreme-contrast"
    refs = [GOOD_IMAGES[0]]
    error = outcome(image_task(model=model, referenceImages=refs), catalogue)
    assert isinstance(error, ErrorItem)
    assert (error.code, error.parameter) == ("unsupportedParameter", "referenceImages")
    assert model in error.message
    assert isinstance(outcome(image_task(model=model), catalogue), ImageTask)
    nested = outcome(image_task(model=model, inputs={"referenceImages": refs}), catalogue)
    assert isinstance(nested, ImageTask)


def test_every_field_lands_where_it_belongs() -> None:
    # _normalise takes every field in one astuple call and unpacks it by position: each field
    # given a value of its own, none of them a default, must come out under its own name
    task_uuid = str(uuid.uuid4())
    checked = accepted(
        taskUUID=task_uuid, positivePrompt="A lone fencer", width=848, height=1264,
        outputType="URL", outputFormat="png", outputQuality=77, ttl=120, numberResults=3,
        deliveryMethod="async", includeCost=True, safety={"mode": "fast"},
        webhookURL="https://hooks.example.com/t", uploadEndpoint="https://up.example.com/{index}",
        referenceImages=[GOOD_IMAGES[1]],
    )  # fmt: skip
    assert checked.taskUUID == task_uuid
    assert (checked.model, checked.positivePrompt) == (MODEL, "A lone fencer")
    assert (checked.width, checked.height) == (848, 1264)
    assert (checked.outputType, checked.outputFormat, checked.outputQuality) == ("URL", "PNG", 77)
    assert (checked.ttl, checked.numberResults, checked.deliveryMethod) == (120, 3, "async")
    assert checked.includeCost is True and checked.safety.mode == "fast"
    assert checked.webhookURL == "https://hooks.example.com/t"
    assert checked.uploadEndpoint == "https://up.example.com/{index}"
    assert [ref.image for ref in checked.reference_images] == [GOOD_IMAGES[1]]
    assert len(ImageInference.__struct_fields__) == 17  # a new field: _normalise unpacks it too


def test_a_model_is_checked_by_its_own_catalogue_s_rules(tmp_path: Path) -> None:
    # the rules computed per model are found by AIR id: a second catalogue with a model of the
    # same name but other formats must not be checked by the first one's
    source = Path(__file__).parents[2] / "protocol/catalogue/exactly-photo-extreme-contrast.toml"
    text = source.read_text().replace('["JPG", "PNG", "WEBP"]', '["PNG"]')
    (tmp_path / "other.toml").write_text(text.replace('"inputs", "referenceImages"', '"inputs"'))
    other = load_catalogue(tmp_path)
    refs = [GOOD_IMAGES[0]]
    for catalogue in (None, other, None):  # each one's rules after the other's
        jpg = outcome(image_task(outputFormat="JPG"), catalogue)
        top = outcome(image_task(referenceImages=refs), catalogue)
        if catalogue is None:
            assert isinstance(jpg, ImageTask)
            assert isinstance(top, ImageTask)
        else:
            assert isinstance(jpg, ErrorItem)
            assert (jpg.code, jpg.parameter) == ("invalidOutputFormat", "outputFormat")
            assert isinstance(top, ErrorItem)
            assert (top.code, top.parameter) == ("unsupportedParameter", "referenceImages")
