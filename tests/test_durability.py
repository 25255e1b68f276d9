"""Data that survives a crash: fsync of data files and their folders before the marker, on the real writers; and
symbolic links in the input, followed inside the root and refused with an error row when they lead out."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from fsync_spy import check_markers_follow_their_data, record_fsyncs
from PIL import Image

from pipelines.core.schemas import STATUS_ERROR, STATUS_OK
from pipelines.core.storage import atomic_write_bytes, write_marker
from pipelines.ingest.stage import IngestOptions, run_ingest


def _color_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(60, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _chapter(folder: Path, seed: int, pages: int = 2) -> None:
    folder.mkdir(parents=True)
    for i in range(pages):
        (folder / f"{i + 1}.png").write_bytes(_color_png(seed + i))


def test_a_file_and_its_folder_reach_the_disk_before_the_marker(tmp_path: Path) -> None:
    with record_fsyncs() as events:
        atomic_write_bytes(tmp_path / "part.bin", b"data")
        write_marker(tmp_path / "part.bin", {"rows": 1})
    part, marker = str(tmp_path / "part.bin"), str(tmp_path / "part.bin.done.json")
    assert events == [part, str(tmp_path), marker, str(tmp_path)]


def test_ingest_parts_and_page_store_are_fsynced_before_their_markers(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    for n, chapter in enumerate(("s1/c1", "s1/c2", "s2/c1")):
        _chapter(root / chapter, 10 * n)
    out = tmp_path / "out"
    with record_fsyncs() as events:
        summary = run_ingest(root, out, options=IngestOptions(min_color_pages=1), local=True, verbose=False)
    assert summary["chapters"]["kept"] == 3
    assert check_markers_follow_their_data(events, out, expect=3) == 3
    for chapter_id in pq.read_table(out / "chapters.parquet").column("chapter_id").to_pylist():
        assert str((out / "pagestore" / f"{chapter_id}.parquet").resolve()) in events
    assert events.index(str(out.resolve() / "pages.parquet")) < events.index(str(out.resolve() / "ingest.summary.json"))


def test_symlinked_chapters_and_series_inside_the_root_are_followed_and_links_out_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "dump", tmp_path / "elsewhere"
    _chapter(root / "s1" / "c1", 1)
    _chapter(root / "store" / "c9", 3)  # a series folder of the dump, also linked under another series name
    _chapter(outside / "series" / "c5", 5)
    os.symlink(root / "s1" / "c1", root / "s1" / "c2")  # chapter link inside the root: followed
    os.symlink(root / "store", root / "s3")  # series link inside the root: followed
    os.symlink(outside / "series" / "c5", root / "s1" / "c3")  # chapter link leading out: refused
    os.symlink(outside / "series", root / "s4")  # series link leading out: refused
    out = tmp_path / "out"
    run_ingest(root, out, options=IngestOptions(min_color_pages=1), local=True, verbose=False)
    chapters = {c["source"]: c for c in pq.read_table(out / "chapters.parquet").to_pylist()}
    assert sorted(chapters) == ["s1/c1", "s1/c2", "s1/c3", "s3/c9", "s4", "store/c9"]
    for source in ("s1/c1", "s1/c2", "s3/c9", "store/c9"):
        assert chapters[source]["status"] == STATUS_OK and chapters[source]["kept"], source
    for source, target in (("s1/c3", outside / "series" / "c5"), ("s4", outside / "series")):
        row = chapters[source]
        assert row["status"] == STATUS_ERROR and not row["kept"]
        assert f"symbolic link to {target} escapes the input root" in row["error"]
    pages = pq.read_table(out / "pages.parquet").to_pylist()
    assert not [p for p in pages if p["source"].startswith(("s1/c3", "s4"))]  # nothing read through them
