"""Deterministic synthetic manga corpus: the shared fixture of ingestion, colour classification and retrieval.

Every later stage is tested against this corpus, so its layout and labels are a contract. The seed fixes every
random choice and the same seed gives byte-identical files (with the same Pillow/libjpeg/libwebp/zlib/numpy).
The preset fixes the *structure* (series, chapters, page counts, formats, where the odd files sit); the seed
fixes the *content* (cast colours and shapes, panel layouts, placements).

Layout under ``root`` (what a user's dump looks like)::

    <series>/<chapter>/<page files>      chapter as a folder (``kind`` "folder")
    <series>/<chapter>.cbz               chapter as a zip (``kind`` "archive"), pages flat or in a subfolder

Chapters hold full-colour pages (styles ``colour``, ``colour_light``: mostly white with small colour areas,
``colour_muted``: low saturation) or black-and-white pages (``grey``, ``screentone``, ``sepia``: uniform warm tint
plus paper noise, ``chroma_noise``: grey page as an RGB 4:2:0 JPEG with colour fringes), some B&W chapters with a
colour ``cover`` as page 0. Stored oddities: unpadded names (``1.jpg, 2.jpg, 10.jpg``), JPEG/PNG/WebP, upper-case
extensions, EXIF-rotated JPEGs (Orientation 6 or 8; applying it yields the upright page), P, RGBA (transparent
margins over white), LA, CMYK, 16-bit (I;16) and bilevel (1) pages, double-page spreads, near-duplicate pages, and
broken files: a truncated JPEG, an empty file, a text file named ``.jpg`` and a decompression bomb (a small PNG
declaring `BOMB_SIZE`).

Ground truth is written BESIDE the root, never inside it (ingestion must see only what a dump holds):

- labels, default ``<root.parent>/<root.name>_labels.jsonl``: one JSON object per page file (images and broken
  files; junk is NOT labelled), ordered by chapter then ``page_index``, with keys (`LABEL_FIELDS`, in order):
  ``source`` (relative to the root with ``/``; archive members as ``<archive>/<member>``, e.g.
  ``s1/ch002.cbz/pages/007.jpg``), ``series``, ``chapter`` (folder name or archive stem), ``chapter_source``
  (the folder or archive, relative to the root), ``kind`` ("folder" | "archive"), ``page_index`` (0-based rank
  in natural order, `natural_key` of the member path, among the chapter's labelled files), ``is_color``
  (bool; null for broken files), ``style``, ``broken`` (null or "truncated" | "empty" | "not_image" |
  "decompression_bomb"), ``format`` ("JPEG" | "PNG" | "WEBP", null if not an image), ``mode`` (PIL mode as
  stored), ``exif_orientation`` (int or null), ``width``/``height`` (the upright page; null if broken),
  ``characters`` (list of ``{"name", "box"}``), ``panels`` (list of boxes), ``duplicate_of`` (``source`` of the
  page this one near-duplicates, or null). Broken files have style ``broken_<reason>``.
  Boxes are ``[x0, y0, x1, y1]`` integer pixels of the upright page, ``x1``/``y1`` exclusive; a character's box
  is its drawn extent clipped to its panel.
- summary, ``<labels without .jsonl>.summary.json``: `CorpusInfo` (chapters, cast, counts by style).

Junk entries (``__MACOSX/._*``, ``Thumbs.db``, ``.DS_Store``, ``ComicInfo.xml``) are listed per chapter in the
summary's ``junk`` and never in the labels. The labels file is written last: its presence marks a complete corpus.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import math
import os
import shutil
import struct
import sys
import zipfile
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageDraw

from pipelines.core.sources import natural_key
from pipelines.core.storage import atomic_write_bytes, read_jsonl

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]

PRESETS = ("tiny", "small", "demo")
BOMB_SIZE = (30000, 30000)
COLOR_STYLES = ("colour", "colour_light", "colour_muted", "cover")
BW_STYLES = ("grey", "screentone", "sepia", "chroma_noise")
BROKEN_KINDS = ("truncated", "empty", "not_image", "decompression_bomb")

_BASE_SIZE = {"tiny": (256, 384), "small": (384, 544), "demo": (512, 720)}
_INK: RGB = (0, 0, 0)
_WHITE: RGB = (255, 255, 255)
_NAMES = ("aiko", "ren", "mika", "sora", "kenji", "yui", "haru", "nao", "rin", "taro", "emi", "kai", "saki", "jun")
_HAIR_STYLES = ("spiky", "long", "bob", "ponytail", "twin_tails", "short")
_CLOTHES_STYLES = ("shirt", "dress", "coat", "hoodie")
_SKINS: tuple[RGB, ...] = ((255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 140, 100))
_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)
# File extension forced by a page's storage oddity or broken kind (otherwise the chapter's default extension).
_VARIANT_EXT = {
    **dict.fromkeys(("exif6", "exif8", "cmyk", "truncated", "not_image"), "jpg"),
    **dict.fromkeys(("palette", "rgba", "la", "i16", "bilevel", "decompression_bomb"), "png"),
    "webp": "webp",
    "upper_png": "PNG",
}
LABEL_FIELDS = (
    "source", "series", "chapter", "chapter_source", "kind", "page_index", "is_color", "style", "broken", "format",
    "mode", "exif_orientation", "width", "height", "characters", "panels", "duplicate_of",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Public records


@dataclass(frozen=True)
class Character:
    """A recurring cast member: colours identify it in colour pages, hair/clothes shapes also in B&W pages."""

    name: str
    series: str
    hair: RGB
    hair_style: str
    clothes: RGB
    clothes_style: str
    accent: RGB
    skin: RGB
    eyes: RGB
    build: float


@dataclass
class ChapterSummary:
    series: str
    chapter: str
    source: str  # folder or archive relative to the root
    kind: str  # "folder" | "archive"
    content: str  # "colour" (>= 24 colour pages) | "colour_short" | "bw"
    bw_style: str | None
    n_files: int  # labelled files, broken included
    n_color: int  # decodable colour pages (covers included)
    n_bw: int
    n_broken: int
    has_cover: bool
    junk: list[str]


@dataclass
class CorpusInfo:
    root: Path
    labels_path: Path
    summary_path: Path
    preset: str
    seed: int
    page_size: tuple[int, int]
    n_files: int
    counts_by_style: dict[str, int]
    chapters: list[ChapterSummary]
    cast: list[Character]

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        """JSON-ready dict; paths relative to `relative_to` when given (a moved corpus keeps identical bytes)."""
        out = asdict(self)
        for key in ("root", "labels_path", "summary_path"):
            out[key] = os.path.relpath(out[key], relative_to) if relative_to is not None else str(out[key])
        return out

    def chapter_sources(self, *, min_color_pages: int) -> list[str]:
        """Chapters (relative sources) with at least `min_color_pages` decodable colour pages."""
        return [c.source for c in self.chapters if c.n_color >= min_color_pages]


def default_labels_path(root: Path) -> Path:
    return root.parent / f"{root.name}_labels.jsonl"


def summary_path_for(labels: Path) -> Path:
    return labels.with_name(labels.name.removesuffix(".jsonl") + ".summary.json")


def read_labels(labels: Path) -> list[dict[str, Any]]:
    return read_jsonl(labels)


# ----------------------------------------------------------------------------------------------------------------
# Structure: presets as explicit chapter plans


@dataclass(frozen=True)
class _PageSpec:
    style: str  # label style; broken files use "broken_<reason>"
    variant: str = ""  # storage oddity (a key of _VARIANT_EXT, or "rgb", "spread", "dup")
    dup_of: tuple[int, int, int] | None = None  # (series index, chapter index, page position) it re-renders


@dataclass(frozen=True)
class _ChapterPlan:
    series_index: int
    chapter_index: int
    series: str
    name: str
    kind: str  # folder | archive
    content: str  # colour | colour_short | bw
    bw_style: str | None
    pages: tuple[_PageSpec, ...]
    ext: str  # default extension as written, e.g. "jpg", "JPG", "png", "webp"
    naming: str  # padded | unpadded | prefixed
    subfolder: str = ""
    junk: tuple[str, ...] = ()
    deflate: bool = False

    @property
    def cover(self) -> bool:
        return bool(self.pages) and self.pages[0].style == "cover"


_STYLE_CYCLE = ("colour", "colour", "colour_light", "colour", "colour_muted", "colour")


def _color_pages(
    n: int, specials: dict[int, str], broken: dict[int, str], dups: dict[int, tuple[int, int, int]] | None = None
) -> tuple[_PageSpec, ...]:
    """`n` decodable colour pages (fixed style cycle), then broken files inserted at their final positions."""
    dups = dups or {}
    pages = []
    for i in range(n):
        style = _STYLE_CYCLE[i % len(_STYLE_CYCLE)]
        if i in dups:
            pages.append(_PageSpec(style="colour", variant="dup", dup_of=dups[i]))
        else:
            variant = specials.get(i, "")
            pages.append(_PageSpec("colour" if variant in ("spread", "exif6", "exif8") else style, variant))
    for position in sorted(broken):
        pages.insert(position, _PageSpec(f"broken_{broken[position]}"))
    return tuple(pages)


def _bw_pages(
    style: str, n: int, cover: bool, specials: dict[int, str], broken: dict[int, str]
) -> tuple[_PageSpec, ...]:
    pages = [_PageSpec("cover") if cover and i == 0 else _PageSpec(style, specials.get(i, "")) for i in range(n)]
    for position in sorted(broken):
        pages.insert(position, _PageSpec(f"broken_{broken[position]}"))
    return tuple(pages)


_ALL_JUNK = ("macosx", "thumbs", "ds_store", "comicinfo")


def _plans(preset: str) -> tuple[list[_ChapterPlan], dict[str, int]]:
    """Chapter plans and cast sizes of a preset. Positions are fixed so tests can rely on them."""
    plans: list[_ChapterPlan] = []
    cast_sizes: dict[str, int] = {}

    def add(series: str, name: str, kind: str, content: str, pages, ext: str, naming: str, **kw) -> None:
        series_index = int(series[1:]) - 1
        chapter_index = sum(p.series == series for p in plans)
        bw_style = next((p.style for p in pages if p.style in BW_STYLES), None) if content == "bw" else None
        plans.append(
            _ChapterPlan(series_index, chapter_index, series, name, kind, content, bw_style, pages, ext, naming, **kw)
        )

    # fmt: off
    if preset == "tiny":
        cast_sizes.update(s1=3, s2=3)
        add("s1", "ch001", "folder", "colour",
            _color_pages(24, {3: "exif6", 6: "palette", 9: "rgba", 12: "cmyk", 15: "webp", 18: "upper_png"},
                          {5: "truncated", 20: "empty"}),
            "jpg", "unpadded", junk=("thumbs",))
        add("s1", "ch002", "archive", "colour_short", _color_pages(8, {}, {4: "not_image"}), "png", "padded",
            subfolder="pages", junk=_ALL_JUNK)
        add("s1", "ch003", "folder", "bw", _bw_pages("grey", 6, True, {2: "la", 3: "i16", 4: "rgb"}, {}), "png",
            "padded", junk=("ds_store",))
        add("s2", "ch001", "archive", "colour", _color_pages(24, {7: "exif8"}, {10: "decompression_bomb"}), "JPG",
            "padded", junk=("macosx", "thumbs", "ds_store"), deflate=True)
        add("s2", "ch002", "folder", "bw", _bw_pages("screentone", 5, False, {2: "bilevel"}, {}), "png", "unpadded")
        add("s2", "ch003", "archive", "bw", _bw_pages("sepia", 6, True, {}, {}), "jpg", "padded", junk=("macosx",))
        add("s2", "ch004", "folder", "bw", _bw_pages("chroma_noise", 5, False, {}, {}), "jpg", "padded")
    elif preset == "small":
        cast_sizes.update(s1=4, s2=3, s3=4)
        add("s1", "ch001", "folder", "colour",
            _color_pages(26, {3: "exif6", 6: "palette", 11: "cmyk", 14: "spread", 19: "upper_png"},
                          {5: "truncated", 22: "empty"}, {17: (0, 0, 8)}),
            "jpg", "unpadded", junk=("thumbs",))
        add("s1", "ch002", "archive", "colour", _color_pages(24, {2: "rgba", 9: "webp"}, {12: "decompression_bomb"}),
            "png", "padded", subfolder="ch002", junk=_ALL_JUNK)
        add("s1", "ch003", "folder", "bw", _bw_pages("grey", 10, True, {2: "la", 4: "i16", 6: "rgb"}, {}), "png",
            "padded", junk=("ds_store",))
        add("s1", "ch004", "archive", "bw", _bw_pages("screentone", 10, False, {3: "bilevel"}, {}), "png", "padded",
            junk=("macosx", "thumbs"))
        add("s2", "ch001", "archive", "colour", _color_pages(25, {7: "exif8"}, {15: "not_image"}), "JPG", "padded",
            subfolder="pages", junk=("macosx", "ds_store"), deflate=True)
        add("s2", "ch002", "folder", "colour_short", _color_pages(12, {}, {}), "webp", "padded")
        add("s2", "ch003", "folder", "bw", _bw_pages("sepia", 10, True, {}, {}), "jpg", "unpadded")
        add("s2", "ch004", "archive", "bw", _bw_pages("chroma_noise", 10, False, {}, {}), "jpg", "padded",
            junk=("thumbs",))
        add("s3", "ch001", "folder", "colour", _color_pages(24, {}, {}, {20: (0, 0, 10)}), "webp", "prefixed")
        add("s3", "ch002", "archive", "bw", _bw_pages("grey", 10, False, {5: "rgb"}, {6: "truncated"}), "jpg",
            "padded", junk=("comicinfo",))
        add("s3", "ch003", "folder", "bw", _bw_pages("screentone", 10, True, {}, {}), "jpg", "padded")
        add("s3", "ch004", "folder", "bw", _bw_pages("chroma_noise", 8, True, {}, {}), "jpg", "unpadded")
        add("s3", "ch005", "archive", "bw", _bw_pages("sepia", 8, False, {}, {}), "jpg", "padded")
    elif preset == "demo":
        for s in range(4):
            series = f"s{s + 1}"
            cast_sizes[series] = 4 if s % 2 == 0 else 3
            add(series, "ch001", "folder", "colour",
                _color_pages(28, {3: "exif6", 8: "palette", 13: "cmyk", 16: "spread"}, {5 + s: "truncated"},
                              {21: (s, 0, 9)}),
                "jpg", "unpadded", junk=("thumbs",))
            add(series, "ch002", "archive", "colour",
                _color_pages(24 + 2 * s, {2: "rgba", 9: "webp", 11: "exif8"}, {12: BROKEN_KINDS[s]}),
                ("png", "JPG", "webp", "jpg")[s], "padded", subfolder="pages" if s % 2 else "", junk=_ALL_JUNK,
                deflate=s % 2 == 1)
            add(series, "ch003", "folder", "colour_short", _color_pages(10 + s, {}, {}), "jpg", "padded")
            for k in range(3):
                style = BW_STYLES[(s + k) % len(BW_STYLES)]
                ext = "png" if style in ("grey", "screentone") and k != 1 else "jpg"
                specials = {"grey": {2: "la", 4: "i16", 6: "rgb"}, "screentone": {3: "bilevel"}}.get(style, {})
                add(series, f"ch{k + 4:03d}", "archive" if k == 1 else "folder", "bw",
                    _bw_pages(style, 12, k != 1, specials, {}), ext, ("padded", "unpadded", "prefixed")[k],
                    junk=("macosx", "ds_store") if k == 1 else ())
        cross = plans[0]  # a reposted page: s4's first colour chapter re-uses a page of s1 ch001
        target = next(i for i, p in enumerate(plans) if p.series == "s4")
        pages = list(plans[target].pages)
        pages.insert(len(pages) - 2, _PageSpec("colour", "dup", (cross.series_index, cross.chapter_index, 1)))
        plans[target] = _replace_pages(plans[target], tuple(pages))
    # fmt: on
    else:
        raise ValueError(f"unknown preset {preset!r}: expected one of {', '.join(PRESETS)}")
    return plans, cast_sizes


def _replace_pages(plan: _ChapterPlan, pages: tuple[_PageSpec, ...]) -> _ChapterPlan:
    return _ChapterPlan(**{**plan.__dict__, "pages": pages})


# ----------------------------------------------------------------------------------------------------------------
# Randomness and colours


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """Independent stream per (seed, keys): a page's content never depends on which other pages exist."""
    return np.random.default_rng([seed, *keys])


def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (round(r * 255), round(g * 255), round(b * 255))


def _luma(c: RGB) -> RGB:
    y = round(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])
    return (y, y, y)


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return (round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t), round(a[2] + (b[2] - a[2]) * t))


def _pick(rng: np.random.Generator, items: Sequence, p: Sequence[float] | None = None):
    return items[int(rng.choice(len(items), p=p))]


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


def _make_cast(seed: int, series_index: int, series: str, n: int) -> list[Character]:
    """Hair hues spread around the wheel and hair values spread in lightness, so the cast differs in grey too."""
    rng = _rng(seed, 1, series_index)
    names = [str(x) for x in rng.permutation(_NAMES)[:n]]
    hair_offset, clothes_offset = rng.uniform(0, 1, 2)
    hair_values = rng.permutation(np.linspace(0.35, 0.95, n))
    clothes_values = rng.permutation(np.linspace(0.45, 0.9, n))
    hair_styles = rng.permutation(_HAIR_STYLES)[:n]
    clothes_styles = [_CLOTHES_STYLES[i % len(_CLOTHES_STYLES)] for i in rng.permutation(n)]
    cast = []
    for i in range(n):
        hair_h = hair_offset + i / n + rng.uniform(-0.03, 0.03)
        clothes_h = clothes_offset + i / n
        if _hue_distance(hair_h, clothes_h) < 0.15:
            clothes_h += 0.5 / n + 0.1
        cast.append(
            Character(
                name=f"{series}_{names[i]}",
                series=series,
                hair=_hsv(hair_h, rng.uniform(0.6, 0.9), hair_values[i]),
                hair_style=str(hair_styles[i]),
                clothes=_hsv(clothes_h, rng.uniform(0.55, 0.85), clothes_values[i]),
                clothes_style=clothes_styles[i],
                accent=_hsv(clothes_h + 0.45, 0.8, 0.9),
                skin=_SKINS[int(rng.integers(len(_SKINS)))],
                eyes=_hsv(rng.uniform(0, 1), 0.8, 0.7),
                build=float(rng.uniform(0.85, 1.15)),
            )
        )
    return cast


# ----------------------------------------------------------------------------------------------------------------
# Drawing: characters


class _Pen:
    """ImageDraw wrapper that tracks the extent of everything drawn (the character's bounding box)."""

    def __init__(self, draw: ImageDraw.ImageDraw, lw: int, grey: bool):
        self.draw, self.lw, self.grey = draw, lw, grey
        self.x0 = self.y0 = math.inf
        self.x1 = self.y1 = -math.inf

    def _fill(self, color: RGB) -> RGB:
        return _luma(color) if self.grey else color

    def _track(self, xs: Sequence[float], ys: Sequence[float]) -> None:
        self.x0, self.x1 = min(self.x0, *xs), max(self.x1, *xs)
        self.y0, self.y1 = min(self.y0, *ys), max(self.y1, *ys)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, color: RGB, outline: bool = True) -> None:
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        self.draw.ellipse(box, fill=self._fill(color), outline=_INK if outline else None, width=self.lw)
        self._track((box[0], box[2]), (box[1], box[3]))

    def polygon(self, points: Sequence[tuple[float, float]], color: RGB) -> None:
        self.draw.polygon(points, fill=self._fill(color), outline=_INK, width=self.lw)
        self._track([p[0] for p in points], [p[1] for p in points])

    def pieslice(self, cx: float, cy: float, rx: float, ry: float, start: float, end: float, color: RGB) -> None:
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        self.draw.pieslice(box, start, end, fill=self._fill(color), outline=_INK, width=self.lw)
        self._track((box[0], box[2]), (box[1], cy))

    def line(self, points: Sequence[tuple[float, float]], width: int) -> None:
        self.draw.line(points, fill=_INK, width=width)
        self._track([p[0] for p in points], [p[1] for p in points])

    def trapezoid(self, cx: float, y0: float, half0: float, y1: float, half1: float, color: RGB) -> None:
        """Symmetric about x = cx: half-width `half0` at y0, `half1` at y1 (0 gives a triangle)."""
        self.polygon([(cx - half0, y0), (cx + half0, y0), (cx + half1, y1), (cx - half1, y1)], color)


def _draw_character(
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
    trousers = _mix(ch.clothes, (40, 40, 60), 0.6)

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
            pen.ellipse(ex, ey, 3 * u, 3.6 * u, _WHITE)
            pen.ellipse(ex, ey + 0.4 * u, 2 * u, 2.8 * u, ch.eyes, outline=False)
            pen.ellipse(ex, ey + 0.6 * u, 0.9 * u, 1.3 * u, _INK, outline=False)
        else:  # too small for irises: dots
            pen.ellipse(ex, ey, max(0.6, 1.2 * u), max(0.8, 1.8 * u), _INK, outline=False)
    pen.line([(hx - 2 * u + shift, hy + 10.5 * u), (hx + 2 * u + shift, hy + 10.5 * u)], max(1, round(u / 2)))
    pad = body_lw / 2 + 1
    return pen.x0 - pad, pen.y0 - pad, pen.x1 + pad, pen.y1 + pad


# ----------------------------------------------------------------------------------------------------------------
# Drawing: backgrounds, bubbles, panels, pages


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
    kind = _pick(rng, kinds, weights)
    hue = rng.uniform(0, 1)
    if light:
        img = Image.new("RGB", (w, h), _WHITE)
    elif kind in ("sky", "buildings"):
        img = _gradient(w, h, _hsv(0.58 + rng.uniform(-0.04, 0.04), 0.6, 0.85), _hsv(0.56, 0.15, 1.0))
    elif kind == "gradient":
        img = _gradient(w, h, _hsv(hue, 0.55, 0.95), _hsv(hue + rng.uniform(0.15, 0.4), 0.45, 0.9))
    elif kind == "interior":
        img = Image.new("RGB", (w, h), _hsv(hue, 0.25, 0.95))
    else:
        img = Image.new("RGB", (w, h), _hsv(hue, rng.uniform(0.25, 0.4), 1.0))  # full colour: tinted, never white
    draw = ImageDraw.Draw(img)
    if kind == "sky":
        for _ in range(int(rng.integers(1, 4))):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h * 0.5), rng.uniform(0.06, 0.14) * w
            for dx in (-1.0, 0.0, 1.0):
                draw.ellipse(
                    (cx + dx * r - r, cy - r * (0.6 - 0.2 * abs(dx)), cx + dx * r + r, cy + r * 0.6), fill=_WHITE
                )
    elif kind == "buildings":
        x = -rng.uniform(0, 0.1) * w
        while x < w:
            bw, bh = rng.uniform(0.14, 0.32) * w, rng.uniform(0.3, 0.8) * h
            fill = _WHITE if light else _hsv(rng.uniform(0, 1), rng.uniform(0.1, 0.35), rng.uniform(0.55, 0.85))
            draw.rectangle((x, h - bh, x + bw, h + lw), fill=fill, outline=_INK, width=lw)
            win = max(3.0, bw / 7)
            window = _WHITE if light else _hsv(0.14, 0.5, 1.0)
            for wy in np.arange(h - bh + win, h - win, 2 * win):
                for wx in np.arange(x + win, x + bw - win, 2 * win):
                    draw.rectangle(
                        (wx, wy, wx + win * 0.9, wy + win * 0.9), fill=window, outline=_INK, width=max(1, lw // 2)
                    )
            x += bw
    elif kind == "interior":
        floor_y = h * rng.uniform(0.6, 0.75)
        if not light:
            draw.rectangle((0, floor_y, w, h), fill=_hsv(hue + 0.08, 0.35, 0.7))
        vx = w * rng.uniform(0.3, 0.7)
        draw.line((0, floor_y, w, floor_y), fill=_INK, width=lw)
        for k in range(-3, 4):
            draw.line((vx + k * w * 0.08, floor_y, vx + k * w * 0.5, h), fill=_INK, width=max(1, lw // 2))
        wx0, wy0 = w * rng.uniform(0.05, 0.6), h * rng.uniform(0.08, 0.25)
        draw.rectangle(
            (wx0, wy0, wx0 + w * 0.3, wy0 + h * 0.28),
            fill=_WHITE if light else _hsv(0.57, 0.3, 1.0),
            outline=_INK,
            width=lw,
        )
    elif kind == "speedlines":
        fx, fy = w * rng.uniform(0.3, 0.7), h * rng.uniform(0.3, 0.7)
        inner, outer = 0.35 * min(w, h), max(w, h)
        for angle in rng.uniform(0, 2 * math.pi, int(rng.integers(40, 90))):
            dx, dy = math.cos(angle), math.sin(angle)
            draw.line((fx + inner * dx, fy + inner * dy, fx + outer * dx, fy + outer * dy), fill=_INK, width=1)
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
        draw.polygon([base[0], tip, base[1]], fill=_WHITE, outline=_INK, width=lw)
    draw.ellipse(box, fill=_WHITE, outline=_INK, width=lw)
    if tail_to is not None:
        inner_tip = (tip[0] * 0.85 + cx * 0.15, tip[1] * 0.85 + cy * 0.15)
        draw.polygon([base[0], inner_tip, base[1]], fill=_WHITE)
    columns = max(1, int(rx * 1.2 / max(4.0, rx * 0.25)))
    step = rx * 1.2 / columns
    stroke = max(1, lw - 1)
    for k in range(columns):
        x = cx + rx * 0.6 - step * (k + 0.5)
        y = cy - ry * 0.55
        y_end = cy + ry * rng.uniform(0.2, 0.55)
        while y < y_end:
            seg = ry * rng.uniform(0.12, 0.3)
            draw.line((x, y, x, min(y + seg, y_end)), fill=_INK, width=stroke)
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
    n_outer = _pick(rng, (2, 3, 3, 4) if h >= 480 else (2, 3, 3)) if rows_first else _pick(rng, (2, 2, 3))
    boxes = []
    if rows_first:
        for y0, y1 in split(area[1], area[3], n_outer):
            for x0, x1 in split(area[0], area[2], _pick(rng, (1, 2, 2, 3) if not wide else (2, 3, 4))):
                boxes.append((x0, y0, x1, y1))
    else:
        for x0, x1 in split(area[0], area[2], n_outer):
            for y0, y1 in split(area[1], area[3], _pick(rng, (1, 2, 2, 3))):
                boxes.append((x0, y0, x1, y1))
    return boxes


@dataclass
class _Rendered:
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
        shot = _pick(rng, ("full", "bust", "far"), (0.45, 0.35, 0.2))
    else:
        shot = _pick(rng, ("full", "far"))
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
        extent = _draw_character(draw, ch, cx, foot, height, facing, grey=grey_chars)
        box = _clip(extent, panel)
        if box is not None:
            head = (extent[0], extent[1], extent[2], extent[1] + 0.3 * (foot - extent[1]))
            placed.append((ch.name, box, head))
    bubbles: list[tuple[float, float, float, float]] = []
    bodies = [(b[0] - x0, b[1] - y0, b[2] - x0, b[3] - y0) for _, b, _ in placed]
    for _ in range(_pick(rng, (0, 1, 1, 2))):
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


def _render_page(
    rng: np.random.Generator, cast: list[Character], weights: np.ndarray, size: tuple[int, int], light: bool
) -> _Rendered:
    """A page of bordered panels; `light` pages are white line art with colour on one panel's characters only."""
    w, h = size
    panels = _panel_layout(rng, w, h, allow_splash=not light)
    counts = []
    for x0, y0, x1, y1 in panels:
        most = max(1, min(3, int((x1 - x0) / max(1, (y1 - y0)) * 2.2)))
        counts.append(min(most, _pick(rng, (0, 1, 1, 1, 2, 2, 3))))
    if sum(counts) == 0:
        counts[max(range(len(panels)), key=lambda i: (panels[i][2] - panels[i][0]) * (panels[i][3] - panels[i][1]))] = 1
    with_chars = [i for i, c in enumerate(counts) if c > 0]
    colored = set(with_chars)
    if light:
        area = {i: (panels[i][2] - panels[i][0]) * (panels[i][3] - panels[i][1]) for i in with_chars}
        candidates = sorted(with_chars, key=area.get)[: max(1, len(with_chars) - 1)]  # never the largest panel
        colored = {int(rng.choice(candidates))}
    page = Image.new("RGB", size, _WHITE)
    draw = ImageDraw.Draw(page)
    rendered = _Rendered(page, panels=panels)
    lw = max(2, round(w / 170))
    for i, panel in enumerate(panels):
        img, chars = _render_panel(rng, cast, weights, panel, counts[i], light, i not in colored, w)
        page.paste(img, panel[:2])
        draw.rectangle((panel[0], panel[1], panel[2] - 1, panel[3] - 1), outline=_INK, width=lw)
        rendered.characters.extend(chars)
    return rendered


def _render_cover(rng: np.random.Generator, cast: list[Character], size: tuple[int, int]) -> _Rendered:
    """Full-bleed colour cover: burst background, the lead and a second character, a title banner."""
    w, h = size
    hue = rng.uniform(0, 1)
    page = _gradient(w, h, _hsv(hue, 0.7, 0.95), _hsv(hue + 0.25, 0.6, 0.8))
    draw = ImageDraw.Draw(page)
    fx, fy = w * 0.5, h * 0.45
    light_ray = _hsv(hue, 0.35, 1.0)
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
        extent = _draw_character(draw, ch, cx, foot, height, -side)
        box = _clip(extent, panel)
        if box is not None:
            characters.append((ch.name, box))
    lw = max(2, round(w / 130))
    banner = (w * 0.06, h * 0.035, w * 0.94, h * 0.16)
    draw.rectangle(banner, fill=cast[0].accent, outline=_INK, width=lw)
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
            draw.line(stroke_line, fill=_INK, width=stroke + 2 * max(1, lw // 2))
        for stroke_line in strokes:
            draw.line(stroke_line, fill=_WHITE, width=stroke)
    tag = (w * 0.06, h * 0.9, w * 0.3, h * 0.96)
    draw.rectangle(tag, fill=_WHITE, outline=_INK, width=max(1, lw // 2))
    for k in range(3):
        x = tag[0] + (tag[2] - tag[0]) * (0.2 + 0.25 * k)
        draw.line((x, tag[1] + 4, x + (tag[2] - tag[0]) * 0.15, tag[1] + 4), fill=_INK, width=max(1, lw // 2))
    return _Rendered(page, characters, [panel])


# ----------------------------------------------------------------------------------------------------------------
# Styles: colour variants and B&W conversions


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
    angle = math.radians(_pick(rng, (45.0, 30.0, 15.0)))
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


def _render_styled(
    rng: np.random.Generator, style: str, cast: list[Character], weights: np.ndarray, size: tuple[int, int]
) -> _Rendered:
    """Draw a page and apply its style; returns RGB for colour, sepia and chroma_noise, L for grey/screentone."""
    if style == "cover":
        return _render_cover(rng, cast, size)
    rendered = _render_page(rng, cast, weights, size, light=style == "colour_light")
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


# ----------------------------------------------------------------------------------------------------------------
# Encoding, broken files, junk


def _near_duplicate(img: Image.Image) -> Image.Image:
    """A re-release of the same page: lower contrast, brighter, different bytes; geometry (boxes) unchanged."""
    rgb = np.asarray(img.convert("RGB"), np.float32)
    return Image.fromarray(np.clip(rgb * 0.94 + 14, 0, 255).round().astype(np.uint8), "RGB")


def _save(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def _encode_default(img: Image.Image, fmt: str, style: str) -> bytes:
    if fmt == "JPEG":
        if style == "chroma_noise":
            return _save(img, "JPEG", quality=75, subsampling=2)
        return _save(img, "JPEG", quality=88 if style in ("sepia", "grey", "screentone") else 90)
    if fmt == "WEBP":
        return _save(img, "WEBP", quality=85, method=4)
    return _save(img, "PNG", compress_level=6)


def decompression_bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of `width` x `height` zeros: tiny on disk, huge once decoded."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    rows_per_block = 1024
    compressor = zlib.compressobj(9)
    parts = []
    for start in range(0, height, rows_per_block):
        parts.append(compressor.compress(row * min(rows_per_block, height - start)))
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def _junk_entries(kind: str, first_page: str) -> tuple[str, bytes]:
    if kind == "macosx":
        folder, _, name = first_page.rpartition("/")
        prefix = f"__MACOSX/{folder}/" if folder else "__MACOSX/"
        return prefix + "._" + name, b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(58)
    if kind == "thumbs":
        return "Thumbs.db", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504)
    if kind == "ds_store":
        return ".DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(56)
    return "ComicInfo.xml", b'<?xml version="1.0"?>\n<ComicInfo><Series>sample</Series></ComicInfo>\n'


# ----------------------------------------------------------------------------------------------------------------
# Chapters


@dataclass
class _PageFile:
    member: str  # path inside the chapter folder / archive
    data: bytes
    label: dict[str, Any]


class _Builder:
    """Renders the pages of a preset; holds the cast and page size shared by every chapter."""

    def __init__(self, seed: int, preset: str, size: tuple[int, int]):
        self.seed, self.size = seed, size
        self.plans, cast_sizes = _plans(preset)
        self.casts = {
            series: _make_cast(seed, int(series[1:]) - 1, series, n) for series, n in sorted(cast_sizes.items())
        }
        self.by_key = {(p.series_index, p.chapter_index): p for p in self.plans}

    def _weights(self, series: str) -> np.ndarray:
        raw = np.array([0.4, 0.27, 0.2, 0.13][: len(self.casts[series])])
        return raw / raw.sum()

    def render(self, plan: _ChapterPlan, position: int) -> _Rendered:
        spec = plan.pages[position]
        if spec.variant == "dup":
            s, c, p = spec.dup_of
            return self.render(self.by_key[(s, c)], p)
        rng = _rng(self.seed, 2, plan.series_index, plan.chapter_index, position)
        size = (self.size[0] * 2, self.size[1]) if spec.variant == "spread" else self.size
        style = spec.style if not spec.style.startswith("broken_") else (plan.bw_style or "colour")
        return _render_styled(rng, style, self.casts[plan.series], self._weights(plan.series), size)

    def file_name(self, plan: _ChapterPlan, position: int) -> str:
        spec = plan.pages[position]
        number = position if plan.cover else position + 1
        stem = {"padded": f"{number:03d}", "unpadded": str(number), "prefixed": f"p{number}"}[plan.naming]
        oddity = spec.style.removeprefix("broken_") if spec.style.startswith("broken_") else spec.variant
        ext = _VARIANT_EXT.get(oddity, plan.ext)
        ext = ext.upper() if plan.ext.isupper() else ext
        name = f"{stem}.{ext}"
        return f"{plan.subfolder}/{name}" if plan.subfolder else name

    def page_file(self, plan: _ChapterPlan, position: int, chapter_source: str) -> _PageFile:
        spec = plan.pages[position]
        member = self.file_name(plan, position)
        fmt = _FORMATS[member.rsplit(".", 1)[1].lower()]
        label: dict[str, Any] = dict.fromkeys(LABEL_FIELDS)
        label.update(
            source=f"{chapter_source}/{member}",
            series=plan.series,
            chapter=plan.name,
            chapter_source=chapter_source,
            kind=plan.kind,
            style=spec.style,
            format=fmt,
            characters=[],
            panels=[],
        )
        if spec.style.startswith("broken_"):
            reason = spec.style.removeprefix("broken_")
            label["broken"] = reason
            if reason == "empty":
                label["format"] = None
                return _PageFile(member, b"", label)
            if reason == "not_image":
                label["format"] = None
                return _PageFile(member, b"<html><body>404 Not Found: this is not an image</body></html>\n", label)
            if reason == "decompression_bomb":
                label["mode"] = "1"
                return _PageFile(member, decompression_bomb_png(*BOMB_SIZE), label)
            full = _encode_default(self.render(plan, position).image, "JPEG", plan.bw_style or "colour")
            label["mode"] = "RGB" if plan.bw_style in (None, "sepia", "chroma_noise") else "L"
            return _PageFile(member, full[: len(full) * 2 // 5], label)

        rendered = self.render(plan, position)
        img = rendered.image
        data, mode, orientation = self._encode(img, fmt, spec, rendered.panels)
        if spec.variant == "dup":
            s, c, p = spec.dup_of
            original = self.by_key[(s, c)]
            label["duplicate_of"] = f"{self._chapter_source(original)}/{self.file_name(original, p)}"
            label["style"] = original.pages[p].style
        label.update(
            is_color=label["style"] in COLOR_STYLES,
            mode=mode,
            exif_orientation=orientation,
            width=img.width,
            height=img.height,
            characters=[{"name": name, "box": list(box)} for name, box in rendered.characters],
            panels=[list(p) for p in rendered.panels],
        )
        return _PageFile(member, data, label)

    def _encode(self, img: Image.Image, fmt: str, spec: _PageSpec, panels: list[Box]) -> tuple[bytes, str, int | None]:
        """Encode with the page's storage oddity; returns (bytes, mode as stored, EXIF orientation)."""
        variant = spec.variant
        if variant in ("exif6", "exif8"):
            orientation = 6 if variant == "exif6" else 8
            # Orientation 6 = "rotate 90 CW to display": store the upright page rotated 90 CCW (8: the reverse).
            stored = img.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
            exif = Image.Exif()
            exif[ExifTags.Base.Orientation] = orientation
            return _save(stored, "JPEG", quality=90, exif=exif), stored.mode, orientation
        if variant == "palette":
            return _save(img.quantize(96, dither=Image.Dither.NONE), "PNG"), "P", None
        if variant == "rgba":
            alpha = Image.new("L", img.size, 0)
            xs0, ys0 = min(p[0] for p in panels), min(p[1] for p in panels)
            xs1, ys1 = max(p[2] for p in panels), max(p[3] for p in panels)
            ImageDraw.Draw(alpha).rectangle((xs0, ys0, xs1 - 1, ys1 - 1), fill=255)
            rgba = img.copy()
            rgba.putalpha(alpha)
            return _save(rgba, "PNG"), "RGBA", None
        if variant == "cmyk":
            return _save(img.convert("CMYK"), "JPEG", quality=90), "CMYK", None
        if variant == "la":
            la = Image.merge("LA", (img, Image.new("L", img.size, 255)))
            return _save(la, "PNG"), "LA", None
        if variant == "i16":
            wide = Image.fromarray(np.asarray(img, np.uint16) * 257)
            return _save(wide, "PNG"), wide.mode, None
        if variant == "bilevel":
            return _save(img.convert("1", dither=Image.Dither.NONE), "PNG"), "1", None
        if variant == "rgb":
            img = img.convert("RGB")
        if variant == "dup":
            img = _near_duplicate(img)
        return _encode_default(img, fmt, spec.style), img.mode, None

    def _chapter_source(self, plan: _ChapterPlan) -> str:
        return f"{plan.series}/{plan.name}.cbz" if plan.kind == "archive" else f"{plan.series}/{plan.name}"

    def chapter(self, plan: _ChapterPlan) -> tuple[list[_PageFile], list[tuple[str, bytes]], ChapterSummary]:
        source = self._chapter_source(plan)
        files = [self.page_file(plan, i, source) for i in range(len(plan.pages))]
        for index, pf in enumerate(sorted(files, key=lambda f: natural_key(f.member))):
            pf.label["page_index"] = index
        files.sort(key=lambda f: f.label["page_index"])
        junk = [_junk_entries(kind, files[0].member) for kind in plan.junk]
        labels = [f.label for f in files]
        summary = ChapterSummary(
            series=plan.series,
            chapter=plan.name,
            source=source,
            kind=plan.kind,
            content=plan.content,
            bw_style=plan.bw_style,
            n_files=len(files),
            n_color=sum(lb["is_color"] is True for lb in labels),
            n_bw=sum(lb["is_color"] is False for lb in labels),
            n_broken=sum(lb["broken"] is not None for lb in labels),
            has_cover=plan.cover,
            junk=sorted(name for name, _ in junk),
        )
        return files, junk, summary


def _write_chapter(root: Path, plan: _ChapterPlan, files: list[_PageFile], junk: list[tuple[str, bytes]]) -> None:
    series_dir = root / plan.series
    series_dir.mkdir(parents=True, exist_ok=True)
    entries = sorted([(f.member, f.data) for f in files] + junk)  # plain string order: "10.jpg" before "2.jpg"
    if plan.kind == "folder":
        chapter_dir = series_dir / plan.name
        for member, data in entries:
            path = chapter_dir / member
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return
    method = zipfile.ZIP_DEFLATED if plan.deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(series_dir / f"{plan.name}.cbz", "w") as archive:
        if plan.subfolder:
            folder = zipfile.ZipInfo(plan.subfolder + "/", _ZIP_TIME)
            folder.external_attr = (0o40755 << 16) | 0x10
            archive.writestr(folder, b"")
        for member, data in entries:
            info = zipfile.ZipInfo(member, _ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = method
            archive.writestr(info, data)


# ----------------------------------------------------------------------------------------------------------------
# Entry points


def generate_corpus(
    root: Path,
    *,
    labels: Path | None = None,
    seed: int = 0,
    preset: str = "small",
    scale: float = 1.0,
    overwrite: bool = False,
) -> CorpusInfo:
    """Write the `preset` corpus under `root` and its labels beside it; returns the summary.

    `scale` multiplies the preset's page size (tiny 256x384, small 384x544, demo 512x720). The corpus is built in
    a hidden sibling folder and renamed into place; the labels file is written last (the completion marker).
    An existing `root` is replaced only with `overwrite=True` and only if it has labels beside it (i.e. it is a
    generated corpus), so a user's real data is never deleted.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: expected one of {', '.join(PRESETS)}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    root = Path(root).absolute()
    labels = Path(labels).absolute() if labels is not None else default_labels_path(root)
    if labels == root or root in labels.parents:
        raise ValueError(f"labels {labels} must be outside the corpus root {root}: ingestion would read them")
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"corpus root {root} exists and is not empty (pass overwrite=True to replace it)")
        if not labels.exists():
            raise FileExistsError(f"refusing to replace {root}: no labels file {labels} marks it as a generated corpus")
    base_w, base_h = _BASE_SIZE[preset]
    size = (max(64, 2 * round(base_w * scale / 2)), max(96, 2 * round(base_h * scale / 2)))

    builder = _Builder(seed, preset, size)
    partial = root.parent / f".{root.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    all_labels: list[dict[str, Any]] = []
    summaries = []
    for plan in builder.plans:
        files, junk, summary = builder.chapter(plan)
        _write_chapter(partial, plan, files, junk)
        all_labels.extend(f.label for f in files)
        summaries.append(summary)

    summary_path = summary_path_for(labels)
    info = CorpusInfo(
        root=root,
        labels_path=labels,
        summary_path=summary_path,
        preset=preset,
        seed=seed,
        page_size=size,
        n_files=len(all_labels),
        counts_by_style=dict(sorted(Counter(lb["style"] for lb in all_labels).items())),
        chapters=summaries,
        cast=[ch for series in sorted(builder.casts) for ch in builder.casts[series]],
    )
    labels.unlink(missing_ok=True)
    if root.exists():
        shutil.rmtree(root)
    partial.rename(root)
    atomic_write_bytes(summary_path, (json.dumps(info.to_dict(summary_path.parent), indent=2) + "\n").encode())
    atomic_write_bytes(labels, "".join(json.dumps(lb) + "\n" for lb in all_labels).encode())
    return info


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate the deterministic synthetic manga corpus.")
    parser.add_argument("--out", type=Path, required=True, help="corpus root to create")
    parser.add_argument("--labels", type=Path, default=None, help="labels JSONL (default: beside the root)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the preset's page size")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing generated corpus")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = generate_corpus(
        args.out, labels=args.labels, seed=args.seed, preset=args.preset, scale=args.scale, overwrite=args.overwrite
    )
    brief = {k: v for k, v in info.to_dict().items() if k not in ("chapters", "cast")}
    brief["chapters"] = [
        f"{c.source}: {c.content} {c.n_color} colour / {c.n_bw} bw / {c.n_broken} broken" for c in info.chapters
    ]
    print(json.dumps(brief, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
