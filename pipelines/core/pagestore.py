"""The page store: kept colour pages, normalised once (RGB, upright, bounded size) and encoded per chapter.

One Parquet file per chapter keeps the file count at the chapter count (not the page count) and matches
the unit every later stage works in.
"""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipelines.core.layout import DataLayout
from pipelines.core.schemas import PAGE_STORE, STATUS_OK
from pipelines.core.storage import MARKER_SUFFIX, chapter_of, read_json, read_parquet, read_table, write_parquet

ENCODINGS = ("jpeg", "png", "webp")
INGEST_STAGE = "ingest"  # the stage whose summary says the page store is complete


def encode_page(image: Image.Image, encoding: str = "jpeg", quality: int = 95, png_level: int = 6) -> bytes:
    """Encode a page: JPEG keeps full chroma resolution (4:4:4) since colour is the training target; PNG and
    WebP are lossless (what screentone and grey images need: dots die in JPEG)."""
    buf = io.BytesIO()
    if encoding == "jpeg":
        image.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=True)
    elif encoding == "png":
        image.save(buf, format="PNG", compress_level=png_level)
    elif encoding == "webp":
        image.save(buf, format="WEBP", lossless=True, quality=100, method=4)
    else:
        raise ValueError(f"unknown page-store encoding {encoding!r}; choose one of {ENCODINGS}")
    return buf.getvalue()


def decode_page(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def write_chapter_pages(layout: DataLayout, chapter_id: str, rows: list[dict]) -> None:
    """Write a chapter's stored pages (rows with PAGE_STORE columns) as one file, atomically."""
    rows = sorted(rows, key=lambda r: r["page_id"])
    write_parquet(pa.Table.from_pylist(rows, schema=PAGE_STORE), layout.pagestore_chapter(chapter_id), PAGE_STORE)


def read_chapter_pages(layout: DataLayout, chapter_id: str) -> dict[str, bytes]:
    """page_id -> encoded image bytes for one chapter."""
    table = read_parquet(layout.pagestore_chapter(chapter_id), PAGE_STORE)
    return dict(zip(table.column("page_id").to_pylist(), table.column("image").to_pylist(), strict=True))


def load_chapter_images(layout: DataLayout, chapter_id: str) -> dict[str, Image.Image]:
    return {page_id: decode_page(data) for page_id, data in read_chapter_pages(layout, chapter_id).items()}


def kept_chapter_ids(layout: DataLayout) -> list[str]:
    """Sorted ids of the chapters whose colour pages are training frames: kept, and read without error.

    Ingestion writes them with its summary (`ingest/kept.json`, from its per-chapter records), so no table is
    read; an output folder of an earlier version has no such file and its chapters table is read instead. Later
    stages start from these, so they need a finished ingestion, whose summary is written last.
    """
    summary = layout.summary(INGEST_STAGE)
    if not summary.exists():
        raise FileNotFoundError(
            f"{summary} is missing: run the ingestion job first (python -m jobs.ingest) on {layout.root}"
        )
    if layout.kept_chapters.exists():
        return sorted(read_json(layout.kept_chapters))
    chapters = read_table(layout.chapters, columns=["chapter_id", "kept", "status"])
    kept = pc.and_(pc.equal(chapters["kept"], True), pc.equal(chapters["status"], STATUS_OK))
    return sorted(chapters.filter(kept).column("chapter_id").to_pylist())


def ingested_chapter_ids(layout: DataLayout) -> set[str]:
    """Ids of the chapters ingestion has a completion marker for: the chapters of the input (ingestion purges
    the markers of chapters taken down from it). A later stage purges the files of any other chapter."""
    folder = layout.ingest_markers
    if not folder.is_dir():
        return set()
    names = os.listdir(folder)  # names only: no path object or stat per chapter
    return {chapter_of(name) for name in names if name.endswith(MARKER_SUFFIX) and name[0] != "."}
