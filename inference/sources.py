"""Where colorize reads pages and references: a folder or a .cbz/.zip archive, through the ingestion's reader.

A source is one "chapter" in the ingestion's sense (`pipelines.core.sources.ChapterReader`): its image files in natural
reading order, junk skipped, unsafe archive members and oversized files refused with a reason, and every page
decoded by `pipelines.core.decode.decode_upright` (pixel limit checked before decoding, EXIF orientation applied, any
mode to RGB). A `PageSource` is small and picklable, so Ray workers reopen the same source by themselves instead
of receiving images from the driver; on a cluster the source must be readable from every node (a shared folder or
any fsspec URI).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field

import fsspec
from PIL import Image

from pipelines.core.decode import DEFAULT_MAX_PIXELS, decode_upright
from pipelines.core.errors import UsageError
from pipelines.core.sources import (
    ARCHIVE_EXTENSIONS,
    KIND_ARCHIVE,
    KIND_FOLDER,
    ChapterEntry,
    ChapterReader,
    InputRoot,
    PageEntry,
    is_image_name,
    is_junk,
)


class ColorizeInputError(UsageError):
    """The command's inputs cannot be used at all (missing folder, not an archive, empty benchmark): a usage error."""


@dataclass(frozen=True)
class PageSource:
    """A folder or archive of images, as the ingestion reader sees one chapter; `only` keeps a subset of names."""

    root_uri: str  # the folder holding the source
    entry: ChapterEntry
    only: tuple[str, ...] | None = None  # file names to keep (a benchmark index lists its files), None for all

    @property
    def label(self) -> str:
        return f"{self.root_uri.rstrip('/')}/{self.entry.source}"

    def open(self) -> ChapterReader:
        """The reader, not yet entered: `with source.open() as reader:` lists pages (raises if unreadable)."""
        return ChapterReader(InputRoot(self.root_uri), self.entry)

    def pages(self, reader: ChapterReader) -> list[PageEntry]:
        """The source's pages in reading order (refused files included, with their reason)."""
        if self.only is None:
            return list(reader.pages)
        wanted = set(self.only)
        return [page for page in reader.pages if page.name in wanted]


def open_source(path: str | os.PathLike, only: tuple[str, ...] | None = None) -> PageSource:
    """A folder or .cbz/.zip archive as a `PageSource`; ColorizeInputError if it is neither."""
    uri = os.fspath(path)
    fs, resolved = fsspec.core.url_to_fs(uri)
    resolved = resolved.rstrip("/")
    parent, name = posixpath.split(resolved)
    if not name:
        raise ColorizeInputError(f"{uri}: a folder of pages or a .cbz/.zip archive is needed, not a filesystem root")
    root_uri = fs.unstrip_protocol(parent or "/")
    if fs.isdir(resolved):
        return PageSource(root_uri, ChapterEntry("", name, name, KIND_FOLDER), only)
    if not fs.exists(resolved):
        raise ColorizeInputError(f"{uri}: no such folder or archive")
    stem, ext = posixpath.splitext(name)
    if ext.lower() not in ARCHIVE_EXTENSIONS:
        raise ColorizeInputError(f"{uri}: not a folder nor a .cbz/.zip archive (extension {ext or 'none'})")
    return PageSource(root_uri, ChapterEntry("", stem, name, KIND_ARCHIVE), only)


def is_chapter_tree(path: str | os.PathLike) -> bool:
    """A folder holding `<series>/<chapter>` (no page images at its top level), not one chapter's pages."""
    uri = os.fspath(path)
    fs, resolved = fsspec.core.url_to_fs(uri)
    if not fs.isdir(resolved):
        return False
    names = [posixpath.basename(info["name"].rstrip("/")) for info in fs.ls(resolved, detail=True)]
    has_pages = any(is_image_name(name) for name in names if not is_junk(name))
    has_folders = any(info["type"] == "directory" for info in fs.ls(resolved, detail=True))
    return has_folders and not has_pages


@dataclass
class ReadPage:
    """One page read from its source: bytes and their sha1 (for fingerprints) or the reason it cannot be used."""

    entry: PageEntry
    data: bytes | None = None
    sha1: str = ""
    error: str | None = None


def read_page(reader: ChapterReader, page: PageEntry) -> ReadPage:
    """The page's bytes, or its refusal reason (the reader's own refusals and read errors)."""
    try:
        data = reader.read(page)
    except Exception as exc:  # noqa: BLE001 - PageReadError and any I/O failure are this page's reason
        return ReadPage(page, error=str(exc))
    return ReadPage(page, data, hashlib.sha1(data).hexdigest())


def decode_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Upright RGB through the ingestion's safe decoder (raises `pipelines.core.decode.DecodeError` naming the page)."""
    image, _ = decode_upright(data, name, max_pixels=max_pixels)
    return image


def output_stems(names: list[str]) -> dict[str, str]:
    """Page name -> output name without extension: its own name minus the extension, so `010.jpg` -> `010`.

    Two pages differing only by extension (`1.jpg`, `1.png`) would share a name; each then keeps its extension
    in the stem (`1_jpg`, `1_png`), so no output ever overwrites another.
    """
    stems = {name: posixpath.splitext(name)[0] for name in names}
    counts = Counter(stems.values())
    return {
        name: stem if counts[stem] == 1 else f"{stem}_{posixpath.splitext(name)[1].lstrip('.').lower()}"
        for name, stem in stems.items()
    }


@dataclass
class SourceListing:
    """A source's pages in order with the ones that cannot be read (the whole source failing sets `error`)."""

    source: PageSource
    pages: list[ReadPage] = field(default_factory=list)
    error: str | None = None


def read_source(source: PageSource) -> SourceListing:
    """Read every page's bytes (the driver hashes them for fingerprints and embeds the usable ones)."""
    listing = SourceListing(source)
    try:
        with source.open() as reader:
            listing.pages = [read_page(reader, page) for page in source.pages(reader)]
    except Exception as exc:  # noqa: BLE001 - an unreadable archive or folder is reported, not a crash
        listing.error = f"{source.label}: cannot be read: {type(exc).__name__}: {exc}"
    return listing
