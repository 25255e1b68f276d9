"""Drawing a character: a pen that tracks the drawn extent (the character's box) and the figure itself."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import ImageDraw

from pipelines.sample_corpus.cast import luma, mix
from pipelines.sample_corpus.labels import RGB, Character

INK: RGB = (0, 0, 0)
WHITE: RGB = (255, 255, 255)


class _Pen:
    """ImageDraw wrapper that tracks the extent of everything drawn (the character's bounding box)."""

    def __init__(self, draw: ImageDraw.ImageDraw, lw: int, grey: bool):
        self.draw, self.lw, self.grey = draw, lw, grey
        self.x0 = self.y0 = math.inf
        self.x1 = self.y1 = -math.inf

    def _fill(self, color: RGB) -> RGB:
        return luma(color) if self.grey else color

    def _track(self, xs: Sequence[float], ys: Sequence[float]) -> None:
        self.x0, self.x1 = min(self.x0, *xs), max(self.x1, *xs)
        self.y0, self.y1 = min(self.y0, *ys), max(self.y1, *ys)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, color: RGB, outline: bool = True) -> None:
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        self.draw.ellipse(box, fill=self._fill(color), outline=INK if outline else None, width=self.lw)
        self._track((box[0], box[2]), (box[1], box[3]))

    def polygon(self, points: Sequence[tuple[float, float]], color: RGB) -> None:
        self.draw.polygon(points, fill=self._fill(color), outline=INK, width=self.lw)
        self._track([p[0] for p in points], [p[1] for p in points])

    def pieslice(self, cx: float, cy: float, rx: float, ry: float, start: float, end: float, color: RGB) -> None:
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        self.draw.pieslice(box, start, end, fill=self._fill(color), outline=INK, width=self.lw)
        self._track((box[0], box[2]), (box[1], cy))

    def line(self, points: Sequence[tuple[float, float]], width: int) -> None:
        self.draw.line(points, fill=INK, width=width)
        self._track([p[0] for p in points], [p[1] for p in points])

    def trapezoid(self, cx: float, y0: float, half0: float, y1: float, half1: float, color: RGB) -> None:
        """Symmetric about x = cx: half-width `half0` at y0, `half1` at y1 (0 gives a triangle)."""
        self.polygon([(cx - half0, y0), (cx + half0, y0), (cx + half1, y1), (cx - half1, y1)], color)


def draw_character(
    draw: ImageDraw.ImageDraw, ch: Character, cx: float, foot: float, height: float, facing: int, grey: bool = False
) -> tuple[float, float, float, float]:
    """Draw a figure `height` px tall standing at (cx, foot); returns its drawn extent (x0, y0, x1, y1).

    Proportions are in units u = height / 100 from the top of the figure; `facing` (+1/-1) shifts eyes and
    ponytail. `grey` draws the same shapes in the colours' luma (line-art characters on light pages).
    """
    u = height / 100.0
    top = foot - height
    wide = ch.build * u  # horizontal unit of the body
    body_lw = max(1, round(height / 75))
    pen = _Pen(draw, body_lw, grey)
    hx, hy = cx, top + 14 * u  # head centre
    trousers = mix(ch.clothes, (40, 40, 60), 0.6)

    # Back hair and hood, behind the head.
    if ch.hair_style == "long":
        pen.trapezoid(hx, hy - 4 * u, 13 * u, top + 52 * u, 16 * u, ch.hair)
    elif ch.hair_style == "bob":
        pen.trapezoid(hx, hy - 4 * u, 14 * u, hy + 12 * u, 16 * u, ch.hair)
    elif ch.hair_style == "ponytail":
        pen.ellipse(hx - facing * 14 * u, hy + 6 * u, 5 * u, 15 * u, ch.hair)
    elif ch.hair_style == "twin_tails":
        pen.ellipse(hx - 16 * u, hy + 12 * u, 5 * u, 16 * u, ch.hair)
        pen.ellipse(hx + 16 * u, hy + 12 * u, 5 * u, 16 * u, ch.hair)
    if ch.clothes_style == "hoodie":
        pen.ellipse(hx, hy + 6 * u, 15 * u, 11 * u, ch.accent)

    # Legs and shoes.
    legs = ch.skin if ch.clothes_style == "dress" else trousers
    for side in (-1, 1):
        leg_x = hx + side * (1.5 * u + 3.75 * wide)
        pen.trapezoid(leg_x, top + 58 * u, 3.75 * wide, top + 95 * u, 3.75 * wide, legs)
        pen.ellipse(leg_x + facing * 1.5 * u, top + 96.5 * u, 5 * u, 3.5 * u, (30, 30, 30))

    # Skirt or coat tails, arms with hands, torso, accent (tie, belt, collar or pocket).
    if ch.clothes_style == "dress":
        pen.trapezoid(hx, top + 56 * u, 11 * wide, top + 78 * u, 20 * wide, ch.clothes)
    elif ch.clothes_style == "coat":
        pen.trapezoid(hx, top + 55 * u, 12 * wide, top + 80 * u, 14 * wide, ch.clothes)
    for side in (-1, 1):
        sx = hx + side * 14 * wide
        arm = [(sx, 30), (sx + side * 6 * u, 32), (sx + side * 9 * u, 57), (sx + side * 3 * u, 58)]
        pen.polygon([(x, top + y * u) for x, y in arm], ch.clothes)
        pen.ellipse(sx + side * 6 * u, top + 60 * u, 3.5 * u, 3.5 * u, ch.skin)
    pen.trapezoid(hx, top + 29 * u, 15 * wide, top + 60 * u, 11 * wide, ch.clothes)
    if ch.clothes_style == "shirt":
        pen.trapezoid(hx, top + 29 * u, 2.5 * u, top + 47 * u, 0, ch.accent)
    elif ch.clothes_style == "dress":
        pen.trapezoid(hx, top + 53 * u, 11 * wide, top + 58 * u, 11 * wide, ch.accent)
    elif ch.clothes_style == "coat":
        pen.trapezoid(hx, top + 28 * u, 7 * u, top + 40 * u, 0, ch.accent)
    else:
        pen.trapezoid(hx, top + 45 * u, 7 * u, top + 54 * u, 7 * u, ch.accent)

    # Neck, head, hair cap, side locks and fringe, face.
    pen.trapezoid(hx, hy + 9 * u, 3 * u, hy + 16 * u, 3 * u, ch.skin)
    pen.ellipse(hx, hy, 11 * u, 12.5 * u, ch.skin)
    if ch.hair_style == "spiky":
        spikes = []
        for k in range(11):
            angle, radius = math.pi + math.pi * k / 10, (13 if k % 2 == 0 else 19) * u
            spikes.append((hx + radius * math.cos(angle), hy + 1 * u + radius * math.sin(angle)))
        pen.polygon(spikes, ch.hair)
    else:
        pen.pieslice(hx, hy + 1 * u, 12.5 * u, 14 * u, 180, 360, ch.hair)
    for side in (-1, 1):
        pen.polygon([(hx + side * 12.5 * u, hy), (hx + side * 8 * u, hy), (hx + side * 11 * u, hy + 8 * u)], ch.hair)
    fringe = [(hx - 11 * u, hy - 1 * u)]
    for k in range(5):
        x = hx - 11 * u + 22 * u * (k + 0.5) / 5
        fringe += [(x, hy + (4.5 if k % 2 == 0 else 3) * u), (hx - 11 * u + 22 * u * (k + 1) / 5, hy + 0.5 * u)]
    fringe.append((hx + 11 * u, hy - 1 * u))
    pen.polygon(fringe, ch.hair)
    shift = facing * 1.5 * u
    pen.lw = max(1, round(height / 150))  # finer lines for the eyes
    for side in (-1, 1):
        ex, ey = hx + side * 5 * u + shift, hy + 7 * u
        if u >= 1.2:
            pen.ellipse(ex, ey, 3 * u, 3.6 * u, WHITE)
            pen.ellipse(ex, ey + 0.4 * u, 2 * u, 2.8 * u, ch.eyes, outline=False)
            pen.ellipse(ex, ey + 0.6 * u, 0.9 * u, 1.3 * u, INK, outline=False)
        else:  # too small for irises: dots
            pen.ellipse(ex, ey, max(0.6, 1.2 * u), max(0.8, 1.8 * u), INK, outline=False)
    pen.line([(hx - 2 * u + shift, hy + 10.5 * u), (hx + 2 * u + shift, hy + 10.5 * u)], max(1, round(u / 2)))
    pad = body_lw / 2 + 1
    return pen.x0 - pad, pen.y0 - pad, pen.x1 + pad, pen.y1 + pad
