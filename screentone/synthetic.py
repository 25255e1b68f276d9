"""A procedural colour comic page, so the renderers can be demonstrated, tested and benchmarked without data.

It holds what a screentone renderer must handle: white paper and gutters, black panel borders and ink outlines,
flat colour fills (some pairs of equal luma but different hue), a smooth gradient sky, solid black areas and
thin hatching. The seed fixes every choice.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw


def synthetic_color_page(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An H x W x 3 uint8 colour page with panels, outlined flat shapes, a gradient and black areas."""
    if height < 64 or width < 64:
        raise ValueError(f"synthetic pages need at least 64 x 64 pixels, got {height} x {width}")
    rng = np.random.default_rng(seed)
    page = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    line = max(2, round(min(width, height) / 200))
    gutter = max(6, round(min(width, height) / 40))
    split_y = int(height * rng.uniform(0.4, 0.55))
    split_x = int(width * rng.uniform(0.4, 0.6))
    panels = [
        (gutter, gutter, width - gutter, split_y - gutter // 2),
        (gutter, split_y + gutter // 2, split_x - gutter // 2, height - gutter),
        (split_x + gutter // 2, split_y + gutter // 2, width - gutter, height - gutter),
    ]
    _gradient_sky(page, panels[0], rng)
    for index, box in enumerate(panels):
        _fill_panel(draw, box, rng, line, with_sky=index == 0)
        draw.rectangle(box, outline=(0, 0, 0), width=line)
    return np.asarray(page, dtype=np.uint8).copy()


def _color(rng: np.random.Generator, value: float | None = None) -> tuple[int, int, int]:
    hue = rng.uniform(0, 1)
    saturation = rng.uniform(0.35, 0.9)
    value = rng.uniform(0.45, 0.95) if value is None else value
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, saturation, value))


def _gradient_sky(page: Image.Image, box: tuple[int, int, int, int], rng: np.random.Generator) -> None:
    x0, y0, x1, y1 = box
    top = np.array(_color(rng, 0.95), dtype=np.float32)
    bottom = np.array([255, 255, 255], dtype=np.float32)
    t = np.linspace(0.0, 1.0, y1 - y0, dtype=np.float32)[:, None, None]
    strip = (1 - t) * top + t * bottom
    sky = np.broadcast_to(strip, (y1 - y0, x1 - x0, 3)).astype(np.uint8)
    page.paste(Image.fromarray(sky), (x0, y0))


def _fill_panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    rng: np.random.Generator,
    line: int,
    with_sky: bool,
) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if not with_sky:
        floor = y0 + int(h * rng.uniform(0.55, 0.75))
        draw.rectangle((x0, floor, x1, y1), fill=_color(rng), outline=(0, 0, 0), width=line)
    for _ in range(int(rng.integers(2, 5))):
        cx, cy = x0 + rng.uniform(0.2, 0.8) * w, y0 + rng.uniform(0.25, 0.75) * h
        rx, ry = rng.uniform(0.08, 0.22) * w, rng.uniform(0.1, 0.3) * h
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=_color(rng), outline=(0, 0, 0), width=line)
    # Two squares of equal luma and different hue: a renderer must tell them apart by texture.
    side = int(min(w, h) * 0.18)
    sx, sy = x0 + int(w * 0.06), y0 + int(h * 0.08)
    draw.rectangle((sx, sy, sx + side, sy + side), fill=(200, 60, 60), outline=(0, 0, 0), width=line)
    draw.rectangle((sx + side, sy, sx + 2 * side, sy + side), fill=(40, 145, 40), outline=(0, 0, 0), width=line)
    # Solid black hair-like blob with hatching beside it.
    hx, hy = x0 + int(w * rng.uniform(0.55, 0.75)), y0 + int(h * 0.1)
    draw.pieslice((hx, hy, hx + side, hy + side), 180, 360, fill=(0, 0, 0))
    for k in range(6):
        offset = k * max(3, line * 2)
        draw.line((hx + offset, hy + side, hx + offset + side // 3, hy + side // 2), fill=(0, 0, 0), width=1)
