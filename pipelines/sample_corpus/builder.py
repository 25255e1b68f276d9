"""The chapters of a preset: each page's file and label, then the chapter written as a folder or an archive."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageDraw

from pipelines.core.sources import natural_key
from pipelines.sample_corpus.cast import make_cast, seeded_rng
from pipelines.sample_corpus.files import (
    BOMB_SIZE,
    decompression_bomb_png,
    encode_default,
    junk_entries,
    near_duplicate,
    save,
)
from pipelines.sample_corpus.labels import COLOR_STYLES, LABEL_FIELDS, Box, ChapterSummary
from pipelines.sample_corpus.pages import Rendered
from pipelines.sample_corpus.plans import ChapterPlan, PageSpec, chapter_plans
from pipelines.sample_corpus.styles import render_styled

_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)
# File extension forced by a page's storage oddity or broken kind (otherwise the chapter's default extension).
_VARIANT_EXT = {
    **dict.fromkeys(("exif6", "exif8", "cmyk", "truncated", "not_image"), "jpg"),
    **dict.fromkeys(("palette", "rgba", "la", "i16", "bilevel", "decompression_bomb"), "png"),
    "webp": "webp",
    "upper_png": "PNG",
}


@dataclass
class _PageFile:
    member: str  # path inside the chapter folder / archive
    data: bytes
    label: dict[str, Any]


class Builder:
    """Renders the pages of a preset; holds the cast and page size shared by every chapter."""

    def __init__(self, seed: int, preset: str, size: tuple[int, int]) -> None:
        self.seed, self.size = seed, size
        self.plans, cast_sizes = chapter_plans(preset)
        self.casts = {
            series: make_cast(seed, int(series[1:]) - 1, series, n) for series, n in sorted(cast_sizes.items())
        }
        self.by_key = {(p.series_index, p.chapter_index): p for p in self.plans}

    def _weights(self, series: str) -> np.ndarray:
        raw = np.array([0.4, 0.27, 0.2, 0.13][: len(self.casts[series])])
        return raw / raw.sum()

    def render(self, plan: ChapterPlan, position: int) -> Rendered:
        spec = plan.pages[position]
        if spec.variant == "dup":
            s, c, p = spec.dup_of
            return self.render(self.by_key[(s, c)], p)
        rng = seeded_rng(self.seed, 2, plan.series_index, plan.chapter_index, position)
        size = (self.size[0] * 2, self.size[1]) if spec.variant == "spread" else self.size
        style = spec.style if not spec.style.startswith("broken_") else (plan.bw_style or "colour")
        return render_styled(rng, style, self.casts[plan.series], self._weights(plan.series), size)

    def file_name(self, plan: ChapterPlan, position: int) -> str:
        spec = plan.pages[position]
        number = position if plan.cover else position + 1
        stem = {"padded": f"{number:03d}", "unpadded": str(number), "prefixed": f"p{number}"}[plan.naming]
        oddity = spec.style.removeprefix("broken_") if spec.style.startswith("broken_") else spec.variant
        ext = _VARIANT_EXT.get(oddity, plan.ext)
        ext = ext.upper() if plan.ext.isupper() else ext
        name = f"{stem}.{ext}"
        return f"{plan.subfolder}/{name}" if plan.subfolder else name

    def page_file(self, plan: ChapterPlan, position: int, chapter_source: str) -> _PageFile:
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
            full = encode_default(self.render(plan, position).image, "JPEG", plan.bw_style or "colour")
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

    def _encode(self, img: Image.Image, fmt: str, spec: PageSpec, panels: list[Box]) -> tuple[bytes, str, int | None]:
        """Encode with the page's storage oddity; returns (bytes, mode as stored, EXIF orientation)."""
        variant = spec.variant
        if variant in ("exif6", "exif8"):
            orientation = 6 if variant == "exif6" else 8
            # Orientation 6 = "rotate 90 CW to display": store the upright page rotated 90 CCW (8: the reverse).
            stored = img.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
            exif = Image.Exif()
            exif[ExifTags.Base.Orientation] = orientation
            return save(stored, "JPEG", quality=90, exif=exif), stored.mode, orientation
        if variant == "palette":
            return save(img.quantize(96, dither=Image.Dither.NONE), "PNG"), "P", None
        if variant == "rgba":
            alpha = Image.new("L", img.size, 0)
            xs0, ys0 = min(p[0] for p in panels), min(p[1] for p in panels)
            xs1, ys1 = max(p[2] for p in panels), max(p[3] for p in panels)
            ImageDraw.Draw(alpha).rectangle((xs0, ys0, xs1 - 1, ys1 - 1), fill=255)
            rgba = img.copy()
            rgba.putalpha(alpha)
            return save(rgba, "PNG"), "RGBA", None
        if variant == "cmyk":
            return save(img.convert("CMYK"), "JPEG", quality=90), "CMYK", None
        if variant == "la":
            la = Image.merge("LA", (img, Image.new("L", img.size, 255)))
            return save(la, "PNG"), "LA", None
        if variant == "i16":
            wide = Image.fromarray(np.asarray(img, np.uint16) * 257)
            return save(wide, "PNG"), wide.mode, None
        if variant == "bilevel":
            return save(img.convert("1", dither=Image.Dither.NONE), "PNG"), "1", None
        if variant == "rgb":
            img = img.convert("RGB")
        if variant == "dup":
            img = near_duplicate(img)
        return encode_default(img, fmt, spec.style), img.mode, None

    def _chapter_source(self, plan: ChapterPlan) -> str:
        return f"{plan.series}/{plan.name}.cbz" if plan.kind == "archive" else f"{plan.series}/{plan.name}"

    def chapter(self, plan: ChapterPlan) -> tuple[list[_PageFile], list[tuple[str, bytes]], ChapterSummary]:
        source = self._chapter_source(plan)
        files = [self.page_file(plan, i, source) for i in range(len(plan.pages))]
        for index, pf in enumerate(sorted(files, key=lambda f: natural_key(f.member))):
            pf.label["page_index"] = index
        files.sort(key=lambda f: f.label["page_index"])
        junk = [junk_entries(kind, files[0].member) for kind in plan.junk]
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


def write_chapter(root: Path, plan: ChapterPlan, files: list[_PageFile], junk: list[tuple[str, bytes]]) -> None:
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
