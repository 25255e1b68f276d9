"""The reader: chapters and pages of a dump, in natural order, junk skipped, escaping names refused."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipelines.core.sources import (
    KIND_ARCHIVE,
    KIND_FOLDER,
    ChapterEntry,
    ChapterReader,
    InputRoot,
    PageReadError,
    chapter_signature,
    chapter_signatures,
    escape_reason,
    input_signature,
    is_junk,
    list_chapters,
    manifest_table,
    natural_key,
)


def _png(value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), value).save(buf, format="PNG")
    return buf.getvalue()


def _zip(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as archive:
        warnings.simplefilter("ignore", UserWarning)  # duplicate member names are written on purpose
        for name, data in members:
            archive.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), data)


def _sha16(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@pytest.fixture
def dump(tmp_path: Path) -> Path:
    root = tmp_path / "dump"
    chapter = root / "series b" / "ch10"
    chapter.mkdir(parents=True)
    for name in ("10.jpg", "2.JPG", "1.png", "Thumbs.db", ".DS_Store", "ComicInfo.xml", "notes.txt"):
        (chapter / name).write_bytes(_png())
    (chapter / "extra").mkdir()
    (chapter / "extra" / "3.webp").write_bytes(_png())
    (chapter / "__MACOSX").mkdir()
    (chapter / "__MACOSX" / "._1.png").write_bytes(b"junk")
    (root / "series b" / "ch2").mkdir()
    (root / "series b" / "ch2" / "001.png").write_bytes(_png())
    _zip(
        root / "series b" / "ch3.CBZ",
        [
            ("pages/", b""),
            ("pages/11.png", _png(1)),
            ("pages/9.png", _png(2)),
            ("__MACOSX/pages/._9.png", b"junk"),
            ("../evil.png", _png(3)),
            ("/abs.png", _png(4)),
            ("dup.png", _png(5)),
            ("dup.png", _png(6)),
            ("readme.txt", b"hello"),
        ],
    )
    _zip(root / "a-series" / "vol1.zip", [("1.png", _png())])
    (root / "a-series" / "cover.jpg").write_bytes(_png())  # a loose file at series level is not a chapter
    (root / ".hidden" / "ch1").mkdir(parents=True)
    (root / "loose.png").write_bytes(_png())
    return root


def test_natural_key_orders_numbers_and_ignores_case() -> None:
    names = ["10.jpg", "2.jpg", "B1.png", "a10.png", "a2.png", "1.jpg"]
    assert sorted(names, key=natural_key) == ["1.jpg", "2.jpg", "10.jpg", "a2.png", "a10.png", "B1.png"]


def test_junk_and_escape_rules() -> None:
    assert is_junk("Thumbs.db") and is_junk("x/.DS_Store") and is_junk("__MACOSX/a/._1.png") and is_junk(".git/x")
    assert not is_junk("pages/001.jpg")
    assert escape_reason("../x.png") and escape_reason("a/../../x.png") and escape_reason("/etc/x.png")
    assert escape_reason("C:/x.png") and escape_reason("a/b.png") is None


def test_list_chapters_is_sorted_with_stable_ids(dump: Path) -> None:
    chapters = list_chapters(dump)
    assert [(c.series, c.chapter, c.source, c.kind) for c in chapters] == [
        ("a-series", "vol1", "a-series/vol1.zip", KIND_ARCHIVE),
        ("series b", "ch2", "series b/ch2", KIND_FOLDER),
        ("series b", "ch3", "series b/ch3.CBZ", KIND_ARCHIVE),
        ("series b", "ch10", "series b/ch10", KIND_FOLDER),
    ]
    assert all(c.chapter_id == _sha16(c.source) for c in chapters)
    table = manifest_table(chapters)
    assert table.column("chapter_id").to_pylist() == [c.chapter_id for c in chapters]


def test_folder_pages_in_natural_order_without_junk(dump: Path) -> None:
    root = InputRoot(dump)
    chapter = ChapterEntry("series b", "ch10", "series b/ch10", KIND_FOLDER)
    with ChapterReader(root, chapter) as reader:
        assert [(p.page_index, p.source) for p in reader.pages] == [
            (0, "series b/ch10/1.png"),
            (1, "series b/ch10/2.JPG"),
            (2, "series b/ch10/10.jpg"),
            (3, "series b/ch10/extra/3.webp"),
        ]
        page = reader.pages[0]
        assert page.page_id == _sha16("series b/ch10/1.png")
        assert reader.read(page) == (dump / "series b" / "ch10" / "1.png").read_bytes()
        assert page.file_bytes == len(reader.read(page))


def test_archive_members_are_read_and_escaping_names_refused(dump: Path) -> None:
    chapter = ChapterEntry("series b", "ch3", "series b/ch3.CBZ", KIND_ARCHIVE)
    with ChapterReader(InputRoot(dump), chapter) as reader:
        by_name = {p.name: p for p in reader.pages}
        assert [p.name for p in reader.pages] == ["../evil.png", "/abs.png", "dup.png", "pages/9.png", "pages/11.png"]
        assert by_name["pages/9.png"].source == "series b/ch3.CBZ/pages/9.png"
        assert reader.read(by_name["pages/9.png"]) == _png(2)
        for name in ("/abs.png", "../evil.png"):
            assert by_name[name].refused and "member name refused" in by_name[name].refused
            with pytest.raises(PageReadError, match=f"series b/ch3.CBZ/{name}"):
                reader.read(by_name[name])
        assert "2 members named 'dup.png'" in by_name["dup.png"].refused


def test_size_limit_is_checked_before_reading(dump: Path) -> None:
    chapter = ChapterEntry("series b", "ch2", "series b/ch2", KIND_FOLDER)
    expected = r"series b/ch2/001.png: file is \d+ bytes, above the limit of 10"
    with (
        ChapterReader(InputRoot(dump), chapter, max_file_bytes=10) as reader,
        pytest.raises(PageReadError, match=expected),
    ):
        reader.read(reader.pages[0])


def test_file_grown_after_listing_is_refused_past_the_limit(tmp_path: Path) -> None:
    """The listed size passes the limit; the bytes actually read do not: refused, never silently cut."""
    (tmp_path / "s" / "c").mkdir(parents=True)
    page = tmp_path / "s" / "c" / "1.png"
    page.write_bytes(_png())
    limit = len(_png()) + 10
    with ChapterReader(InputRoot(tmp_path), list_chapters(tmp_path)[0], max_file_bytes=limit) as reader:
        assert reader.read(reader.pages[0]) == _png()
        page.write_bytes(_png() + bytes(100))
        with pytest.raises(PageReadError, match=rf"^s/c/1.png: exceeds the limit of {limit} bytes when read"):
            reader.read(reader.pages[0])


def _forge(archive: Path, member: str, *, file_size: int | None = None, crc: int | None = None) -> None:
    """Overwrite a member's recorded uncompressed size and/or CRC-32 in both its local and central headers."""
    with zipfile.ZipFile(archive) as zf:
        names = [info.filename for info in zf.infolist()]
        local = zf.getinfo(member).header_offset
    raw = bytearray(archive.read_bytes())
    central = raw.find(b"PK\x01\x02")
    for _ in range(names.index(member)):
        central = raw.find(b"PK\x01\x02", central + 4)
    for offset, field_offset in ((local, 14), (central, 16)):  # CRC-32, then sizes, in both header layouts
        if crc is not None:
            struct.pack_into("<I", raw, offset + field_offset, crc)
        if file_size is not None:
            struct.pack_into("<I", raw, offset + field_offset + 8, file_size)
    archive.write_bytes(bytes(raw))


def test_archive_member_with_understated_size_or_bad_crc_is_an_error(tmp_path: Path) -> None:
    archive = tmp_path / "s" / "c.cbz"
    archive.parent.mkdir()
    pixels = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    pixels.save(buf, format="PNG")
    big = buf.getvalue()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in ("1.png", "2.png", "3.png"):
            zf.writestr(name, big)
    _forge(archive, "2.png", file_size=len(big) // 2)  # header understates the size: the read is cut
    _forge(archive, "3.png", crc=zlib.crc32(big) ^ 1)
    with ChapterReader(InputRoot(tmp_path), list_chapters(tmp_path)[0], max_file_bytes=len(big)) as reader:
        first, understated, bad_crc = reader.pages
        assert understated.file_bytes == len(big) // 2 and reader.read(first) == big
        for page in (understated, bad_crc):
            with pytest.raises(PageReadError, match=rf"^s/c.cbz/{page.name}: corrupt archive member: .*Bad CRC-32"):
                reader.read(page)


def test_chapter_signature_follows_page_changes_only(tmp_path: Path) -> None:
    chapter_dir = tmp_path / "s" / "c"
    (chapter_dir / "sub").mkdir(parents=True)
    (chapter_dir / "1.png").write_bytes(_png(1))
    (chapter_dir / "sub" / "2.png").write_bytes(_png(2))
    _zip(tmp_path / "s" / "d.cbz", [("1.png", _png(1))])
    root = InputRoot(tmp_path)
    folder, archive = list_chapters(root)
    signatures = {chapter_signature(root, folder)}
    whole = input_signature(chapter_signatures(tmp_path))
    assert chapter_signature(root, folder) in signatures and input_signature(chapter_signatures(root)) == whole

    (chapter_dir / "ComicInfo.xml").write_text("<x/>")  # not a page: no change
    (chapter_dir / "Thumbs.db").write_bytes(b"junk")
    assert chapter_signature(root, folder) in signatures and input_signature(chapter_signatures(root)) == whole

    def changed() -> None:
        signature = chapter_signature(root, folder)
        assert signature not in signatures
        signatures.add(signature)

    (chapter_dir / "sub" / "2.png").write_bytes(_png(2) + b"-replaced")
    changed()
    same_size = chapter_dir / "1.png"
    stat = same_size.stat()
    same_size.write_bytes(_png(9))  # same length, other bytes, written later
    os.utime(same_size, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed()
    (chapter_dir / "3.png").write_bytes(_png(3))
    changed()
    (chapter_dir / "3.png").rename(chapter_dir / "4.png")
    changed()
    assert input_signature(chapter_signatures(root)) != whole

    archive_signature = chapter_signature(root, archive)
    _zip(tmp_path / "s" / "d.cbz", [("1.png", _png(1)), ("2.png", _png(2))])
    assert chapter_signature(root, archive) != archive_signature


def test_chapter_signature_on_an_fsspec_root() -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/sig-dump/s1/ch1/1.png", _png(1))
    root = InputRoot("memory://sig-dump")
    before = input_signature(chapter_signatures(root))
    assert input_signature(chapter_signatures(root)) == before
    fs.pipe("/sig-dump/s1/ch1/1.png", _png(2) + b"-replaced")
    assert input_signature(chapter_signatures(root)) != before


def test_corrupt_archive_fails_to_open(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "broken.cbz").write_bytes(b"PK\x03\x04 this is not really a zip file")
    chapter = list_chapters(tmp_path)[0]
    with pytest.raises(zipfile.BadZipFile), ChapterReader(InputRoot(tmp_path), chapter):
        pass


def test_symlink_escaping_the_root_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png())
    chapter_dir = tmp_path / "root" / "s" / "c"
    chapter_dir.mkdir(parents=True)
    (chapter_dir / "1.png").write_bytes(_png())
    os.symlink(outside, chapter_dir / "2.png")
    chapter = list_chapters(tmp_path / "root")[0]
    with ChapterReader(InputRoot(tmp_path / "root"), chapter) as reader:
        assert reader.pages[0].refused is None
        assert "escapes the input root" in reader.pages[1].refused


def test_fsspec_uri_root(dump: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/mem-dump/s1/ch1/2.png", _png(1))
    fs.pipe("/mem-dump/s1/ch1/10.png", _png(2))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("1.png", _png(3))
    fs.pipe("/mem-dump/s1/ch2.cbz", buf.getvalue())
    root = InputRoot("memory://mem-dump")
    chapters = list_chapters(root)
    assert [c.source for c in chapters] == ["s1/ch1", "s1/ch2.cbz"]
    with ChapterReader(root, chapters[0]) as reader:
        assert [p.source for p in reader.pages] == ["s1/ch1/2.png", "s1/ch1/10.png"]
        assert reader.read(reader.pages[1]) == _png(2)
    with ChapterReader(root, chapters[1]) as reader:
        assert reader.read(reader.pages[0]) == _png(3)
    assert [c.source for c in list_chapters(f"file://{dump}")] == [c.source for c in list_chapters(dump)]


def test_reader_matches_the_corpus_labels(tiny_corpus) -> None:
    """The generator's labels are the contract: same page sources, same page_index, junk never listed."""
    labels = [json.loads(line) for line in Path(tiny_corpus.labels_path).read_text().splitlines() if line.strip()]
    expected = {(lb["chapter_source"], lb["source"], lb["page_index"]) for lb in labels}
    root = InputRoot(tiny_corpus.root)
    chapters = list_chapters(root)
    assert [c.source for c in chapters] == [c.source for c in tiny_corpus.chapters]
    found = set()
    for chapter in chapters:
        with ChapterReader(root, chapter) as reader:
            found |= {(chapter.source, p.source, p.page_index) for p in reader.pages}
            assert all(p.refused is None for p in reader.pages)
    assert found == expected
