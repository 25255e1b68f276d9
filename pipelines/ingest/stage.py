"""The ingestion job: raw chapters in, a pages table, a chapters table and a page store of colour frames out.

The unit of work is a chapter, listed in a manifest before any page is decoded. A worker reads its chapter's
pages in reading order, decodes each small and classifies it, decides whether the chapter is kept (at least
`min_color_pages` colour pages: a frame plus its references), writes the kept chapter's colour pages to the page
store once (full quality, upright RGB), then its parts of the pages and chapters tables (`pages.parquet/` and
`chapters.parquet/`, folders of one part per chapter), then its completion marker with its counts and its parts'
sha256. The driver lists the series and chapter folders once and holds one small record per chapter: the
chapters' signatures and markers are read by Ray tasks, and the summary and the tables' fingerprints come from
the records, so no table is ever rewritten or hashed whole. Every output name derives from the input, so a rerun
rewrites the same bytes and skips the chapters already marked done with the same options and the same chapter
signature (see `pipelines.core.sources.chapter_signature`): a chapter whose pages were added or replaced since is
ingested again.
The summary's `complete` is false when a chapter's task failed, so a later run (or the whole-pipeline job) knows
to retry it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.core.decode import (
    DEFAULT_ANALYSIS_SIDE,
    DEFAULT_MAX_PIXELS,
    DecodeError,
    ImageInfo,
    decode_for_analysis,
    decode_upright,
)
from pipelines.core.errors import PreconditionError
from pipelines.core.layout import DataLayout
from pipelines.core.ledger import INGEST_LEDGER, LedgerEntry, chapter_key, read_ledger, vouched, write_ledger
from pipelines.core.pagestore import ENCODINGS, encode_page, ingested_chapter_ids, write_chapter_pages
from pipelines.core.schemas import CHAPTERS, COLOR_FEATURE_FIELDS, PAGES, STATUS_ERROR, STATUS_OK, table_from_rows
from pipelines.core.sources import (
    DEFAULT_MAX_FILE_BYTES,
    ChapterEntry,
    ChapterListing,
    ChapterReader,
    InputRoot,
    PageEntry,
    PageReadError,
    chapter_signature,
    layout_problem,
    list_chapters,
    manifest_table,
)
from pipelines.core.storage import (
    TMP_TAG,
    atomic_write_json,
    is_done,
    marker_path,
    part_path,
    purge_chapter_files,
    read_json,
    read_parquet,
    stable_hash,
    sweep_tmp,
    tables_fingerprint,
    write_marker,
    write_parquet,
    write_part,
)
from pipelines.ingest.color import ColorThresholds, FeatureConfig, classify, page_features
from pipelines.runtime.distributor import RunReport, Unit, map_in_tasks, run_units
from pipelines.runtime.heap import runs_with_frozen_heap
from pipelines.runtime.preconditions import check_input_root, check_output_creatable, created_folder

STAGE = "ingest"
DEFAULT_MIN_COLOR_PAGES = 21  # a training frame plus 20 reference pages from the same chapter
DEFAULT_STORE_LONGEST_SIDE = 2048  # room for the 1280x2000 inference size; frames are fitted later
DEFAULT_CHAPTERS_PER_TASK = 4
FEATURE_NAMES = [f.name for f in COLOR_FEATURE_FIELDS]
MARKER_COUNTS = ("n_pages", "n_color", "n_bw", "n_error", "kept", "n_stored")  # a chapter's counts in its marker
FEATURE_TYPES = {f.name: f.type for f in COLOR_FEATURE_FIELDS}


@dataclass(frozen=True)
class IngestOptions:
    """Everything that changes the outputs; its fingerprint is stored in each chapter's completion marker."""

    min_color_pages: int = DEFAULT_MIN_COLOR_PAGES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    analysis_side: int = DEFAULT_ANALYSIS_SIDE
    store_longest_side: int | None = DEFAULT_STORE_LONGEST_SIDE
    store_encoding: str = "jpeg"
    store_quality: int = 95
    features: FeatureConfig = field(default_factory=FeatureConfig)
    thresholds: ColorThresholds = field(default_factory=ColorThresholds)

    def __post_init__(self) -> None:
        if self.store_encoding not in ENCODINGS:
            raise ValueError(f"store encoding {self.store_encoding!r} is not one of {ENCODINGS}")
        if self.min_color_pages < 1:
            raise ValueError(f"min_color_pages must be at least 1, got {self.min_color_pages}")
        if self.store_longest_side is not None and self.store_longest_side < 16:
            raise ValueError(f"store_longest_side must be at least 16 (or None), got {self.store_longest_side}")
        if self.max_pixels < 1 or self.max_file_bytes < 1 or self.analysis_side < 16:
            raise ValueError("max_pixels and max_file_bytes must be positive and analysis_side at least 16")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        return stable_hash(self.to_dict(), 16)


@dataclass(frozen=True)
class ChapterTask:
    """What a worker needs for one chapter (picklable, small).

    The chapter's signature is taken by the task before it reads a page and goes into the completion marker: if
    the chapter changes while it is processed, the next run sees a different signature and redoes it.
    """

    input_root: str
    output: str
    chapter: ChapterEntry
    options: IngestOptions
    signature: str | None = None  # taken before this run (the check compares the marker with it); None: take it


# ----------------------------------------------------------------------------------------------------------------
# Worker


def _page_row(chapter: ChapterEntry, page: PageEntry) -> dict[str, Any]:
    row: dict[str, Any] = {
        "page_id": page.page_id,
        "chapter_id": chapter.chapter_id,
        "series": chapter.series,
        "chapter": chapter.chapter,
        "page_index": page.page_index,
        "source": page.source,
        "file_bytes": page.file_bytes,
        "format": None,
        "mode": None,
        "width": None,
        "height": None,
        "is_color": None,
        "color_score": None,
        "stored": False,
        "status": STATUS_OK,
        "error": None,
    }
    row.update(dict.fromkeys(FEATURE_NAMES))
    return row


def _set_info(row: dict[str, Any], info: ImageInfo) -> None:
    row.update(format=info.format, mode=info.mode, width=info.width, height=info.height)


def _fail(row: dict[str, Any], error: str) -> None:
    row.update(status=STATUS_ERROR, error=error, is_color=None, color_score=None, stored=False)


def analyse_page(reader: ChapterReader, page: PageEntry, chapter: ChapterEntry, options: IngestOptions) -> dict:
    """One pages-table row: header info, features and the colour decision, or status error with the reason."""
    row = _page_row(chapter, page)
    try:
        data = reader.read(page)
        if row["file_bytes"] is None:
            row["file_bytes"] = len(data)
        small, info = decode_for_analysis(data, page.source, max_pixels=options.max_pixels, side=options.analysis_side)
    except (PageReadError, DecodeError) as exc:
        _fail(row, str(exc))
        return row
    _set_info(row, info)
    try:
        features = _as_stored(page_features(small, options.features))
    except Exception as exc:  # noqa: BLE001 - a classifier failure on one odd page must not lose the chapter
        _fail(row, f"{page.source}: colour classifier failed: {type(exc).__name__}: {exc}")
        return row
    score, is_color = classify(features, options.thresholds)
    row.update(features)
    row.update(color_score=score, is_color=is_color)
    return row


def _as_stored(features: dict[str, Any]) -> dict[str, Any]:
    """Round features to their column types first, so a re-cut from the table reproduces every decision."""
    return {
        name: float(np.float32(value)) if FEATURE_TYPES[name] == pa.float32() else value
        for name, value in features.items()
    }


def normalise_for_store(data: bytes, source: str, options: IngestOptions) -> tuple[int, int, bytes]:
    """Full-quality decode of a page -> (width, height, encoded bytes): upright RGB, bounded size, never upscaled."""
    image, _ = decode_upright(data, source, max_pixels=options.max_pixels, longest_side=options.store_longest_side)
    return image.width, image.height, encode_page(image, options.store_encoding, options.store_quality)


def store_page(reader: ChapterReader, page: PageEntry, chapter_id: str, options: IngestOptions) -> dict[str, Any]:
    """A page-store row for a kept colour page."""
    width, height, encoded = normalise_for_store(reader.read(page), page.source, options)
    return {
        "page_id": page.page_id,
        "chapter_id": chapter_id,
        "width": width,
        "height": height,
        "encoding": options.store_encoding,
        "image": encoded,
    }


def _chapter_row(chapter: ChapterEntry, rows: list[dict[str, Any]], kept: bool, reason: str | None) -> dict[str, Any]:
    return {
        **chapter.row(),
        "n_pages": len(rows),
        "n_color": _n_color(rows),
        "n_bw": sum(r["is_color"] is False for r in rows),
        "n_error": sum(r["status"] == STATUS_ERROR for r in rows),
        "kept": kept,
        "reason": reason,
        "status": STATUS_OK,
        "error": None,
    }


def _n_color(rows: list[dict[str, Any]]) -> int:
    return sum(r["is_color"] is True for r in rows)


def _not_kept_reason(n_color: int, options: IngestOptions) -> str | None:
    if n_color >= options.min_color_pages:
        return None
    return f"{n_color} colour pages, fewer than min_color_pages={options.min_color_pages}"


def _store_color_pages(
    reader: ChapterReader, rows: list[dict[str, Any]], chapter_id: str, options: IngestOptions
) -> list[dict[str, Any]]:
    """Page-store rows for the colour pages; a page that fails its full decode becomes an error row instead."""
    pages = {page.page_id: page for page in reader.pages}
    stored = []
    for row in rows:
        if row["is_color"]:
            try:
                stored.append(store_page(reader, pages[row["page_id"]], chapter_id, options))
                row["stored"] = True
            except (PageReadError, DecodeError) as exc:
                _fail(row, f"page store: {exc}")
    return stored


def _read_chapter(
    root: InputRoot, chapter: ChapterEntry, options: IngestOptions
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(chapter row, page rows, page-store rows) of one chapter; an unreadable chapter is an error row."""
    with contextlib.ExitStack() as stack:
        try:
            reader = stack.enter_context(ChapterReader(root, chapter, options.max_file_bytes))
        except Exception as exc:  # noqa: BLE001 - an unreadable chapter (corrupt zip, vanished folder) is a row
            chapter_row = _chapter_row(chapter, [], False, "chapter could not be read")
            chapter_row.update(
                status=STATUS_ERROR, error=f"{chapter.source}: cannot read {chapter.kind}: {type(exc).__name__}: {exc}"
            )
            return chapter_row, [], []
        rows = [analyse_page(reader, page, chapter, options) for page in reader.pages]
        stored = []
        if _not_kept_reason(_n_color(rows), options) is None:
            stored = _store_color_pages(reader, rows, chapter.chapter_id, options)
    reason = _not_kept_reason(_n_color(rows), options)
    if reason is not None:  # a store failure can drop a chapter under the minimum: then nothing is stored
        stored = []
        for row in rows:
            row["stored"] = False
    return _chapter_row(chapter, rows, reason is None, reason if rows else "no image files"), rows, stored


def process_chapter(task: ChapterTask) -> dict[str, Any]:
    """Ingest one chapter and write its outputs (page store, table parts, marker last); returns its record."""
    chapter, options = task.chapter, task.options
    layout = DataLayout.at(task.output)
    chapter_id = chapter.chapter_id
    root = InputRoot(task.input_root)  # an unreachable input root fails the task: nothing is marked done
    signature = chapter_signature(root, chapter)
    chapter_row, rows, stored = _read_chapter(root, chapter, options)
    store_path = layout.pagestore_chapter(chapter_id)
    if stored:
        write_chapter_pages(layout, chapter_id, stored)
    else:
        store_path.unlink(missing_ok=True)  # a previous run with other options may have kept this chapter
    parts = {
        "chapters": write_part(layout.chapters, chapter_id, table_from_rows([chapter_row], CHAPTERS), CHAPTERS),
        "pages": write_part(layout.pages, chapter_id, table_from_rows(rows, PAGES), PAGES),
    }
    counts = {k: chapter_row[k] for k in MARKER_COUNTS if k != "n_stored"}
    counts["n_stored"] = len(stored)
    status = chapter_row["status"]
    marker = {"chapter_id": chapter_id, "options": options.fingerprint(), "signature": signature, "status": status}
    write_marker(chapter_marker(layout, chapter_id), {**marker, **counts, "parts": parts})
    return {**counts, "chapter_status": status, "parts": parts, "signature": signature}


def ingest_unit(unit: Unit) -> dict[str, Any]:
    """The distributor's worker: a Unit whose payload is a ChapterTask."""
    return process_chapter(unit.payload)


@functools.lru_cache(maxsize=4)
def _input_root(uri: str) -> InputRoot:
    """One InputRoot per check process (opening one checks the root is a folder: once, not per chapter)."""
    return InputRoot(uri)


def chapter_marker(layout: DataLayout, chapter_id: str) -> Path:
    """The output a chapter's completion marker is named after (`ingest/markers/<chapter_id>.done.json`)."""
    return layout.ingest_markers / chapter_id


def _marker(layout: DataLayout, task: ChapterTask, fingerprint: str) -> dict[str, Any] | None:
    """The chapter's completion marker if written with these options (`fingerprint`) and the chapter's current
    signature (taken now: this runs in a check task), with both its table parts and its page-store file (when it
    stored pages) in place; else None."""
    output = chapter_marker(layout, task.chapter.chapter_id)
    if not is_done(output):
        return None
    try:
        marker = read_json(marker_path(output))
    except (OSError, ValueError):
        return None
    if marker.get("options") != fingerprint or "parts" not in marker:
        return None
    signature = task.signature or chapter_signature(_input_root(task.input_root), task.chapter)
    if marker.get("signature") != signature:
        return None
    chapter_id = task.chapter.chapter_id
    parts_there = part_path(layout.pages, chapter_id).exists() and part_path(layout.chapters, chapter_id).exists()
    stored_there = not marker.get("n_stored") or layout.pagestore_chapter(chapter_id).exists()
    return marker if parts_there and stored_there else None


def chapter_done(layout: DataLayout, task: ChapterTask, fingerprint: str) -> dict[str, Any] | None:
    """Skip on rerun: finished with the same options and contents, and readable; returns the marker (the
    chapter's record) then. Unreadable chapters are retried each run (a mount that was down or an archive that was
    still being copied may be fine now); other options or changed pages redo it."""
    marker = _marker(layout, task, fingerprint)
    return marker if marker is not None and marker.get("status") == STATUS_OK else None


# ----------------------------------------------------------------------------------------------------------------
# Driver


def _failed_chapter(layout: DataLayout, chapter: ChapterEntry, error: str) -> dict[str, Any]:
    """A chapter whose task crashed: its old outputs go (marker first) and its chapters part becomes an error row;
    returns its record. Only failed chapters cost the driver a write."""
    chapter_id = chapter.chapter_id
    marker_path(chapter_marker(layout, chapter_id)).unlink(missing_ok=True)
    for stale in (part_path(layout.pages, chapter_id), layout.pagestore_chapter(chapter_id)):
        with contextlib.suppress(OSError):  # whatever made the task fail may block this too: the row says it
            stale.unlink(missing_ok=True)
    row = _chapter_row(chapter, [], False, "chapter task failed")
    row.update(status=STATUS_ERROR, error=f"{chapter.source}: {error}")
    part = write_part(layout.chapters, chapter_id, table_from_rows([row], CHAPTERS), CHAPTERS)
    counts = {k: row[k] for k in ("n_pages", "n_color", "n_bw", "n_error", "kept")}
    return {**counts, "n_stored": 0, "chapter_status": STATUS_ERROR, "parts": {"chapters": part}}


def _records(layout: DataLayout, tasks: list[ChapterTask], report: RunReport) -> list[dict[str, Any]]:
    """One small record per chapter in manifest order: its counts, status and parts' sha256, from the task that
    processed it, the marker a check task read, or (a crashed task) the error part written here."""
    results = {r["key"]: r for r in report.results}
    records = []
    for task in tasks:
        chapter_id = task.chapter.chapter_id
        if chapter_id in report.skipped_records:
            marker = report.skipped_records[chapter_id]
            records.append({**marker, "chapter_status": marker["status"]})
            continue
        result = results[chapter_id]
        if result.get("status") == STATUS_ERROR:
            error = result.get("error") or "no output: the chapter's task did not finish"
            records.append(_failed_chapter(layout, task.chapter, error))
        else:
            records.append(result)
    return records


def _ledger_key(fingerprint: str, signature: str | None) -> str:
    """A chapter is current when ingested with these options from pages with this signature."""
    return chapter_key(fingerprint, signature)


def _ledger_entries(
    tasks: list[ChapterTask],
    records: list[dict[str, Any]],
    fingerprint: str,
    kept: dict[str, LedgerEntry],
) -> dict[str, LedgerEntry]:
    """The ledger after this run: every chapter ingested fine, keyed by the signature its record was made from
    (a chapter that changed while its task ran is checked again next run); `kept`: the entries of the chapters the
    old ledger vouched for, as they were. Unreadable chapters get no entry: they are retried every run."""
    entries = {}
    for task, record in zip(tasks, records, strict=True):
        if task.chapter.chapter_id in kept:
            entries[task.chapter.chapter_id] = kept[task.chapter.chapter_id]
            continue
        if record.get("chapter_status") != STATUS_OK or not record.get("signature"):
            continue
        fields = {k: record[k] for k in MARKER_COUNTS}
        marker = {**fields, "parts": record["parts"], "signature": record["signature"], "status": STATUS_OK}
        marker.update(chapter_id=task.chapter.chapter_id, options=fingerprint)  # the marker's fields, nothing else
        entries[task.chapter.chapter_id] = LedgerEntry(_ledger_key(fingerprint, record["signature"]), marker)
    return entries


def _refuse_mixed_trial(layout: DataLayout, limited: list[ChapterEntry], listed_ids: set[str], limit: int) -> None:
    """A `--limit` trial over an output that already holds other listed chapters would leave their parts in the
    tables beside the trial's: refused before anything is written."""
    inside = {c.chapter_id for c in limited}
    outside = sorted((ingested_chapter_ids(layout) & listed_ids) - inside)
    if outside:
        raise PreconditionError(
            f"--limit {limit}: {layout.root} already holds {len(outside)} ingested chapters outside the first {limit} "
            f"(e.g. {outside[0]}); a trial run would mix its tables with them: use a new --output, or drop --limit"
        )


def _remove_legacy_tables(layout: DataLayout) -> None:
    """An output folder of an earlier version kept its tables as single files consolidated from per-chapter
    parts in ingest/pages and ingest/chapters; its chapters have no marker here, so they are ingested again
    and the old files go."""
    for table in (layout.pages, layout.chapters):
        if table.is_file():
            table.unlink()
    for folder in layout.legacy_ingest_parts:
        shutil.rmtree(folder, ignore_errors=True)


def _sweep_tmp(layout: DataLayout) -> None:
    """Remove temporary files a killed ingestion left, only in this stage's folders (other stages may be running)."""
    for folder in (layout.ingest_markers, layout.pages, layout.chapters, layout.pagestore):
        sweep_tmp(folder)
    for final in (layout.manifest, layout.summary(STAGE)):
        for leftover in final.parent.glob(f".{final.name}{TMP_TAG}*"):
            leftover.unlink(missing_ok=True)


def purge_taken_down(layout: DataLayout, listed_ids: set[str], held: list[str] | None = None) -> set[str]:
    """Delete the page store part, table parts and marker of every chapter no longer in the input (`listed_ids`);
    returns their ids. `held`: the chapters the folders can hold (a completed run's manifest), so none is listed.
    Later stages purge their own files of chapters without an ingestion marker."""
    purged: set[str] = set()
    for folder in (layout.ingest_markers, layout.pages, layout.chapters, layout.pagestore):  # markers first
        purged |= purge_chapter_files(folder, listed_ids, held)
    return purged


@runs_with_frozen_heap
def run_ingest(
    input_root: str | os.PathLike,
    output: str | os.PathLike,
    options: IngestOptions | None = None,
    *,
    chapters_per_task: int = DEFAULT_CHAPTERS_PER_TASK,
    limit: int | None = None,
    local: bool = False,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    task_memory: int | None = None,
    max_retries: int | None = None,
    verbose: bool = True,
    listing: ChapterListing | None = None,
    verify: bool = False,
) -> dict[str, Any]:
    """Run the ingestion of `input_root` into `output`; returns the run summary (also written as JSON).

    `local=True` processes chapters in this process without Ray (debugging, tiny dumps). Otherwise Ray runs the
    chapters as tasks of `chapters_per_task` chapters: on the cluster at `ray_address` (or RAY_ADDRESS, set by
    `ray job submit`), else on a local Ray started in-process. `verify` runs as after a killed run: every
    chapter's marker and files are checked (its ledger and the previous manifest are not trusted) and only what is
    missing or stale is redone.
    """
    options = options or IngestOptions()
    started = time.perf_counter()
    # preconditions, before any folder is created or Ray starts; workers get absolute paths (another cwd or node)
    input_uri = check_input_root(input_root)
    output = str(check_output_creatable(output))
    root = InputRoot(input_uri)
    chapters = listing.chapters if listing is not None else list_chapters(root)
    if not chapters:
        raise PreconditionError(f"--input {input_root}: {layout_problem(root)}")
    listed_ids = {chapter.chapter_id for chapter in chapters}  # before --limit: a trial run purges nothing it skips
    if limit is not None:
        chapters = chapters[: max(0, limit)]
        _refuse_mixed_trial(DataLayout.at(output), chapters, listed_ids, limit)
    run = {"listed_ids": listed_ids, "chapters_per_task": chapters_per_task, "local": local, "ray_address": ray_address}
    run.update(num_cpus=num_cpus, task_memory=task_memory, max_retries=max_retries, verbose=verbose, started=started)
    run.update(signatures=listing.signatures if listing is not None else None, verify=verify)
    with created_folder(output):
        return _run_ingest(root, input_uri, output, chapters, options, **run)


def _run_ingest(
    root: InputRoot,
    input_uri: str,
    output: str,
    chapters: list[ChapterEntry],
    options: IngestOptions,
    *,
    listed_ids: set[str],
    chapters_per_task: int,
    local: bool,
    ray_address: str | None,
    num_cpus: int | None,
    task_memory: int | None,
    max_retries: int | None,
    verbose: bool,
    started: float,
    signatures: dict[str, str] | None,
    verify: bool,
) -> dict[str, Any]:
    layout = DataLayout.at(output)
    summary_path = layout.summary(STAGE)
    _remove_legacy_tables(layout)
    # after a killed run: its temporary files go, and its ledger is not trusted (every marker is read)
    completed = not verify and summary_path.exists() and layout.manifest.exists()
    ledger = read_ledger(layout.ledger(INGEST_LEDGER)) if completed else {}
    if not completed:
        _sweep_tmp(layout)
    # what a completed run left is named by its manifest: only those chapters' files are looked at, no listing
    held = read_parquet(layout.manifest).column("chapter_id").to_pylist() if completed else None
    summary_path.unlink(missing_ok=True)  # the summary marks a complete run: not until this one is
    purged = purge_taken_down(layout, listed_ids, held)
    write_parquet(manifest_table(chapters), layout.manifest)
    if not local:
        from pipelines.runtime.ray import init_ray

        init_ray(ray_address, num_cpus=num_cpus)
    if signatures is None:  # a stat of every page, in tasks: what the ledger keys on and the checks compare with
        taken = map_in_tasks(functools.partial(chapter_signature, root), chapters, desc="signatures", local=local)
        signatures = {c.chapter_id: s for c, s in zip(chapters, taken, strict=True) if s is not None}
    tasks = [ChapterTask(input_uri, output, c, options, signatures.get(c.chapter_id)) for c in chapters]
    listed = time.perf_counter()

    fingerprint = options.fingerprint()
    keys = {t.chapter.chapter_id: _ledger_key(fingerprint, t.signature) for t in tasks if t.signature}
    units = [Unit(key=task.chapter.chapter_id, payload=task) for task in tasks]
    trusted = vouched(ledger, keys)
    report = run_units(
        units,
        ingest_unit,
        is_done=lambda unit: chapter_done(layout, unit.payload, fingerprint),
        desc="ingest chapters",
        units_per_task=chapters_per_task,
        memory=task_memory,
        max_retries=max_retries,
        local=local,
        vouched=trusted,
    )
    records = _records(layout, tasks, report)
    ids = [task.chapter.chapter_id for task in tasks]
    tables = {
        name: tables_fingerprint({c: r["parts"][name] for c, r in zip(ids, records, strict=True) if name in r["parts"]})
        for name in ("pages", "chapters")
    }

    def total(key: str) -> int:
        return sum(int(r.get(key) or 0) for r in records)

    kept = sum(bool(r.get("kept")) for r in records)
    processed_pages = sum(int(r.get("n_pages", 0)) for r in report.results)
    summary = {
        "stage": STAGE,
        "complete": not report.failed,  # False: a chapter's task failed; the next run retries it
        "input": input_uri,
        "output": output,
        "options": options.to_dict(),
        "options_fingerprint": fingerprint,
        "chapters": {
            "total": len(records),
            "kept": kept,
            "dropped": len(records) - kept,
            "error": sum(r.get("chapter_status") == STATUS_ERROR for r in records),
        },
        "pages": {
            "total": total("n_pages"),
            "color": total("n_color"),
            "bw": total("n_bw"),
            "error": total("n_error"),
            "stored": total("n_stored"),
        },
        "tables": tables,  # fingerprints from the parts' sha256 (what later stages' fingerprints build on)
        "run": {
            "chapters_processed": len(report.results),
            "chapters_reused": len(report.skipped),
            "chapters_vouched": len(trusted),  # reused on the ledger's word: no marker read
            "chapters_failed": len(report.failed),
            "chapters_purged": len(purged),
            "failures": [{"chapter_id": r["key"], "error": r.get("error")} for r in report.failed],
            "faults": report.faults.as_dict(),
            "pages_processed": processed_pages,
            "listing_seconds": round(listed - started, 3),
            "processing_seconds": round(report.seconds, 3),
            "total_seconds": round(time.perf_counter() - started, 3),
            "pages_per_second": round(processed_pages / report.seconds, 2) if report.seconds > 0 else None,
            "mode": "local" if local else "ray",
            "chapters_per_task": chapters_per_task,
        },
    }
    kept_ids = sorted(
        c for c, r in zip(ids, records, strict=True) if r.get("kept") and r["chapter_status"] == STATUS_OK
    )
    atomic_write_json(layout.kept_chapters, kept_ids)
    entries = _ledger_entries(tasks, records, fingerprint, {c: ledger[c] for c in trusted})
    write_ledger(layout.ledger(INGEST_LEDGER), entries, ledger)
    atomic_write_json(summary_path, summary)
    if verbose:
        print(format_summary(summary), flush=True)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The final human-readable lines: counts and rates."""
    c, p, r = summary["chapters"], summary["pages"], summary["run"]
    rate = f"{r['pages_per_second']:.1f} pages/s" if r["pages_per_second"] else "no pages processed"
    lines = [
        f"ingest: {c['total']} chapters: {c['kept']} kept, {c['dropped']} dropped ({c['error']} unreadable)",
        f"ingest: {p['total']} pages: {p['color']} colour, {p['bw']} B&W, {p['error']} error; {p['stored']} stored",
        f"ingest: this run processed {r['chapters_processed']} chapters ({r['chapters_reused']} reused from an "
        f"earlier run, {r['chapters_failed']} failed), {r['pages_processed']} pages in "
        f"{r['processing_seconds']:.1f} s: {rate}",
        f"ingest: outputs in {summary['output']}",
    ]
    return "\n".join(lines)
