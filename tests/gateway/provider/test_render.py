"""The renderer's promises: extreme contrast on every size, determinism, prompts that steer,
image-to-image that keeps structure, and encoders that honour the quality asked."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from gateway.provider.pool import RenderJob, render
from gateway.provider.render import (
    Style,
    encode_image,
    luminance,
    regrade,
    render_scene,
)
from protocol.frames import CONTENT_TYPES
from protocol.models import default_catalogue
from tests.gateway.conftest import MODEL

EXAMPLES = json.loads(
    (Path(__file__).parents[2] / "protocol/fixtures/model_card_examples.json").read_text()
)
PROMPTS = [e["request"]["positivePrompt"] for e in EXAMPLES]
SIZES = default_catalogue().get(MODEL).sizes  # type: ignore[union-attr]


def contrast(image: Image.Image) -> tuple[float, float, float]:
    """(share below 0.08, share above 0.92, RMS contrast) of the luminance."""
    lum = luminance(image)
    return float(np.mean(lum < 0.08)), float(np.mean(lum > 0.92)), float(lum.std())


def assert_extreme(image: Image.Image) -> None:
    dark, bright, rms = contrast(image)
    assert dark >= 0.35, dark
    assert bright >= 0.02, bright
    assert rms >= 0.30, rms


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s.tier}-{s.label}")
def test_every_size_renders_with_extreme_contrast(size: object) -> None:
    width, height = size.width, size.height  # type: ignore[attr-defined]
    image = render_scene(PROMPTS[0], 1697510273, width, height)
    assert image.size == (width, height)
    assert_extreme(image)
    # and after a JPEG round trip, as a client sees it
    decoded = Image.open(io.BytesIO(encode_image(image, "JPG", 95)))
    assert_extreme(decoded)


@pytest.mark.parametrize("prompt", [*PROMPTS, "a cat", "x", "window light, mist, blue neon rain"])
@pytest.mark.parametrize("seed", [1, 2, 3, 2**31 - 1])
def test_contrast_holds_across_prompts_and_seeds(prompt: str, seed: int) -> None:
    assert_extreme(render_scene(prompt, seed, 632, 424))


def test_same_inputs_same_bytes() -> None:
    job = RenderJob(PROMPTS[1], 42, 1264, 848, "JPG", 95)
    assert render(job) == render(job)
    assert render(RenderJob(PROMPTS[1], 42, 1264, 848, "PNG", 95)) == render(
        RenderJob(PROMPTS[1], 42, 1264, 848, "PNG", 95)
    )


def test_each_seed_looks_different() -> None:
    images = [np.asarray(render_scene(PROMPTS[0], seed, 632, 424), np.int16) for seed in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(images[i] - images[j]).mean() > 10


def test_prompt_words_steer_palette_and_light() -> None:
    def mean_rgb(prompt: str) -> np.ndarray:
        pixels = np.asarray(render_scene(prompt, 5, 632, 424), np.float64).reshape(-1, 3)
        mean: np.ndarray = pixels.mean(0)
        return mean

    saffron = mean_rgb("a wrestler in saffron dust")
    chrome = mean_rgb("a drummer in a chrome coat")
    assert saffron[0] / saffron[2] > 1.3  # warm
    assert chrome[2] / chrome[0] > 1.02  # cool
    assert (
        Style.from_prompt("a floodlight", 1).width_of_light
        > Style.from_prompt("a spotlight", 1).width_of_light
    )
    assert Style.from_prompt("light through a window", 1).light == "shaft"
    assert Style.from_prompt("mist", 1).haze > Style.from_prompt("clear night", 1).haze
    assert Style.from_prompt("wet pavement", 1).reflections
    left = np.asarray(render_scene("spotlight from the left", 9, 632, 424), np.float64)
    right = np.asarray(render_scene("spotlight from the right", 9, 632, 424), np.float64)
    assert np.abs(left - right).mean() > 10


# --------------------------------------------------------------------------- image to image


def a_photograph(width: int = 900, height: int = 600) -> Image.Image:
    """A soft, ordinary picture: gradient sky, a building, a tree, a figure, some texture."""
    rng = np.random.default_rng(3)
    y = np.linspace(0, 1, height)[:, None]
    base = (110 + 60 * y + 0 * np.arange(width)[None, :]).astype(np.uint8)
    image = Image.fromarray(base, "L").convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((80, 200, 330, 560), fill=(95, 90, 85))
    draw.rectangle((120, 260, 170, 330), fill=(150, 150, 140))
    draw.ellipse((520, 150, 760, 380), fill=(80, 120, 70))
    draw.rectangle((625, 370, 655, 560), fill=(90, 70, 50))
    draw.ellipse((420, 300, 470, 350), fill=(170, 140, 120))
    draw.rectangle((425, 350, 465, 520), fill=(60, 60, 90))
    noise = rng.normal(0, 6, (height, width, 3))
    pixels = np.clip(np.asarray(image, np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").filter(ImageFilter.GaussianBlur(1.2))


def edges(image: Image.Image) -> np.ndarray:
    """The strongest 6% of gradients, at the scale of structure rather than of grain."""
    lum = np.asarray(image.convert("L").filter(ImageFilter.GaussianBlur(2)), np.float64)
    gx = np.zeros_like(lum)
    gy = np.zeros_like(lum)
    gx[:, 1:-1] = lum[:, 2:] - lum[:, :-2]
    gy[1:-1, :] = lum[2:, :] - lum[:-2, :]
    magnitude = np.hypot(gx, gy)
    strong: np.ndarray = magnitude > np.percentile(magnitude, 94)
    return strong


def near(mask: np.ndarray, pixels: int) -> np.ndarray:
    dilated = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(pixels))
    return np.asarray(dilated) > 0


@pytest.mark.parametrize(("width", "height"), [(1264, 848), (1024, 1024), (848, 1264)])
def test_regrade_keeps_structure_and_raises_contrast(width: int, height: int) -> None:
    reference = a_photograph()
    fitted = ImageOps.fit(reference, (width, height))
    out = regrade(reference, "chrome drummer, hard overhead beam", 11, width, height)
    assert out.size == (width, height)
    ref_rms = float(luminance(fitted).std())
    _, _, rms = contrast(out)
    assert rms >= 1.5 * ref_rms, (rms, ref_rms)
    assert rms >= 0.25
    assert contrast(out)[0] >= 0.35
    # structure: the output's strong edges lie on the reference's, far above chance...
    around_reference = near(edges(fitted), 9)
    chance = float(around_reference.mean())
    out_edges = edges(out)
    on_structure = float((out_edges & around_reference).sum() / out_edges.sum())
    assert on_structure > 2.5 * chance, (on_structure, chance)
    # ...where an unrelated picture's edges fall at chance
    other = edges(render_scene("a cat", 1, width, height))
    unrelated = float((other & around_reference).sum() / other.sum())
    assert unrelated < 1.5 * chance < on_structure / 1.6, (unrelated, chance, on_structure)


def test_regrade_through_the_worker_accepts_encoded_bytes() -> None:
    buffer = io.BytesIO()
    a_photograph().save(buffer, "PNG")
    data = render(RenderJob("mist", 2, 1024, 1024, "WEBP", 80, buffer.getvalue()))
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "WEBP" and decoded.size == (1024, 1024)


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("quality", [20, 50, 75, 95, 99])
def test_jpeg_quantisation_tables_match_the_quality(quality: int) -> None:
    data = encode_image(render_scene("spotlight", 1, 632, 424), "JPG", quality)
    probe = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 64, 32)).save(probe, "JPEG", quality=quality)
    expected = Image.open(probe).quantization  # type: ignore[attr-defined]
    assert Image.open(io.BytesIO(data)).quantization == expected  # type: ignore[attr-defined]


@pytest.mark.parametrize("output_format", ["JPG", "WEBP"])
def test_file_size_grows_with_quality(output_format: str) -> None:
    image = render_scene(PROMPTS[2], 1, 1264, 848)
    sizes = [len(encode_image(image, output_format, q)) for q in (20, 50, 80, 99)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] / 2


@pytest.mark.parametrize("output_format", ["JPG", "PNG", "WEBP"])
def test_formats(output_format: str) -> None:
    data = encode_image(render_scene("x", 1, 320, 200), output_format, 90)
    decoded = Image.open(io.BytesIO(data))
    assert Image.MIME[decoded.format or ""] == CONTENT_TYPES[output_format]
    with pytest.raises(ValueError, match="unknown output format"):
        encode_image(decoded, "GIF", 90)
