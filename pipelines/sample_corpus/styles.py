"""Page styles: the colour variants and the B&W conversions (grey, screentone, sepia, chroma noise) of a page."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from pipelines.sample_corpus.cast import pick
from pipelines.sample_corpus.labels import BW_STYLES, Character
from pipelines.sample_corpus.pages import Rendered, render_cover, render_page


def _desaturate(img: Image.Image, target_chroma: float) -> Image.Image:
    """Pull colours towards grey so the page's 98th-percentile chroma is about `target_chroma` (max - min)."""
    rgb = np.asarray(img, np.float32)
    y = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    chroma = float(np.percentile(rgb.max(axis=2) - rgb.min(axis=2), 98))
    amount = min(0.5, max(0.15, target_chroma / max(chroma, 1.0)))
    return Image.fromarray(np.clip(y[..., None] + amount * (rgb - y[..., None]), 0, 255).round().astype(np.uint8))


def _screentone(grey: np.ndarray, rng: np.random.Generator, page_w: int) -> np.ndarray:
    """Clustered-dot halftone of the mid-greys, rendered at the final resolution; lines and paper untouched."""
    h, w = grey.shape
    period = max(3.5, page_w / rng.uniform(70, 100))
    angle = math.radians(pick(rng, (45.0, 30.0, 15.0)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = (xx * math.cos(angle) + yy * math.sin(angle)) / period
    v = (-xx * math.sin(angle) + yy * math.cos(angle)) / period
    spot = (np.cos(2 * np.pi * u) + np.cos(2 * np.pi * v)) / 4 + 0.5  # 1 at dot centres
    darkness = 1.0 - grey.astype(np.float32) / 255.0
    out = np.where(1.0 - spot < darkness, 0, 255).astype(np.uint8)
    out[grey < 60] = 0
    out[grey > 232] = 255
    return out


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cell: int) -> np.ndarray:
    coarse = rng.normal(0.0, 1.0, (h // cell + 2, w // cell + 2)).astype(np.float32)
    img = Image.fromarray(coarse, "F").resize((w + 2 * cell, h + 2 * cell), Image.Resampling.BICUBIC)
    return np.asarray(img, np.float32)[cell : cell + h, cell : cell + w]


def _sepia(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Yellowed scan: one warm tint for the whole page (ink -> paper ramp) plus luminance-only paper noise."""
    h, w = grey.shape
    paper = np.array([244, 231, 198], np.float32) + rng.uniform(-6, 6, 3).astype(np.float32)
    ink = np.array([40, 32, 26], np.float32)
    noise = 5.0 * _smooth_noise(rng, w, h, 24) + rng.normal(0.0, 2.5, (h, w)).astype(np.float32)
    t = np.clip((grey.astype(np.float32) + noise) / 255.0, 0.0, 1.0)[..., None]
    return np.clip(ink + (paper - ink) * t, 0, 255).round().astype(np.uint8)


def _chroma_noise(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grey page with scanner misregistration (R and B slightly shifted) and per-channel noise."""
    g = grey.astype(np.float32)
    red = 0.7 * g + 0.3 * np.roll(g, 1, axis=1)
    blue = 0.7 * g + 0.3 * np.roll(g, -1, axis=0)
    rgb = np.stack([red, g, blue], axis=-1) + rng.normal(0.0, 2.0, (*g.shape, 3)).astype(np.float32)
    return np.clip(rgb, 0, 255).round().astype(np.uint8)


def render_styled(
    rng: np.random.Generator, style: str, cast: list[Character], weights: np.ndarray, size: tuple[int, int]
) -> Rendered:
    """Draw a page and apply its style; returns RGB for colour, sepia and chroma_noise, L for grey/screentone."""
    if style == "cover":
        return render_cover(rng, cast, size)
    rendered = render_page(rng, cast, weights, size, light=style == "colour_light")
    if style == "colour_muted":
        rendered.image = _desaturate(rendered.image, rng.uniform(35, 55))
    elif style in BW_STYLES:
        grey = np.asarray(rendered.image.convert("L"))
        if style == "grey":
            rendered.image = Image.fromarray(grey, "L")
        elif style == "screentone":
            rendered.image = Image.fromarray(_screentone(grey, rng, size[0]), "L")
        elif style == "sepia":
            rendered.image = Image.fromarray(_sepia(grey, rng), "RGB")
        else:
            rendered.image = Image.fromarray(_chroma_noise(grey, rng), "RGB")
    return rendered
