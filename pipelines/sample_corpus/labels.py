"""The corpus's ground truth: the label vocabulary, the public records, and the files written beside the root.

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

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipelines.core.storage import read_jsonl

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]

COLOR_STYLES = ("colour", "colour_light", "colour_muted", "cover")
BW_STYLES = ("grey", "screentone", "sepia", "chroma_noise")
BROKEN_KINDS = ("truncated", "empty", "not_image", "decompression_bomb")
LABEL_FIELDS = (
    "source", "series", "chapter", "chapter_source", "kind", "page_index", "is_color", "style", "broken", "format",
    "mode", "exif_orientation", "width", "height", "characters", "panels", "duplicate_of",
)  # fmt: skip


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
