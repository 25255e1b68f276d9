"""The ingestion job end to end on the generated corpus: tables, page store, errors, reruns, resume after a kill."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.ingest import main as ingest_main
from jobs.ingest import parse_args
from pipelines.core.cli import run_job
from pipelines.core.errors import PreconditionError
from pipelines.core.layout import DataLayout
from pipelines.core.pagestore import kept_chapter_ids, load_chapter_images
from pipelines.core.schemas import CHAPTERS, MANIFEST, PAGES, STATUS_ERROR, STATUS_OK
from pipelines.core.sources import stable_id
from pipelines.core.storage import marker_path, part_path, read_table, table_parts
from pipelines.ingest.color import classify_features
from pipelines.ingest.stage import IngestOptions, chapter_marker, run_ingest

SUMMARY = "ingest.summary.json"


def _labels(info) -> dict[str, dict]:
    lines = Path(info.labels_path).read_text().splitlines()
    return {lb["source"]: lb for lb in (json.loads(line) for line in lines if line.strip())}


def _hashes(folder: Path) -> dict[str, str]:
    """sha256 of every output file except the run summary (it holds this run's timings)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != SUMMARY
    }


def _stable_summary(folder: Path) -> dict:
    summary = json.loads((folder / SUMMARY).read_text())
    summary.pop("run")
    summary.pop("output")
    return summary


@pytest.fixture(scope="module")
def ingested(tiny_corpus, ray_local, tmp_path_factory):
    """The corpus ingested once through Ray (2 chapters per task); tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("ingest") / "out"
    summary = run_ingest(tiny_corpus.root, out, chapters_per_task=2)
    return tiny_corpus, out, summary


def test_outputs_follow_the_schemas(ingested) -> None:
    _, out, summary = ingested
    layout = DataLayout.at(out)
    for table, schema in ((layout.pages, PAGES), (layout.chapters, CHAPTERS)):
        parts = table_parts(table)
        assert parts and all(pq.read_schema(part).remove_metadata() == schema for part in parts)
        assert pq.read_table(table).num_rows == read_table(table, schema).num_rows  # a folder pyarrow reads whole
    assert pq.read_schema(layout.manifest).remove_metadata() == MANIFEST
    assert summary == json.loads(layout.summary("ingest").read_text())
    assert summary["run"]["mode"] == "ray" and summary["run"]["chapters_failed"] == 0
    assert summary["complete"] is True


def test_kept_chapter_ids(ingested, tmp_path) -> None:
    info, out, _ = ingested
    kept = kept_chapter_ids(DataLayout.at(out))
    assert kept == sorted(stable_id(source) for source in info.chapter_sources(min_color_pages=21)) and len(kept) == 2
    with pytest.raises(FileNotFoundError, match=r"ingest\.summary\.json is missing: run the ingestion job first"):
        kept_chapter_ids(DataLayout.at(tmp_path))


def test_an_output_folder_of_single_file_tables_is_read_then_replaced(ingested, tmp_path) -> None:
    info, out, _ = ingested
    copy = shutil.copytree(out, tmp_path / "out")
    layout = DataLayout.at(copy)
    tables = {
        table: read_table(table, schema) for table, schema in ((layout.pages, PAGES), (layout.chapters, CHAPTERS))
    }
    for table, rows in tables.items():  # the layout of an earlier version: one file per table, no markers
        shutil.rmtree(table)
        pq.write_table(rows, table)
    shutil.rmtree(layout.ingest_markers)
    shutil.rmtree(layout.ledger("ingest").parent)  # an earlier version kept no ledger
    layout.kept_chapters.unlink()
    legacy_parts = layout.legacy_ingest_parts[0]
    legacy_parts.mkdir(parents=True)
    assert read_table(layout.pages, PAGES).equals(tables[layout.pages])  # readers read the old file as before
    assert kept_chapter_ids(layout) == kept_chapter_ids(DataLayout.at(out))
    summary = run_ingest(info.root, copy, local=True, verbose=False)
    assert summary["run"]["chapters_processed"] == summary["chapters"]["total"]  # no marker names parts: redone
    assert layout.pages.is_dir() and not legacy_parts.exists()
    assert read_table(layout.pages, PAGES).equals(tables[layout.pages])
    assert summary["tables"] == json.loads((out / SUMMARY).read_text())["tables"]


def test_one_row_per_file_and_one_error_row_per_broken_file(ingested) -> None:
    info, out, _ = ingested
    labels = _labels(info)
    pages = pq.read_table(DataLayout.at(out).pages).to_pylist()
    assert len(pages) == len(labels) == len({p["page_id"] for p in pages})
    by_source = {p["source"]: p for p in pages}
    assert set(by_source) == set(labels)
    for source, label in labels.items():
        row = by_source[source]
        assert row["page_id"] == hashlib.sha1(source.encode()).hexdigest()[:16]
        assert (row["series"], row["chapter"], row["page_index"]) == (
            label["series"],
            label["chapter"],
            label["page_index"],
        )
        if label["broken"]:
            assert row["status"] == STATUS_ERROR and row["is_color"] is None and not row["stored"]
            assert source in row["error"], row["error"]
        else:
            assert row["status"] == STATUS_OK and row["error"] is None
            assert (row["width"], row["height"]) == (label["width"], label["height"]), source
            assert row["format"] == label["format"] and row["mode"] == label["mode"]
    causes = {labels[s]["broken"]: by_source[s]["error"] for s in labels if labels[s]["broken"]}
    assert set(causes) == {"truncated", "empty", "not_image", "decompression_bomb"}
    assert "truncated" in causes["truncated"] and "empty file" in causes["empty"]
    assert "not an image" in causes["not_image"] and "decompression bomb" in causes["decompression_bomb"]


def test_color_precision_and_recall(ingested) -> None:
    info, out, _ = ingested
    labels = _labels(info)
    pages = [p for p in pq.read_table(DataLayout.at(out).pages).to_pylist() if p["status"] == STATUS_OK]
    truth = np.array([labels[p["source"]]["is_color"] for p in pages])
    predicted = np.array([p["is_color"] for p in pages])
    true_positives = int((truth & predicted).sum())
    assert true_positives / predicted.sum() >= 0.98 and true_positives / truth.sum() >= 0.98
    hard = {labels[p["source"]]["style"] for p in pages if not p["is_color"]}
    assert {"sepia", "screentone", "chroma_noise", "grey"} <= hard
    scores, recut = classify_features(pq.read_table(DataLayout.at(out).pages))
    ok = np.array([p["status"] == STATUS_OK for p in pq.read_table(DataLayout.at(out).pages).to_pylist()])
    assert (
        recut[ok].tolist()
        == pq.read_table(DataLayout.at(out).pages).column("is_color").to_numpy(zero_copy_only=False)[ok].tolist()
    )


def test_chapter_decisions_and_page_store(ingested) -> None:
    info, out, summary = ingested
    labels = _labels(info)
    layout = DataLayout.at(out)
    chapters = {c["source"]: c for c in pq.read_table(layout.chapters).to_pylist()}
    pages = pq.read_table(layout.pages).to_pylist()
    assert sorted(chapters) == sorted(c.source for c in info.chapters)
    assert {s for s, c in chapters.items() if c["kept"]} == set(info.chapter_sources(min_color_pages=21))
    for chapter in chapters.values():
        assert chapter["status"] == STATUS_OK
        if not chapter["kept"]:
            assert "fewer than min_color_pages=21" in chapter["reason"]
    stored = {p["page_id"] for p in pages if p["stored"]}
    kept_sources = {s for s, c in chapters.items() if c["kept"]}
    expected = {p["page_id"] for p in pages if p["is_color"] and labels[p["source"]]["chapter_source"] in kept_sources}
    assert stored == expected and summary["pages"]["stored"] == len(stored)
    covers = [p for p in pages if labels[p["source"]]["style"] == "cover"]
    assert covers and all(p["is_color"] and not p["stored"] for p in covers)  # colour page of a dropped chapter
    seen = set()
    for chapter in chapters.values():
        store = layout.pagestore_chapter(chapter["chapter_id"])
        assert store.exists() == chapter["kept"]
        if chapter["kept"]:
            images = load_chapter_images(layout, chapter["chapter_id"])
            seen |= set(images)
            for page_id, image in images.items():
                label = labels[next(p["source"] for p in pages if p["page_id"] == page_id)]
                assert image.mode == "RGB" and image.size == (label["width"], label["height"])
    assert seen == stored
    counts = summary["chapters"]
    assert counts["kept"] == 2 and counts["kept"] + counts["dropped"] == len(chapters) == counts["total"]


def test_rerun_is_byte_identical_and_skips_done_chapters(ingested, tmp_path) -> None:
    info, out, first = ingested
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = _hashes(copy)
    second = run_ingest(info.root, copy, chapters_per_task=3)
    assert second["run"]["chapters_reused"] == first["chapters"]["total"]
    assert second["run"]["chapters_processed"] == 0
    assert _hashes(copy) == before
    assert _stable_summary(copy) == _stable_summary(out)


def test_resume_after_lost_outputs_gives_the_same_bytes(ingested, tmp_path) -> None:
    info, out, _ = ingested
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    layout = DataLayout.at(copy)
    kept = [c["chapter_id"] for c in pq.read_table(layout.chapters).to_pylist() if c["kept"]]
    dropped = [c["chapter_id"] for c in pq.read_table(layout.chapters).to_pylist() if not c["kept"]]
    for chapter_id in (kept[0], dropped[0]):
        marker_path(chapter_marker(layout, chapter_id)).unlink()  # as if killed before the marker
    layout.pagestore_chapter(kept[0]).unlink()
    part_path(layout.pages, dropped[0]).write_bytes(b"partial garbage from a killed writer")
    (layout.pages / ".x.parquet.tmp-123-abcd").write_bytes(b"leftover temporary file")
    (copy / SUMMARY).unlink()
    summary = run_ingest(info.root, copy, local=True, verbose=False)
    assert summary["run"]["chapters_processed"] == 2
    assert summary["run"]["chapters_reused"] == summary["chapters"]["total"] - 2
    assert _hashes(copy) == _hashes(out)


def test_kill_mid_run_then_rerun(ingested, tmp_path, repo_root) -> None:
    info, reference, _ = ingested
    out = tmp_path / "out"
    command = [sys.executable, "-m", "jobs.ingest", "--input", str(info.root), "--output", str(out), "--local"]
    process = subprocess.Popen(command, cwd=repo_root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "ingest" / "markers").glob("*.done.json")) and time.monotonic() < deadline:
            assert process.poll() is None, "the job ended before any chapter was done"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert not (out / SUMMARY).exists(), "the kill came after the end of the run"
    done_before = len(list((out / "ingest" / "markers").glob("*.done.json")))
    summary = run_ingest(info.root, out, local=True, verbose=False)
    assert summary["run"]["chapters_reused"] == done_before >= 1
    assert _hashes(out) == _hashes(reference)


def test_changed_options_redo_chapters_and_drop_stale_store(ingested, tmp_path) -> None:
    info, out, _ = ingested
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    summary = run_ingest(info.root, copy, options=IngestOptions(min_color_pages=100), local=True, verbose=False)
    assert summary["run"]["chapters_reused"] == 0 and summary["chapters"]["kept"] == 0
    assert not list((copy / "pagestore").glob("*.parquet"))
    assert not any(pq.read_table(copy / "pages.parquet").column("stored").to_pylist())


def test_changed_pages_reingest_only_their_chapters(ingested, tmp_path) -> None:
    info, out, _ = ingested
    dump = tmp_path / "dump"
    shutil.copytree(info.root, dump)  # copies keep sizes and modification times: the same chapter signatures
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    assert run_ingest(dump, copy, local=True, verbose=False)["run"]["chapters_processed"] == 0
    labels = _labels(info)
    kept_folder = "s1/ch001"
    replaced = next(
        source
        for source, label in labels.items()
        if label["chapter_source"] == kept_folder and label["is_color"] and source.endswith((".png", ".jpg"))
    )
    Image.new("RGB", (64, 96), (128, 128, 128)).save(dump / replaced)  # a colour page replaced by a grey one
    archive = dump / "s2" / "ch003.cbz"
    with zipfile.ZipFile(archive) as old:
        members = [(member, old.read(member)) for member in old.infolist()]
    with zipfile.ZipFile(archive, "w") as new:
        for member, data in members:
            new.writestr(member, data)
        new.writestr("zz_added.png", _png((250, 0, 0)))

    summary = run_ingest(dump, copy, local=True, verbose=False)
    assert summary["run"]["chapters_processed"] == 2
    assert summary["run"]["chapters_reused"] == summary["chapters"]["total"] - 2
    assert summary["run"]["chapters_vouched"] == summary["chapters"]["total"] - 2  # the ledger: no marker read
    layout = DataLayout.at(copy)
    pages = {p["source"]: p for p in pq.read_table(layout.pages).to_pylist()}
    assert pages[replaced]["is_color"] is False and not pages[replaced]["stored"]
    assert pages["s2/ch003.cbz/zz_added.png"]["status"] == STATUS_OK
    assert pages["s2/ch003.cbz/zz_added.png"]["is_color"] is True
    stored_before = set(load_chapter_images(DataLayout.at(out), stable_id(kept_folder)))
    stored = set(load_chapter_images(layout, stable_id(kept_folder)))  # the chapter's page-store file, replaced
    assert stored == stored_before - {pages[replaced]["page_id"]} and pages[replaced]["page_id"] in stored_before
    fresh = tmp_path / "fresh"
    run_ingest(dump, fresh, local=True, verbose=False)
    assert _hashes(copy) == _hashes(fresh)  # as if the changed dump had been ingested from scratch
    assert run_ingest(dump, copy, local=True, verbose=False)["run"]["chapters_processed"] == 0


def test_the_ledger_vouches_for_unchanged_chapters_until_a_run_is_killed(ingested, tmp_path) -> None:
    info, out, _ = ingested
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    layout = DataLayout.at(copy)
    chapter_id = sorted(kept_chapter_ids(layout))[0]
    marker = marker_path(chapter_marker(layout, chapter_id))
    marker.write_text("{not json")  # never read while the ledger vouches for the chapter
    summary = run_ingest(info.root, copy, local=True, verbose=False)
    total = summary["chapters"]["total"]
    assert summary["run"]["chapters_vouched"] == total and summary["run"]["chapters_processed"] == 0
    assert summary["tables"] == json.loads((out / SUMMARY).read_text())["tables"]
    ledger = layout.ledger("ingest")
    written = ledger.stat().st_mtime_ns
    run_ingest(info.root, copy, local=True, verbose=False)
    assert ledger.stat().st_mtime_ns == written  # a run that changed nothing leaves the ledger as it was
    (copy / SUMMARY).unlink()  # as after a killed run: the ledger is not trusted, every marker is read
    summary = run_ingest(info.root, copy, local=True, verbose=False)
    assert summary["run"]["chapters_vouched"] == 0 and summary["run"]["chapters_processed"] == 1
    assert json.loads(marker.read_text())["chapter_id"] == chapter_id
    assert _hashes(copy) == _hashes(out)


def test_a_trial_limit_over_a_fuller_output_is_refused(ingested, tmp_path) -> None:
    info, out, _ = ingested
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = _hashes(copy)
    with pytest.raises(PreconditionError, match=r"--limit 2: .* already holds 5 ingested chapters outside"):
        run_ingest(info.root, copy, local=True, verbose=False, limit=2)
    assert _hashes(copy) == before
    fresh = tmp_path / "fresh"
    assert run_ingest(info.root, fresh, local=True, verbose=False, limit=2)["chapters"]["total"] == 2
    assert run_ingest(info.root, fresh, local=True, verbose=False, limit=2)["run"]["chapters_processed"] == 0


def test_failed_chapter_task_leaves_the_summary_incomplete(tmp_path) -> None:
    root = tmp_path / "dump"
    for chapter in ("a", "b"):
        (root / "s1" / chapter).mkdir(parents=True)
        (root / "s1" / chapter / "1.png").write_bytes(_png((128, 128, 128)))
    out = tmp_path / "out"
    blocked = part_path(DataLayout.at(out).pages, stable_id("s1/b"))
    blocked.mkdir(parents=True)  # the chapter's pages part cannot be written: its task fails
    args = ["--input", str(root), "--output", str(out), "--local", "--min-color-pages", "1"]
    assert run_job(ingest_main, args, prog="python -m jobs.ingest") == 1
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["complete"] is False and summary["run"]["chapters_failed"] == 1
    chapters = {c["source"]: c for c in pq.read_table(out / "chapters.parquet").to_pylist()}
    assert chapters["s1/b"]["status"] == STATUS_ERROR and "IsADirectoryError" in chapters["s1/b"]["error"]
    blocked.rmdir()
    rerun = run_ingest(root, out, options=IngestOptions(min_color_pages=1), local=True, verbose=False)
    assert rerun["complete"] is True and rerun["run"]["chapters_processed"] == 1
    assert rerun["run"]["chapters_reused"] == 1


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 60), color).save(buf, format="PNG")
    return buf.getvalue()


def test_unreadable_chapter_and_escaping_member_become_rows(tmp_path) -> None:
    root = tmp_path / "dump"
    (root / "s1" / "ok").mkdir(parents=True)
    (root / "s1" / "ok" / "1.png").write_bytes(_png((128, 128, 128)))
    (root / "s1" / "corrupt.cbz").write_bytes(b"PK\x03\x04 truncated archive")
    with zipfile.ZipFile(root / "s1" / "slip.cbz", "w") as archive:
        archive.writestr("../../outside.png", _png((250, 0, 0)))
        archive.writestr("2.png", _png((0, 0, 250)))
        archive.writestr("3.png", _png((0, 250, 0)))
    raw = (root / "s1" / "slip.cbz").read_bytes()
    flipped = raw.index(_png((0, 250, 0))) + 40  # a stored member's byte: its CRC-32 no longer matches
    (root / "s1" / "slip.cbz").write_bytes(raw[:flipped] + bytes([raw[flipped] ^ 0xFF]) + raw[flipped + 1 :])
    out = tmp_path / "out"
    argv = ["--input", str(root), "--output", str(out), "--local", "--min-color-pages", "1"]
    assert run_job(ingest_main, argv, prog="python -m jobs.ingest") == 0
    chapters = {c["source"]: c for c in pq.read_table(out / "chapters.parquet").to_pylist()}
    corrupt = chapters["s1/corrupt.cbz"]
    assert corrupt["status"] == STATUS_ERROR and not corrupt["kept"] and corrupt["n_pages"] == 0
    assert "s1/corrupt.cbz: cannot read archive: BadZipFile" in corrupt["error"]
    pages = {p["source"]: p for p in pq.read_table(out / "pages.parquet").to_pylist()}
    slip = pages["s1/slip.cbz/../../outside.png"]
    assert slip["status"] == STATUS_ERROR and "'..' component escapes the archive" in slip["error"]
    assert pages["s1/slip.cbz/2.png"]["status"] == STATUS_OK and pages["s1/ok/1.png"]["is_color"] is False
    bad_crc = pages["s1/slip.cbz/3.png"]
    assert bad_crc["status"] == STATUS_ERROR and "s1/slip.cbz/3.png: corrupt archive member" in bad_crc["error"]
    assert "Bad CRC-32" in bad_crc["error"]
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["chapters"]["error"] == 1 and summary["pages"]["error"] == 2
    assert summary["complete"] is True  # unreadable items are rows, not failed tasks
    before = _hashes(out)
    rerun = run_ingest(root, out, options=IngestOptions(min_color_pages=1), local=True, verbose=False)
    assert rerun["run"]["chapters_processed"] == 1 and rerun["run"]["chapters_reused"] == 2  # unreadable: retried
    assert _hashes(out) == before


def test_job_arguments() -> None:
    args = parse_args(["--input", "in", "--output", "out"])
    assert (args.min_color_pages, args.store_encoding, args.chapters_per_task, args.local) == (21, "jpeg", 4, False)
    args = parse_args(
        ["--input", "in", "--output", "out", "--store-longest-side", "0", "--limit", "3", "--ray-address", "auto"]
    )
    assert (args.store_longest_side, args.limit, args.ray_address) == (0, 3, "auto")
    with pytest.raises(SystemExit):
        parse_args(["--input", "in", "--output", "out", "--min-color-pages", "0"])
