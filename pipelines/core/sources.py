"""The input reader: chapters of a raw dump (folders or .cbz/.zip archives) and their pages in reading order.

A dump is laid out as `<series>/<chapter>/<pages>` or `<series>/<chapter>.cbz|.zip`. Listing chapters is cheap
(two directory levels), so the manifest is built before any page is touched; pages are listed per chapter by the
worker that processes it. Every identifier is derived from the source path relative to the input root, so the
same dump gives the same ids on every run and on every machine.

A chapter's signature (`chapter_signature`) is a cheap token of its contents, so a rerun can tell a chapter whose
pages were added or replaced from one that is unchanged without reading a page: size and modification time of
an archive (one stat), or the sorted (name, size, modification time) of a folder's page files (one walk of the
folder, the same listing the worker makes). It is bookkeeping only and never enters a table, since it differs
between two copies of the same dump.

Paths may be local or any URI fsspec understands (`file://`, `s3://`, `memory://`, ...): the reader only lists
directories, opens files and reads bytes through the filesystem object.
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import re
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from pipelines.core.schemas import MANIFEST
from pipelines.core.storage import stable_hash

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"}
)
ARCHIVE_EXTENSIONS = frozenset({".cbz", ".zip"})
JUNK_FILE_NAMES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})
JUNK_FOLDER_NAMES = frozenset({"__macosx"})
KIND_FOLDER = "folder"
KIND_ARCHIVE = "archive"
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024  # one page file; larger is refused before it is read into memory
# What fsspec listings call an entry's modification time (local disk, object stores, ...); the first one present
# is used. `created` is last: the memory filesystem has nothing else, and it changes when a file is rewritten.
_MODIFIED_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified", "created")
# Object-store content versions, which change on every upload even within one timestamp tick.
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "generation", "version_id")


class PageReadError(Exception):
    """A page's bytes cannot be read: the message names the page and the cause."""


def stable_id(source: str) -> str:
    """16 hex chars of sha1 of a source path: deterministic ids for chapters and pages."""
    return hashlib.sha1(source.encode("utf-8")).hexdigest()[:16]


def natural_key(path: str) -> tuple:
    """Sort key putting `2.jpg` before `10.jpg`, case-insensitive; defines a page's `page_index`."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", path))


def reading_order_key(path: str) -> tuple:
    """Natural order, then the raw name, so names equal under the natural key (`1.jpg`, `01.jpg`) stay ordered."""
    return (natural_key(path), path)


def is_junk(relative: str) -> bool:
    """Entries a dump carries that are never pages: dotfiles, `__MACOSX/`, Thumbs.db and friends."""
    parts = [p for p in relative.split("/") if p]
    if not parts:
        return True
    if any(p.startswith(".") and p != ".." for p in parts):
        return True
    if any(p.lower() in JUNK_FOLDER_NAMES for p in parts[:-1]):
        return True
    return parts[-1].lower() in JUNK_FILE_NAMES


def is_image_name(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def escape_reason(name: str) -> str | None:
    """Why an archive member name would land outside the archive (zip-slip), or None if it is safe."""
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in name.split("/"):
        return "'..' component escapes the archive"
    return None


@dataclass(frozen=True)
class ChapterEntry:
    """One chapter of the dump: a row of the manifest."""

    series: str
    chapter: str
    source: str  # folder or archive, relative to the input root, '/'-separated
    kind: str  # KIND_FOLDER | KIND_ARCHIVE
    refused: str | None = None  # why the chapter must not be read (a symbolic link leading out of the root)

    @functools.cached_property
    def chapter_id(self) -> str:  # computed once: the driver keys tens of thousands of chapters by it per run
        return stable_id(self.source)

    def row(self) -> dict[str, str]:
        return {
            "chapter_id": self.chapter_id,
            "series": self.series,
            "chapter": self.chapter,
            "source": self.source,
            "kind": self.kind,
        }


@dataclass(frozen=True)
class PageEntry:
    """One image file of a chapter, in reading order; `refused` says why it must not be read."""

    name: str  # path inside the chapter folder, or the archive member name
    source: str  # relative to the input root; archive members as `<archive>/<member>`
    page_index: int
    file_bytes: int | None
    refused: str | None = None

    @property
    def page_id(self) -> str:
        return stable_id(self.source)


class InputRoot:
    """The dump's root on a local or fsspec filesystem."""

    def __init__(self, root: str | os.PathLike):
        self.uri = os.fspath(root)
        self.fs, path = fsspec.core.url_to_fs(self.uri)
        self.path = path.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if not self.fs.isdir(self.path):
            raise NotADirectoryError(f"input root {self.uri} is not a directory")

    def full(self, relative: str) -> str:
        return f"{self.path}/{relative}" if relative else self.path

    def listdir(self, relative: str) -> list[dict[str, Any]]:
        return sorted(self.fs.ls(self.full(relative), detail=True), key=lambda info: info["name"])


def _resolve_link(root: InputRoot, relative: str, info: dict[str, Any]) -> tuple[str, str | None]:
    """(type, refusal) of a listed entry, following a local symbolic link that stays inside the root.

    A link leading out of the root is not followed: its refusal names the target. Broken links are refused too.
    """
    if not info.get("islink") or not root.is_local:
        return info["type"], None
    target = os.path.realpath(root.full(relative))
    real_root = os.path.realpath(root.path)
    if os.path.commonpath([real_root, target]) != real_root:
        return "link", f"symbolic link to {target} escapes the input root"
    if os.path.isdir(target):
        return "directory", None
    if os.path.isfile(target):
        return "file", None
    return "link", f"symbolic link to {target} is broken"


def list_chapters(root: str | os.PathLike | InputRoot) -> list[ChapterEntry]:
    """Every chapter under the root, sorted by series then chapter in natural order.

    A series is a folder of the root; a chapter is a folder or a .cbz/.zip archive inside it. Other files at
    either level (loose images, metadata, dotfiles) are not chapters and are ignored. Symbolic links to folders
    or archives inside the root are followed; a link leading out of the root becomes a chapter entry with
    `refused` set (its reader raises, so the chapter gets an error row instead of vanishing).
    """
    root = root if isinstance(root, InputRoot) else InputRoot(root)
    chapters: list[ChapterEntry] = []
    for series_info in root.listdir(""):
        series = posixpath.basename(series_info["name"].rstrip("/"))
        if is_junk(series):
            continue
        series_type, refused = _resolve_link(root, series, series_info)
        if refused:
            chapters.append(ChapterEntry(series, series, series, KIND_FOLDER, refused=refused))
            continue
        if series_type != "directory":
            continue
        for info in root.listdir(series):
            name = posixpath.basename(info["name"].rstrip("/"))
            if is_junk(name):
                continue
            stem, ext = posixpath.splitext(name)
            kind, refused = _resolve_link(root, f"{series}/{name}", info)
            if refused:
                chapters.append(ChapterEntry(series, name, f"{series}/{name}", KIND_FOLDER, refused=refused))
            elif kind == "directory":
                chapters.append(ChapterEntry(series, name, f"{series}/{name}", KIND_FOLDER))
            elif ext.lower() in ARCHIVE_EXTENSIONS:
                chapters.append(ChapterEntry(series, stem, f"{series}/{name}", KIND_ARCHIVE))
    chapters.sort(key=lambda c: (natural_key(c.series), c.series, natural_key(c.chapter), c.source))
    return chapters


LAYOUT_HINT = "expected <series>/<chapter>/<pages> or <series>/<chapter>.cbz|.zip"


def layout_problem(root: str | os.PathLike | InputRoot) -> str:
    """Why a root holds no chapters, in one line naming the expected layout and what was found instead."""
    root = root if isinstance(root, InputRoot) else InputRoot(root)
    entries = [e for e in root.listdir("") if not is_junk(posixpath.basename(e["name"].rstrip("/")))]
    folders = [e for e in entries if e["type"] == "directory"]
    images = [e for e in entries if e["type"] == "file" and is_image_name(e["name"])]
    if not entries:
        return f"the folder is empty; {LAYOUT_HINT}"
    if images and not folders:
        example = posixpath.basename(images[0]["name"])
        return f"holds {len(images)} image files at its top level (e.g. {example}) but no chapters; {LAYOUT_HINT}"
    for folder in folders:
        series = posixpath.basename(folder["name"].rstrip("/"))
        pages = [e for e in root.listdir(series) if e["type"] == "file" and is_image_name(e["name"])]
        if pages:
            example = f"{series}/{posixpath.basename(pages[0]['name'])}"
            return f"series folders hold images directly (e.g. {example}), not chapter folders; {LAYOUT_HINT}"
    return f"no chapter folder or archive found at the second level; {LAYOUT_HINT}"


def manifest_table(chapters: list[ChapterEntry]) -> pa.Table:
    return pa.Table.from_pylist([c.row() for c in chapters], schema=MANIFEST)


def _change_token(info: dict[str, Any]) -> list[str]:
    """Size, modification time and content version (when the filesystem has one) of a listed entry."""
    modified = next((info[key] for key in _MODIFIED_KEYS if info.get(key) is not None), None)
    version = next((info[key] for key in _VERSION_KEYS if info.get(key) is not None), None)
    return [str(info.get("size")), str(modified), str(version)]


def _folder_page_files(root: InputRoot, source: str) -> dict[str, dict[str, Any]]:
    """The image files of a chapter folder, junk skipped, by path inside the folder: the candidate pages."""
    base = root.full(source)
    files = {}
    for full, info in root.fs.find(base, withdirs=False, detail=True).items():
        name = full[len(base) + 1 :]
        if not is_junk(name) and is_image_name(name):
            files[name] = info
    return files


def chapter_signature(root: InputRoot, chapter: ChapterEntry) -> str:
    """16 hex chars that change when the chapter's pages change: added, removed, renamed or rewritten.

    An archive costs one stat (its size and modification time); a folder one walk (name, size and modification
    time of every candidate page, so junk and non-image files do not count). A rewrite that keeps the size and
    lands within the filesystem's timestamp resolution goes unseen. A chapter that cannot be listed gets a
    signature naming the failure: the worker then reports the chapter as unreadable, and once it is readable
    again its signature differs, so it is redone.
    """
    if chapter.refused:
        return stable_hash([chapter.kind, f"refused: {chapter.refused}"], 16)
    try:
        if chapter.kind == KIND_ARCHIVE:
            token: Any = _change_token(root.fs.info(root.full(chapter.source)))
        else:
            token = sorted(
                [name, *_change_token(info)] for name, info in _folder_page_files(root, chapter.source).items()
            )
    except Exception as exc:  # noqa: BLE001 - the worker reports the chapter; listing must go on
        token = f"unlisted: {type(exc).__name__}"
    return stable_hash([chapter.kind, token], 16)


@dataclass(frozen=True)
class ChapterListing:
    """The chapters under a root with their signatures, taken once: the pipeline's "ingest is current" check and
    ingestion's ledger both use it."""

    chapters: list[ChapterEntry]
    signatures: dict[str, str]  # chapter_id -> chapter_signature (missing where taking it failed)


def chapter_signatures(
    root: str | os.PathLike | InputRoot,
    mapper: Callable[[Callable[[Any], Any], list[Any]], list[Any]] | None = None,
    chapters: list[ChapterEntry] | None = None,
) -> ChapterListing:
    """Every chapter under the root and its `chapter_signature`, in listing order.

    `mapper(fn, items)` computes the signatures (default: one after another here); the pipeline passes one that
    runs them in Ray tasks, so the driver only lists the series and chapter folders. `chapters` is the root's
    `list_chapters` when the caller has just taken it.
    """
    root = root if isinstance(root, InputRoot) else InputRoot(root)
    chapters = list_chapters(root) if chapters is None else chapters
    signature = functools.partial(chapter_signature, root)
    signatures = mapper(signature, chapters) if mapper is not None else [signature(c) for c in chapters]
    return ChapterListing(chapters, {c.chapter_id: s for c, s in zip(chapters, signatures, strict=True) if s})


def input_signature(listing: ChapterListing) -> str:
    """A hash of every chapter's id and signature (`chapter_signatures`): changes when a chapter is added,
    removed or changed."""
    return stable_hash([[c.chapter_id, listing.signatures.get(c.chapter_id)] for c in listing.chapters])


def _in_reading_order(chapter_source: str, candidates: list[tuple[str, int | None, str | None]]) -> list[PageEntry]:
    """(name, size, refused) candidates -> PageEntry list numbered in natural order."""
    candidates = sorted(candidates, key=lambda c: reading_order_key(c[0]))
    return [
        PageEntry(name=name, source=f"{chapter_source}/{name}", page_index=i, file_bytes=size, refused=refused)
        for i, (name, size, refused) in enumerate(candidates)
    ]


class ChapterReader:
    """Lists a chapter's pages and reads their bytes; an archive is opened once for the whole chapter.

    Used as a context manager: entering lists the pages and raises (OSError, zipfile.BadZipFile, ...) when the
    chapter cannot be read at all; the caller turns that into a chapter row with status error. Reading one page
    raises PageReadError naming the page.
    """

    def __init__(self, root: InputRoot, chapter: ChapterEntry, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
        self.root, self.chapter, self.max_file_bytes = root, chapter, max_file_bytes
        self._handle: IO[bytes] | None = None
        self._archive: zipfile.ZipFile | None = None
        self._members: dict[str, zipfile.ZipInfo] = {}
        self.pages: list[PageEntry] = []

    def __enter__(self) -> ChapterReader:
        if self.chapter.refused:
            raise PermissionError(f"{self.chapter.source}: {self.chapter.refused}")
        try:
            self.pages = self._list_archive() if self.chapter.kind == KIND_ARCHIVE else self._list_folder()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()
            self._archive = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _list_folder(self) -> list[PageEntry]:
        base = self.root.full(self.chapter.source)
        if not self.root.fs.isdir(base):
            raise NotADirectoryError(f"chapter folder {self.chapter.source} is missing or not a directory")
        real_root = os.path.realpath(self.root.path) if self.root.is_local else None
        candidates = []
        for name, info in _folder_page_files(self.root, self.chapter.source).items():
            refused = None
            if real_root is not None and info.get("islink"):
                target = os.path.realpath(f"{base}/{name}")
                if os.path.commonpath([real_root, target]) != real_root:
                    refused = f"symbolic link to {target} escapes the input root"
            candidates.append((name, info.get("size"), refused))
        return _in_reading_order(self.chapter.source, candidates)

    def _list_archive(self) -> list[PageEntry]:
        self._handle = self.root.fs.open(self.root.full(self.chapter.source), "rb")
        self._archive = zipfile.ZipFile(self._handle)
        infos = [info for info in self._archive.infolist() if not info.is_dir()]
        counts = Counter(info.filename.replace("\\", "/") for info in infos)
        candidates = []
        for info in infos:
            name = info.filename.replace("\\", "/")
            refused = escape_reason(name)
            if refused is None and (is_junk(name) or not is_image_name(name)):
                continue
            if name in self._members:
                continue
            if refused is None and counts[name] > 1:
                refused = f"the archive holds {counts[name]} members named {name!r}; ambiguous page"
            self._members[name] = info
            candidates.append((name, info.file_size, f"member name refused: {refused}" if refused else None))
        return _in_reading_order(self.chapter.source, candidates)

    def read(self, page: PageEntry) -> bytes:
        """The page's raw bytes, size limit checked before and after reading; raises PageReadError.

        The listed size is checked first, so a large file is refused unread. At most one byte more than the
        limit is then read, because the listed size can lie: a file may grow after listing, and an archive's
        size record is only what the archive says. An archive member is read to its end, which is where the
        zip reader checks it against its recorded CRC-32.
        """
        if page.refused:
            raise PageReadError(f"{page.source}: {page.refused}")
        if page.file_bytes is not None and page.file_bytes > self.max_file_bytes:
            raise PageReadError(
                f"{page.source}: file is {page.file_bytes} bytes, above the limit of {self.max_file_bytes} bytes"
            )
        limit = self.max_file_bytes + 1
        try:
            if self._archive is not None:
                with self._archive.open(self._members[page.name]) as member:
                    data = member.read(limit)
            else:
                data = self.root.fs.cat_file(self.root.full(f"{self.chapter.source}/{page.name}"), start=0, end=limit)
        except zipfile.BadZipFile as exc:
            raise PageReadError(
                f"{page.source}: corrupt archive member: its data does not match the archive's records: {exc}"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - any read failure (encryption, I/O, ...) is this page's error
            raise PageReadError(f"{page.source}: cannot read: {type(exc).__name__}: {exc}") from exc
        if len(data) > self.max_file_bytes:
            where = "after decompression" if self._archive is not None else "when read (it grew after listing)"
            raise PageReadError(f"{page.source}: exceeds the limit of {self.max_file_bytes} bytes {where}")
        return data
