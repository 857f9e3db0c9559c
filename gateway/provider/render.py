"""The local provider's renderer: extreme-contrast photographs composed on the CPU.

A picture is a composed scene, not noise: a hard key light (a cone or a shaft) falling on a
figure's silhouette, with rim light, falloff into deep shadow, a pool of light on the floor,
reflections and haze where the prompt asks for them, and fine film grain. Words of the prompt
steer the palette, the kind and direction of light and the atmosphere. Everything is a pure
function of (prompt, seed, width, height): the same inputs give the same pixels.

The scene is computed at half resolution (light fields are smooth) as one grey tone channel; Pillow
upscales it, adds seeded grain at full resolution and colours it through a lookup table, all in
C, which keeps a 1K image well inside its time budget on one core.

With a reference image, :func:`regrade` keeps the reference's structure and regrades it in the
same style: a tone curve that crushes the blacks, local contrast, hard highlights, grain.
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageFilter, ImageOps

__all__ = [
    "Style",
    "encode_image",
    "luminance",
    "regrade",
    "render_scene",
]


F = np.float32
RGB = tuple[float, float, float]

# prompt word -> (key light colour, shadow colour)
_PALETTES: dict[str, tuple[RGB, RGB]] = {
    "saffron": ((1.0, 0.72, 0.30), (0.55, 0.25, 0.10)),
    "paprika": ((1.0, 0.55, 0.32), (0.55, 0.18, 0.10)),
    "amber": ((1.0, 0.78, 0.42), (0.50, 0.30, 0.15)),
    "gold": ((1.0, 0.84, 0.50), (0.45, 0.32, 0.15)),
    "candle": ((1.0, 0.74, 0.45), (0.40, 0.22, 0.12)),
    "crimson": ((1.0, 0.40, 0.38), (0.45, 0.05, 0.08)),
    "red": ((1.0, 0.45, 0.40), (0.50, 0.08, 0.08)),
    "chrome": ((0.86, 0.93, 1.0), (0.20, 0.28, 0.40)),
    "silver": ((0.90, 0.94, 1.0), (0.25, 0.30, 0.38)),
    "steel": ((0.84, 0.90, 1.0), (0.18, 0.24, 0.32)),
    "blue": ((0.72, 0.84, 1.0), (0.08, 0.15, 0.40)),
    "moonlight": ((0.80, 0.88, 1.0), (0.10, 0.15, 0.30)),
    "teal": ((0.70, 1.0, 0.95), (0.05, 0.25, 0.28)),
    "neon": ((1.0, 0.45, 0.95), (0.20, 0.05, 0.45)),
    "violet": ((0.85, 0.65, 1.0), (0.25, 0.10, 0.40)),
    "green": ((0.75, 1.0, 0.70), (0.08, 0.30, 0.12)),
}
_NEUTRAL: tuple[RGB, RGB] = ((1.0, 0.97, 0.92), (0.30, 0.32, 0.36))
_HAZE = ("mist", "haze", "fog", "smoke", "dust", "steam", "chalk", "spice", "atmosphere")
_PARTICLES = ("dust", "chalk", "spice", "snow", "rain", "sparks", "ash", "particles")
_REFLECTIONS = ("wet", "rain", "reflect", "puddle", "polished", "chrome", "mirror", "glossy")


@dataclass(frozen=True)
class Style:
    """What the prompt asks of the picture."""

    light: str  # "cone" (spot/flood from above) or "shaft" (from the side)
    width_of_light: float  # half-angle of the cone, radians
    from_left: bool
    key: RGB
    shadow: RGB
    haze: float
    particles: bool
    reflections: bool

    @classmethod
    def from_prompt(cls, prompt: str, seed: int) -> Style:
        words = prompt.lower()
        digest = hashlib.blake2b(f"{seed}:{prompt}".encode(), digest_size=8).digest()
        coin = int.from_bytes(digest, "big")
        palette = next((p for word, p in _PALETTES.items() if word in words), _NEUTRAL)
        if any(w in words for w in ("window", "side light", "sidelight", "shaft", "blinds")):
            light = "shaft"
        else:
            light = "cone"
        if "floodlight" in words or "flood light" in words:
            spread = 0.42
        elif "spotlight" in words or "spot light" in words:
            spread = 0.22
        else:
            spread = 0.26 + (coin % 100) / 100 * 0.14
        if "from the left" in words or "left" in words.split():
            from_left = True
        elif "from the right" in words or "right" in words.split():
            from_left = False
        else:
            from_left = bool(coin >> 7 & 1)
        haze = 0.22 if any(w in words for w in _HAZE) else 0.06
        return cls(
            light=light,
            width_of_light=spread,
            from_left=from_left,
            key=palette[0],
            shadow=palette[1],
            haze=haze,
            particles=any(w in words for w in _PARTICLES),
            reflections=any(w in words for w in _REFLECTIONS),
        )


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _low_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1]: a small random grid upscaled bilinearly by Pillow."""
    h, w = shape
    grid = rng.random((cells, max(2, round(cells * w / h))), dtype=F)
    image = Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(image, dtype=F), 0.0, 1.0)


def _capsule(px: np.ndarray, py: np.ndarray, a: tuple[float, float], b: tuple[float, float],
             radius: float) -> np.ndarray:  # fmt: skip
    """Signed distance to a capsule from a to b: limbs and torso of the figure."""
    ax, ay = a
    bx, by = b
    dx, dy = bx - ax, by - ay
    h = np.clip(((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy + 1e-9), 0.0, 1.0)
    return np.hypot(px - ax - dx * h, py - ay - dy * h) - radius


def _smin(a: np.ndarray, k: float, b: np.ndarray) -> np.ndarray:
    """Smooth union of two distance fields: limbs grow into each other without seams."""
    h = np.clip(k - np.abs(a - b), 0.0, None) / k
    union: np.ndarray = np.minimum(a, b) - h * h * k * 0.25
    return union


def _figure(rng: np.random.Generator, px: np.ndarray, py: np.ndarray, cx: float, floor: float,
            height: float) -> np.ndarray:  # fmt: skip
    """Signed distance to a standing figure (negative inside), posed by the seed."""
    u = height / 7.5  # one head
    lean = rng.uniform(-0.2, 0.2) * u
    stance = rng.uniform(0.35, 0.9) * u
    arm = rng.uniform(-0.6, 1.1)
    tilt = rng.uniform(-0.12, 0.12) * u
    k = 0.25 * u
    chest = (cx + lean, floor - 5.55 * u)
    hip = (cx, floor - 3.7 * u)
    d = np.hypot((px - cx - lean * 1.2 - tilt) / 0.82, py - (floor - 6.95 * u)) - 0.5 * u
    d = _smin(d, k, _capsule(px, py, (cx + lean, floor - 6.5 * u), chest, 0.2 * u))
    d = _smin(d, k, _capsule(px, py, (chest[0], chest[1] + 0.35 * u), hip, 0.82 * u))
    d = _smin(
        d, k, _capsule(px, py, (chest[0] - 0.95 * u, chest[1]), (chest[0] + 0.95 * u, chest[1]),
                       0.38 * u),
    )  # fmt: skip
    for side in (-1.0, 1.0):
        shoulder = (chest[0] + side * 1.1 * u, chest[1] + 0.1 * u)
        elbow = (shoulder[0] + side * (0.25 + 0.45 * arm) * u, floor - 4.3 * u)
        hand = (elbow[0] + side * 0.2 * arm * u, floor - (3.15 + 0.9 * max(arm, 0.0)) * u)
        d = _smin(d, k, _capsule(px, py, shoulder, elbow, 0.3 * u))
        d = _smin(d, k, _capsule(px, py, elbow, hand, 0.25 * u))
        knee = (cx + side * stance * 0.75, floor - 1.85 * u)
        d = _smin(d, k, _capsule(px, py, (cx + side * 0.42 * u, hip[1]), knee, 0.4 * u))
        d = _smin(d, k, _capsule(px, py, knee, (cx + side * stance, floor - 0.12 * u), 0.3 * u))
    return d


def _shade_figure(d: np.ndarray, light: tuple[float, float], height: float) -> np.ndarray:
    """Key light on the figure as on a body of cylinders: Lambert from the SDF's normal.

    The SDF's gradient is the outward normal in the picture plane; towards the middle of a limb
    the normal turns to face the camera, which gives each limb its roundness and the hard
    terminator of chiaroscuro. A thin rim lights the edges turned away from the key.
    """
    gy, gx = np.gradient(d)
    norm = np.sqrt(gx * gx + gy * gy) + 1e-9
    gx, gy = gx / norm, gy / norm
    lx, ly = light
    radius = 0.045 * height
    lateral = np.clip(1.0 + d / radius, 0.0, 1.0)
    facing = np.sqrt(1.0 - lateral * lateral)
    lambert = np.clip(lateral * -(gx * lx + gy * ly) + facing * 0.3, 0.0, 1.0)
    key = _smoothstep(0.04, 0.5, lambert) * (0.3 + lambert)
    back = np.clip(gx * lx + gy * ly, 0.0, 1.0)
    rim = np.exp(np.clip(d, None, 0.0) / (0.006 * height)) * back
    radiance: np.ndarray = 0.01 + 0.8 * key + 0.9 * rim
    return radiance


def _scene_luminance(style: Style, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Linear-ish scene radiance at (h, w); values above 1 clip to white in the tone curve."""
    aspect = w / h
    xs = np.linspace(-aspect / 2, aspect / 2, w, dtype=F)[None, :]
    ys = np.linspace(0.0, 1.0, h, dtype=F)[:, None]
    side = -1.0 if style.from_left else 1.0

    floor = float(rng.uniform(0.80, 0.90))
    cx = float(rng.uniform(-0.18, 0.18) * aspect)
    height = float(rng.uniform(0.55, 0.68))

    # the key light: a hard-edged cone from above, or a raking shaft from one side
    if style.light == "cone":
        lx, ly = cx + side * float(rng.uniform(0.02, 0.22)) * aspect, -0.35
    else:
        lx, ly = side * (aspect / 2 + 0.25), float(rng.uniform(0.05, 0.3))
    ax, ay = cx - lx, (floor - 0.5 * height) - ly
    norm = float(np.hypot(ax, ay))
    ax, ay = ax / norm, ay / norm
    dx = xs - lx
    dy = ys - ly
    dist = np.sqrt(dx * dx + dy * dy) + 1e-6
    cos_t = (dx * ax + dy * ay) / dist
    edge = float(np.cos(style.width_of_light))
    cone = _smoothstep(edge, edge + 0.012, cos_t)
    falloff = 1.0 / (1.0 + 0.9 * (dist - 0.3).clip(0.0) ** 2)
    beam = cone * falloff

    # the room: black walls the light barely touches, a haze that shows the beam
    texture = _low_noise(rng, (h, w), 9)
    lum = 0.012 + 0.02 * texture * (1.0 - ys)
    lum = lum + beam * (0.34 + style.haze * (0.6 + 0.8 * _low_noise(rng, (h, w), 5)))

    # the floor: a pool of light under the figure, and reflections when it is wet
    below = ys > floor
    pool = np.exp(-(((xs - cx) / (0.45 * height)) ** 2) - ((ys - floor - 0.04) / 0.05) ** 2)
    lum = lum + np.where(below, 0.9 * pool * beam + 0.2 * beam, 0.0)
    if style.reflections:
        # wet ground: the beam mirrored below the horizon, broken into soft vertical streaks
        knots = rng.random(48, dtype=F) ** 3
        streaks = np.interp(np.linspace(0, 47, w), np.arange(48), knots).astype(F)[None, :]
        mirrored = 2 * floor - ys
        reflected = _smoothstep(edge, edge + 0.02, (dx * ax + (mirrored - ly) * ay) / dist)
        fade = np.exp(-(ys - floor) / 0.12)
        lum = lum + np.where(below, 1.4 * reflected * streaks * fade, 0.0)

    # the figure: modelled by the key light, dark on the far side, with a rim of light
    top = max(0, int((floor - height * 1.02) * h))
    bottom = min(h, int((floor + 0.01) * h) + 1)
    half = int(height * 0.5 * h) + 2
    left = max(0, int((cx + aspect / 2) / aspect * w) - half)
    right = min(w, int((cx + aspect / 2) / aspect * w) + half)
    if bottom > top and right > left:
        px, py = xs[:, left:right], ys[top:bottom, :]
        d = _figure(rng, px, py, cx, floor, height)
        inside = _smoothstep(0.002, -0.002, d)
        body = _shade_figure(d, (-ax, -ay), height) * (0.3 + 0.8 * beam[top:bottom, left:right])
        region = lum[top:bottom, left:right]
        lum[top:bottom, left:right] = region * (1.0 - inside) + body * inside

    # the figure's shadow on the floor, thrown away from the light
    shadow = np.exp(-(((xs - cx + side * 0.25 * height) / (0.5 * height)) ** 2)
                    - ((ys - floor - 0.03) / 0.035) ** 2)  # fmt: skip
    lum = lum * np.where(below, 1.0 - 0.85 * shadow, 1.0)

    if style.particles:
        n = int(h * w * 0.0015)
        yy = rng.integers(0, h, n)
        xx = rng.integers(0, w, n)
        lum[yy, xx] += 1.5 * beam[yy, xx] * rng.random(n, dtype=F)
    radiance: np.ndarray = lum
    return radiance


def _tone(lum: np.ndarray, black: float, white: float) -> np.ndarray:
    """The extreme-contrast curve: crush below ``black``, clip above ``white``, steep between."""
    t = np.clip((lum - black) / (white - black), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@functools.lru_cache(maxsize=64)
def _duotone(key: RGB, shadow: RGB) -> list[int]:
    """A 768-entry RGB lookup table: shadows take the shadow colour, highlights the key light's,
    and the top of the range burns to white as film does. Applied by Pillow in C."""
    t = np.linspace(0.0, 1.0, 256, dtype=np.float64)[:, None]
    shade = np.asarray(shadow)[None, :]
    rgb = t * (shade + (np.asarray(key)[None, :] - shade) * t)
    burn = _smoothstep(0.85, 1.0, t)
    rgb = rgb + (1.0 - rgb) * burn
    return [int(v) for v in np.round(rgb.T.reshape(-1) * 255.0)]


def _grain(gray: Image.Image, seed: int, sigma: float) -> Image.Image:
    """Fine film grain at full resolution: a seeded tile of noise added in C."""
    rng = np.random.default_rng(seed ^ 0x5EED)
    noise = np.clip(rng.standard_normal((256, 256)) * sigma + 128.0, 0, 255).astype(np.uint8)
    tile = Image.fromarray(noise, "L")
    grain = Image.new("L", gray.size)
    for top in range(0, gray.size[1], 256):
        for left in range(0, gray.size[0], 256):
            grain.paste(tile, (left, top))
    return ImageChops.add(gray, grain, 1.0, -128)


def _finish(tone: np.ndarray, style: Style, seed: int, size: tuple[int, int]) -> Image.Image:
    """Tone in [0, 1] at any resolution -> the final RGB picture at ``size``."""
    gray = Image.fromarray((tone * 255.0 + 0.5).astype(np.uint8), "L")
    if gray.size != size:
        gray = gray.resize(size, Image.Resampling.BILINEAR)
    gray = _grain(gray, seed, 4.0)
    return gray.convert("RGB").point(_duotone(style.key, style.shadow))


_CRUSHED = 50.0  # percent of the frame at or below the black point, at least
_BURNT = 90.0  # percentile at or above which the frame burns to white, at most


def render_scene(prompt: str, seed: int, width: int, height: int) -> Image.Image:
    """An extreme-contrast photograph for ``prompt``, as an RGB image."""
    style = Style.from_prompt(prompt, seed)
    rng = np.random.default_rng(seed)
    lum = _scene_luminance(style, rng, max(2, height // 2), max(2, width // 2))
    # The contrast is a promise, not a hope: if a dim or bright scene would not crush half of the
    # frame to black and burn a tenth of it to white, the curve's end points move until it does.
    sample = lum[::4, ::4]
    black, white = np.percentile(sample, [_CRUSHED, _BURNT])
    black = max(0.06, float(black))
    white = max(min(0.62, float(white)), black + 0.05)
    return _finish(_tone(lum, black, white), style, seed, (width, height))


def luminance(image: Image.Image | np.ndarray) -> np.ndarray:
    """Rec. 709 luma of an 8-bit RGB picture, in [0, 1]."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, F)
    luma: np.ndarray = rgb[..., 0] * F(0.2126) + rgb[..., 1] * F(0.7152) + rgb[..., 2] * F(0.0722)
    return luma / F(255)


def regrade(reference: Image.Image, prompt: str, seed: int, width: int, height: int) -> Image.Image:
    """The reference at (width, height), regraded in the extreme-contrast style."""
    style = Style.from_prompt(prompt, seed)
    fitted = ImageOps.fit(reference.convert("RGB"), (width, height), Image.Resampling.BILINEAR)
    lum = luminance(fitted)
    # local contrast: push each pixel away from its neighbourhood's mean
    radius = max(2.0, min(width, height) / 40)
    # (Pillow blurs 8-bit images only; 8 bits are plenty for a neighbourhood mean)
    gray = Image.fromarray((lum * 255.0 + 0.5).astype(np.uint8), "L")
    blurred = np.asarray(gray.filter(ImageFilter.GaussianBlur(radius)), dtype=F) / F(255)
    detailed = lum + 1.2 * (lum - blurred)
    # crush what is darker than the median, burn the brightest few percent
    black, white = np.percentile(detailed, [52.0, 96.0])
    white = max(float(white), float(black) + 0.05)
    return _finish(_tone(detailed, float(black), white), style, seed, (width, height))


def encode_image(image: Image.Image, output_format: str, quality: int) -> bytes:
    """JPG, PNG or WEBP bytes; ``quality`` applies to JPG and WEBP."""
    buffer = io.BytesIO()
    if output_format == "JPG":
        image.save(buffer, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    elif output_format == "WEBP":
        image.save(buffer, "WEBP", quality=quality, method=0)
    elif output_format == "PNG":
        image.save(buffer, "PNG", compress_level=1)
    else:
        raise ValueError(f"unknown output format {output_format!r}")
    return buffer.getvalue()
