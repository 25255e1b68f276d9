"""Page composition: backgrounds, speech bubbles, panel layouts, and the rendered pages and covers with their boxes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from pipelines.sample_corpus.cast import hsv, pick
from pipelines.sample_corpus.drawing import INK, WHITE, draw_character
from pipelines.sample_corpus.labels import RGB, Box, Character


def _gradient(w: int, h: int, top: RGB, bottom: RGB) -> Image.Image:
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    column = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(column, (h, w, 3)).round().astype(np.uint8)), "RGB")


def _background(rng: np.random.Generator, w: int, h: int, light: bool, lw: int) -> Image.Image:
    """Panel background: sky, buildings, interior, gradient, speed lines or plain; line-only when `light`."""
    kinds = (
        ("plain", "speedlines", "buildings", "interior")
        if light
        else ("sky", "buildings", "gradient", "interior", "speedlines", "plain")
    )
    weights = (0.4, 0.2, 0.2, 0.2) if light else (0.22, 0.2, 0.16, 0.2, 0.1, 0.12)
    kind = pick(rng, kinds, weights)
    hue = rng.uniform(0, 1)
    if light:
        img = Image.new("RGB", (w, h), WHITE)
    elif kind in ("sky", "buildings"):
        img = _gradient(w, h, hsv(0.58 + rng.uniform(-0.04, 0.04), 0.6, 0.85), hsv(0.56, 0.15, 1.0))
    elif kind == "gradient":
        img = _gradient(w, h, hsv(hue, 0.55, 0.95), hsv(hue + rng.uniform(0.15, 0.4), 0.45, 0.9))
    elif kind == "interior":
        img = Image.new("RGB", (w, h), hsv(hue, 0.25, 0.95))
    else:
        img = Image.new("RGB", (w, h), hsv(hue, rng.uniform(0.25, 0.4), 1.0))  # full colour: tinted, never white
    draw = ImageDraw.Draw(img)
    if kind == "sky":
        for _ in range(int(rng.integers(1, 4))):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h * 0.5), rng.uniform(0.06, 0.14) * w
            for dx in (-1.0, 0.0, 1.0):
                draw.ellipse(
                    (cx + dx * r - r, cy - r * (0.6 - 0.2 * abs(dx)), cx + dx * r + r, cy + r * 0.6), fill=WHITE
                )
    elif kind == "buildings":
        x = -rng.uniform(0, 0.1) * w
        while x < w:
            bw, bh = rng.uniform(0.14, 0.32) * w, rng.uniform(0.3, 0.8) * h
            fill = WHITE if light else hsv(rng.uniform(0, 1), rng.uniform(0.1, 0.35), rng.uniform(0.55, 0.85))
            draw.rectangle((x, h - bh, x + bw, h + lw), fill=fill, outline=INK, width=lw)
            win = max(3.0, bw / 7)
            window = WHITE if light else hsv(0.14, 0.5, 1.0)
            for wy in np.arange(h - bh + win, h - win, 2 * win):
                for wx in np.arange(x + win, x + bw - win, 2 * win):
                    draw.rectangle(
                        (wx, wy, wx + win * 0.9, wy + win * 0.9), fill=window, outline=INK, width=max(1, lw // 2)
                    )
            x += bw
    elif kind == "interior":
        floor_y = h * rng.uniform(0.6, 0.75)
        if not light:
            draw.rectangle((0, floor_y, w, h), fill=hsv(hue + 0.08, 0.35, 0.7))
        vx = w * rng.uniform(0.3, 0.7)
        draw.line((0, floor_y, w, floor_y), fill=INK, width=lw)
        for k in range(-3, 4):
            draw.line((vx + k * w * 0.08, floor_y, vx + k * w * 0.5, h), fill=INK, width=max(1, lw // 2))
        wx0, wy0 = w * rng.uniform(0.05, 0.6), h * rng.uniform(0.08, 0.25)
        draw.rectangle(
            (wx0, wy0, wx0 + w * 0.3, wy0 + h * 0.28),
            fill=WHITE if light else hsv(0.57, 0.3, 1.0),
            outline=INK,
            width=lw,
        )
    elif kind == "speedlines":
        fx, fy = w * rng.uniform(0.3, 0.7), h * rng.uniform(0.3, 0.7)
        inner, outer = 0.35 * min(w, h), max(w, h)
        for angle in rng.uniform(0, 2 * math.pi, int(rng.integers(40, 90))):
            dx, dy = math.cos(angle), math.sin(angle)
            draw.line((fx + inner * dx, fy + inner * dy, fx + outer * dx, fy + outer * dy), fill=INK, width=1)
    return img


def _bubble(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    box: tuple[float, float, float, float],
    tail_to: tuple[float, float] | None,
    lw: int,
) -> None:
    """Speech bubble: white ellipse, black outline, a tail towards the speaker and vertical 'text' strokes."""
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if tail_to is not None:
        angle = math.atan2(tail_to[1] - cy, tail_to[0] - cx)
        dist = 1.45
        tip = (cx + dist * rx * math.cos(angle), cy + dist * ry * math.sin(angle))
        perp = angle + math.pi / 2
        base = [
            (
                cx + 0.7 * rx * math.cos(angle) + s * 0.2 * rx * math.cos(perp),
                cy + 0.7 * ry * math.sin(angle) + s * 0.2 * ry * math.sin(perp),
            )
            for s in (-1, 1)
        ]
        draw.polygon([base[0], tip, base[1]], fill=WHITE, outline=INK, width=lw)
    draw.ellipse(box, fill=WHITE, outline=INK, width=lw)
    if tail_to is not None:
        inner_tip = (tip[0] * 0.85 + cx * 0.15, tip[1] * 0.85 + cy * 0.15)
        draw.polygon([base[0], inner_tip, base[1]], fill=WHITE)
    columns = max(1, int(rx * 1.2 / max(4.0, rx * 0.25)))
    step = rx * 1.2 / columns
    stroke = max(1, lw - 1)
    for k in range(columns):
        x = cx + rx * 0.6 - step * (k + 0.5)
        y = cy - ry * 0.55
        y_end = cy + ry * rng.uniform(0.2, 0.55)
        while y < y_end:
            seg = ry * rng.uniform(0.12, 0.3)
            draw.line((x, y, x, min(y + seg, y_end)), fill=INK, width=stroke)
            y += seg + ry * 0.1


def _panel_layout(rng: np.random.Generator, w: int, h: int, allow_splash: bool) -> list[Box]:
    """Guillotine panel grid inside the page margins: rows of columns, or columns of rows."""
    mx, my, gutter = round(w * 0.06), round(h * 0.05), max(3, round(w * 0.02))
    area = (mx, my, w - mx, h - my)
    if rng.random() < 0.06 and allow_splash:
        return [area]

    def split(lo: int, hi: int, n: int) -> list[tuple[int, int]]:
        shares = rng.uniform(0.6, 1.4, n)
        total = hi - lo - gutter * (n - 1)
        edges = np.concatenate([[0.0], np.cumsum(shares / shares.sum() * total)])
        return [(lo + round(edges[i]) + gutter * i, lo + round(edges[i + 1]) + gutter * i) for i in range(n)]

    wide = w > h
    rows_first = rng.random() < (0.3 if wide else 0.75)
    n_outer = pick(rng, (2, 3, 3, 4) if h >= 480 else (2, 3, 3)) if rows_first else pick(rng, (2, 2, 3))
    boxes = []
    if rows_first:
        for y0, y1 in split(area[1], area[3], n_outer):
            for x0, x1 in split(area[0], area[2], pick(rng, (1, 2, 2, 3) if not wide else (2, 3, 4))):
                boxes.append((x0, y0, x1, y1))
    else:
        for x0, x1 in split(area[0], area[2], n_outer):
            for y0, y1 in split(area[1], area[3], pick(rng, (1, 2, 2, 3))):
                boxes.append((x0, y0, x1, y1))
    return boxes


@dataclass
class Rendered:
    image: Image.Image  # RGB or L
    characters: list[tuple[str, Box]] = field(default_factory=list)
    panels: list[Box] = field(default_factory=list)


def _clip(extent: tuple[float, float, float, float], panel: Box) -> Box | None:
    """Drawn extent (panel coordinates) -> page box clipped to the panel; None if too little is visible."""
    px0, py0, px1, py1 = panel
    x0 = max(px0, px0 + math.floor(extent[0]))
    y0 = max(py0, py0 + math.floor(extent[1]))
    x1 = min(px1, px0 + math.ceil(extent[2]))
    y1 = min(py1, py0 + math.ceil(extent[3]))
    return (x0, y0, x1, y1) if x1 - x0 >= 6 and y1 - y0 >= 6 else None


def _render_panel(
    rng: np.random.Generator,
    cast: list[Character],
    weights: np.ndarray,
    panel: Box,
    n_chars: int,
    light: bool,
    grey_chars: bool,
    page_w: int,
) -> tuple[Image.Image, list]:
    """One panel's picture (panel-sized, so drawing is clipped to it) and its characters' page boxes."""
    x0, y0, x1, y1 = panel
    w, h = x1 - x0, y1 - y0
    lw = max(1, round(page_w / 220))
    img = _background(rng, w, h, light, lw)
    draw = ImageDraw.Draw(img)
    placed: list[tuple[str, Box, tuple[float, float, float, float]]] = []
    if light and not grey_chars:  # the only colour of a light page: small, but not a speck
        shot = "full"
    elif n_chars == 1:
        shot = pick(rng, ("full", "bust", "far"), (0.45, 0.35, 0.2))
    else:
        shot = pick(rng, ("full", "far"))
    order = rng.permutation(n_chars)
    members = [cast[int(i)] for i in rng.choice(len(cast), size=n_chars, replace=False, p=weights)]
    for slot in order:
        ch = members[int(slot)]
        cx = w * (slot + 0.5) / n_chars + rng.uniform(-0.08, 0.08) * w / n_chars
        if shot == "bust":
            height = h * rng.uniform(1.7, 2.3)
            head_y = h * rng.uniform(0.3, 0.45)
            foot = head_y + 0.86 * height
            cx = w * rng.uniform(0.3, 0.7)
        elif shot == "full":
            height = min(h * rng.uniform(0.72, 0.95), w / n_chars * 2.2)
            foot = h * rng.uniform(0.95, 1.08)
        else:
            height = min(h * rng.uniform(0.35, 0.55), w / n_chars * 2.0)
            foot = h * rng.uniform(0.8, 0.95)
        facing = 1 if cx < w / 2 else -1
        extent = draw_character(draw, ch, cx, foot, height, facing, grey=grey_chars)
        box = _clip(extent, panel)
        if box is not None:
            head = (extent[0], extent[1], extent[2], extent[1] + 0.3 * (foot - extent[1]))
            placed.append((ch.name, box, head))
    bubbles: list[tuple[float, float, float, float]] = []
    bodies = [(b[0] - x0, b[1] - y0, b[2] - x0, b[3] - y0) for _, b, _ in placed]
    for _ in range(pick(rng, (0, 1, 1, 2))):
        bw, bh = w * rng.uniform(0.28, 0.42), h * rng.uniform(0.16, 0.28)
        bh = min(bh, bw * 1.4)
        for attempt in range(12):  # keep whole figures visible, else only heads (always whole: light colour)
            bx, by = rng.uniform(2, max(3, w - bw - 2)), rng.uniform(2, max(3, h - bh - 2))
            bubble = (bx, by, bx + bw, by + bh)
            protect_bodies = attempt < 6 or (light and not grey_chars)
            avoid = bubbles + (bodies if protect_bodies else [head for _, _, head in placed])
            if not any(_overlaps(bubble, other) for other in avoid):
                bubbles.append(bubble)
                speaker = placed[int(rng.integers(len(placed)))][2] if placed else None
                target = ((speaker[0] + speaker[2]) / 2, speaker[3]) if speaker else None
                _bubble(draw, rng, bubble, target, lw)
                break
    return img, [(name, box) for name, box, _ in placed]


def _overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def render_page(
    rng: np.random.Generator, cast: list[Character], weights: np.ndarray, size: tuple[int, int], light: bool
) -> Rendered:
    """A page of bordered panels; `light` pages are white line art with colour on one panel's characters only."""
    w, h = size
    panels = _panel_layout(rng, w, h, allow_splash=not light)
    counts = []
    for x0, y0, x1, y1 in panels:
        most = max(1, min(3, int((x1 - x0) / max(1, (y1 - y0)) * 2.2)))
        counts.append(min(most, pick(rng, (0, 1, 1, 1, 2, 2, 3))))
    if sum(counts) == 0:
        counts[max(range(len(panels)), key=lambda i: (panels[i][2] - panels[i][0]) * (panels[i][3] - panels[i][1]))] = 1
    with_chars = [i for i, c in enumerate(counts) if c > 0]
    colored = set(with_chars)
    if light:
        area = {i: (panels[i][2] - panels[i][0]) * (panels[i][3] - panels[i][1]) for i in with_chars}
        candidates = sorted(with_chars, key=area.get)[: max(1, len(with_chars) - 1)]  # never the largest panel
        colored = {int(rng.choice(candidates))}
    page = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(page)
    rendered = Rendered(page, panels=panels)
    lw = max(2, round(w / 170))
    for i, panel in enumerate(panels):
        img, chars = _render_panel(rng, cast, weights, panel, counts[i], light, i not in colored, w)
        page.paste(img, panel[:2])
        draw.rectangle((panel[0], panel[1], panel[2] - 1, panel[3] - 1), outline=INK, width=lw)
        rendered.characters.extend(chars)
    return rendered


def render_cover(rng: np.random.Generator, cast: list[Character], size: tuple[int, int]) -> Rendered:
    """Full-bleed colour cover: burst background, the lead and a second character, a title banner."""
    w, h = size
    hue = rng.uniform(0, 1)
    page = _gradient(w, h, hsv(hue, 0.7, 0.95), hsv(hue + 0.25, 0.6, 0.8))
    draw = ImageDraw.Draw(page)
    fx, fy = w * 0.5, h * 0.45
    light_ray = hsv(hue, 0.35, 1.0)
    rays = 18
    for k in range(rays):
        a0, a1 = 2 * math.pi * k / rays, 2 * math.pi * (k + 0.45) / rays
        r = 2 * max(w, h)
        draw.polygon(
            [(fx, fy), (fx + r * math.cos(a0), fy + r * math.sin(a0)), (fx + r * math.cos(a1), fy + r * math.sin(a1))],
            fill=light_ray,
        )
    panel = (0, 0, w, h)
    characters = []
    side = 1 if rng.random() < 0.5 else -1
    second = cast[1 + int(rng.integers(len(cast) - 1))]
    for ch, cx, height, foot in (
        (second, w * (0.5 + side * 0.3), h * 0.6, h * 0.97),
        (cast[0], w * (0.5 - side * 0.08), h * 0.8, h * 1.02),
    ):
        extent = draw_character(draw, ch, cx, foot, height, -side)
        box = _clip(extent, panel)
        if box is not None:
            characters.append((ch.name, box))
    lw = max(2, round(w / 130))
    banner = (w * 0.06, h * 0.035, w * 0.94, h * 0.16)
    draw.rectangle(banner, fill=cast[0].accent, outline=INK, width=lw)
    glyphs = int(rng.integers(4, 7))
    gw = (banner[2] - banner[0]) / glyphs
    stroke = max(3, round(w / 60))
    for g in range(glyphs):
        gx0, gy0 = banner[0] + g * gw + gw * 0.2, banner[1] + (banner[3] - banner[1]) * 0.22
        gx1, gy1 = gx0 + gw * 0.6, banner[3] - (banner[3] - banner[1]) * 0.22
        gym = (gy0 + gy1) / 2
        segments = [
            ((gx0, gy0), (gx1, gy0)),
            ((gx0, gym), (gx1, gym)),
            ((gx0, gy1), (gx1, gy1)),
            ((gx0, gy0), (gx0, gym)),
            ((gx1, gy0), (gx1, gym)),
            ((gx0, gym), (gx0, gy1)),
            ((gx1, gym), (gx1, gy1)),
            (((gx0 + gx1) / 2, gy0), ((gx0 + gx1) / 2, gy1)),
        ]
        strokes = [segments[int(i)] for i in sorted(rng.choice(len(segments), int(rng.integers(3, 6)), False))]
        for stroke_line in strokes:
            draw.line(stroke_line, fill=INK, width=stroke + 2 * max(1, lw // 2))
        for stroke_line in strokes:
            draw.line(stroke_line, fill=WHITE, width=stroke)
    tag = (w * 0.06, h * 0.9, w * 0.3, h * 0.96)
    draw.rectangle(tag, fill=WHITE, outline=INK, width=max(1, lw // 2))
    for k in range(3):
        x = tag[0] + (tag[2] - tag[0]) * (0.2 + 0.25 * k)
        draw.line((x, tag[1] + 4, x + (tag[2] - tag[0]) * 0.15, tag[1] + 4), fill=INK, width=max(1, lw // 2))
    return Rendered(page, characters, [panel])
