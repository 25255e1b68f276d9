"""A ColorFlow-Bench-shaped benchmark from held-out series: a folder to hand to inference and evaluation jobs.

ColorFlow-Bench (unreleased) holds 30 chapters not in training, each with 40 colour reference pages and 50
black-and-white pages in two styles (screenstyle and greyscale) with their colour ground truth; we add the
line-art family's two styles (sketch and shading) beside them. This builder
makes the same shape from the corpus: chapters are chosen (seeded) among the kept chapters of benchmark series
(held out of training and validation by `pipelines.shards.splits`) with at least `refs + bw` stored colour pages; in
each, a seeded draw picks `refs` reference pages and `bw` pages to turn black and white. Counts are options, so
small corpora get a smaller benchmark; a shortfall (fewer eligible chapters than asked) is reported, not hidden.

Folder layout (``OUT/benchmark/``, format version 2)::

    benchmark.json                     config, styles, chapters, counts, code version: written last
    <chapter_id>/index.json            the chapter's pages: refs, and per B&W page its ground truth and inputs
    <chapter_id>/refs/<page_id>.<ext>  colour reference pages as stored (original size, page-store bytes)
    <chapter_id>/gt/<page_id>.jpg      colour ground truth fitted to the benchmark size (JPEG q95, 4:4:4)
    <chapter_id>/bw_grey/<page_id>.png       its greyscale (ITU-R 601 luma), lossless
    <chapter_id>/bw_<style>/<page_id>.png    its screentone at the benchmark size, lossless; <style> names the
                                             renderer (``halftone`` or ``screenstyle``, the prefix of its id)
    <chapter_id>/bw_sketch/<page_id>.png     the line art of its greyscale (the screentone stage's extractor)
    <chapter_id>/bw_shading/<page_id>.png    that line art shaded by the greyscale (`screentone.shading`)
    <chapter_id>.done.json             the chapter's completion marker

B&W folders are named for what rendered them, and ``index.json`` lists each style with its folder and renderer
id (``"styles"``) and each B&W page's input per style (``"inputs"``), so readers take style names from the
index (`read_chapter_index`) and halftone pages are never scored as "screenstyle". Readers refuse another
format version with a clear error instead of guessing.

The benchmark size defaults to the GSRP output size (1.5x the training size, 768 x 1200): the B&W pages are what
the pipeline colours and the ground truth is aligned pixel for pixel, so PSNR/SSIM need no resampling.
Screentone and line art are made at that size and never resampled (an inference job that downsizes them for ICP
does so as it would with any scanned page; colorize's sketch and shading styles extract line art again from the
given page, as the released app does with any input). The ground truth and the grey and screentone inputs are the
same bytes with or without the line-art styles. References keep their stored size: retrieval fits them itself.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipelines.core.benchmark_format import (
    BENCHMARK_FORMAT_VERSION,
    EXTENSIONS,
    FOLDER_LAYOUT,
    GREY_STYLE,
    benchmark_styles,
    page_seed,
    read_chapter_index,
    style_of,
)
from pipelines.core.geometry import fit_image
from pipelines.core.layout import DataLayout
from pipelines.core.page_styles import line_art_frames, line_extractor_id
from pipelines.core.pagestore import decode_page, encode_page
from pipelines.core.schemas import PAGE_STORE, STATUS_OK
from pipelines.core.storage import (
    TMP_TAG,
    atomic_write_json,
    marker_path,
    publish_tree,
    read_json,
    read_parquet,
    read_table,
    write_marker,
)
from pipelines.runtime.distributor import Unit, run_units
from pipelines.shards.splits import hash_order


@dataclass(frozen=True)
class BenchmarkConfig:
    chapters: int = 30
    refs: int = 40
    bw: int = 50
    width: int = 768  # benchmark size of the B&W pages and their ground truth
    height: int = 1200
    seed: int = 0
    renderer: str = "halftone"  # screentone renderer spec (see screentone.render.make_renderer)
    line_extractor_weights: str | None = None  # erika.pth of the line-art styles (None: XDoG)
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        if self.chapters < 0 or self.refs < 1 or self.bw < 1:
            raise ValueError(f"benchmark needs chapters >= 0, refs >= 1, bw >= 1; got {self}")
        if self.width < 8 or self.height < 8:
            raise ValueError(f"benchmark size {self.width}x{self.height} is too small")

    @property
    def pages_per_chapter(self) -> int:
        return self.refs + self.bw


@dataclass(frozen=True)
class BenchChapter:
    chapter_id: str
    series: str
    chapter: str
    refs: tuple[tuple[str, int], ...]  # (page_id, page_index), in page order
    bw: tuple[tuple[str, int], ...]

    @property
    def page_ids(self) -> list[str]:
        return [p for p, _ in self.refs + self.bw]


@dataclass
class BenchmarkPlan:
    config: BenchmarkConfig
    chapters: list[BenchChapter]
    eligible: int  # eligible chapters in the benchmark series
    requested: int
    renderer_id: str = ""
    line_extractor_id: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def page_ids(self) -> list[str]:
        return [p for c in self.chapters for p in c.page_ids]


def frame_pages(pages: pa.Table, chapters: pa.Table) -> pa.Table:
    """Stored colour pages of kept chapters (the frames): page_id, chapter_id, series, chapter, page_index."""
    kept = chapters.filter(pc.and_(pc.equal(chapters["kept"], True), pc.equal(chapters["status"], STATUS_OK)))
    in_kept = pc.is_in(pages["chapter_id"], value_set=kept["chapter_id"].combine_chunks())
    mask = pc.and_(
        pc.and_(pc.equal(pages["status"], STATUS_OK), pc.equal(pages["is_color"], True)),
        pc.and_(pc.equal(pages["stored"], True), in_kept),
    )
    return pages.filter(mask).select(["page_id", "chapter_id", "series", "chapter", "page_index"])


PAGE_COLUMNS = ["page_id", "chapter_id", "series", "chapter", "page_index", "is_color", "stored", "status"]
CHAPTER_COLUMNS = ["chapter_id", "series", "kept", "status"]


def read_frames(
    layout: DataLayout, read: Callable[[Path, list[str]], pa.Table] | None = None
) -> tuple[pa.Table, pa.Table]:
    """(frames, chapters) of an ingested data folder, reading only the columns this stage uses (with `read(table,
    columns)`, by default `read_table` here)."""
    read = read or (lambda table, columns: read_table(table, columns=columns))
    pages = read(layout.pages, PAGE_COLUMNS)
    chapters = read(layout.chapters, CHAPTER_COLUMNS)
    return frame_pages(pages, chapters), chapters


def eligible_chapters(frames: pa.Table, config: BenchmarkConfig) -> dict[str, dict[str, Any]]:
    """chapter_id -> {series, chapter, pages: [(page_id, page_index)]} for chapters with enough colour pages."""
    by_chapter: dict[str, dict[str, Any]] = {}
    names = ("chapter_id", "series", "chapter", "page_id", "page_index")
    for chapter_id, series, chapter, page_id, page_index in zip(
        *(frames.column(name).to_pylist() for name in names), strict=True
    ):
        entry = by_chapter.get(chapter_id)
        if entry is None:
            entry = by_chapter[chapter_id] = {"series": series, "chapter": chapter, "pages": []}
        entry["pages"].append((page_id, page_index))
    return {cid: e for cid, e in sorted(by_chapter.items()) if len(e["pages"]) >= config.pages_per_chapter}


def eligible_per_series(eligible: dict[str, dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in eligible.values():
        counts[entry["series"]] = counts.get(entry["series"], 0) + 1
    return counts


def select_benchmark(
    eligible: dict[str, dict[str, Any]],
    bench_series: Iterable[str],
    config: BenchmarkConfig,
    frozen: Iterable[str] | None = None,
) -> BenchmarkPlan:
    """Seeded choice of chapters among the benchmark series' eligible chapters, and of their pages.

    `frozen` (the chapters of a benchmark already written) keeps that choice: new chapters never enter it, and
    only a chapter gone from the input (a takedown) leaves it."""
    bench_series = set(bench_series)
    candidates = [cid for cid, e in eligible.items() if e["series"] in bench_series]
    if frozen is not None:
        chosen = sorted(cid for cid in frozen if cid in eligible)
    else:
        chosen = sorted(hash_order(candidates, config.seed, "bench-chapter")[: config.chapters])
    chapters = []
    for cid in chosen:
        entry = eligible[cid]
        index_of = dict(entry["pages"])
        drawn = hash_order(index_of, config.seed, f"bench-pages:{cid}")
        refs = sorted(drawn[: config.refs], key=lambda p: (index_of[p], p))
        bw = sorted(drawn[config.refs : config.pages_per_chapter], key=lambda p: (index_of[p], p))
        chapters.append(
            BenchChapter(
                chapter_id=cid,
                series=entry["series"],
                chapter=entry["chapter"],
                refs=tuple((p, index_of[p]) for p in refs),
                bw=tuple((p, index_of[p]) for p in bw),
            )
        )
    plan = BenchmarkPlan(config=config, chapters=chapters, eligible=len(candidates), requested=config.chapters)
    if len(chapters) < config.chapters:
        plan.notes.append(
            f"shortfall: {len(chapters)} of {config.chapters} chapters; the benchmark series hold only "
            f"{len(candidates)} kept chapters with >= {config.pages_per_chapter} colour pages"
        )
    return plan


def _plan_fingerprint(plan: BenchmarkPlan) -> str:
    payload = {
        "config": {k: v for k, v in asdict(plan.config).items() if k != "line_extractor_weights"},
        "renderer_id": plan.renderer_id,
        "line_extractor_id": plan.line_extractor_id,
        "chapters": [asdict(c) for c in plan.chapters],
        "format": BENCHMARK_FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ChapterTask:
    data: str
    chapter: BenchChapter
    config: BenchmarkConfig
    fingerprint: str
    line_extractor_id: str


def _files_present(layout: DataLayout, chapter_id: str) -> bool:
    """The chapter's index and every file it names are there (a check after files were deleted by hand)."""
    folder = layout.benchmark / chapter_id
    try:
        index = read_chapter_index(layout.benchmark, chapter_id)
    except (OSError, ValueError):
        return False
    named = [ref["file"] for ref in index["refs"]]
    named += [name for page in index["bw"] for name in (page["gt"], *page["inputs"].values())]
    return all((folder / name).is_file() for name in named)


def _chapter_done(layout: DataLayout, chapter_id: str, fingerprint: str, verify: bool = False) -> bool:
    """Marked done for this plan; with `verify`, its files are there too."""
    marker = marker_path(layout.benchmark / chapter_id)
    done = marker.exists() and read_json(marker).get("fingerprint") == fingerprint
    return done and (not verify or _files_present(layout, chapter_id))


def write_chapter(task: ChapterTask) -> dict[str, Any]:
    """Write one benchmark chapter into a temporary folder, swap it in, then write its marker."""
    from model.line_extractor import LineExtractor
    from screentone.render import renderer_for

    layout = DataLayout.at(task.data)
    chapter, config = task.chapter, task.config
    store = read_parquet(layout.pagestore_chapter(chapter.chapter_id), PAGE_STORE)
    rows = {r["page_id"]: r for r in store.to_pylist()}
    missing = [p for p in chapter.page_ids if p not in rows]
    if missing:
        raise FileNotFoundError(f"chapter {chapter.chapter_id}: pages {missing[:5]} are not in its page store")
    renderer = renderer_for(config.renderer)
    lines = LineExtractor(config.line_extractor_weights)
    styles = benchmark_styles(renderer.id, task.line_extractor_id)
    tone_style = style_of(renderer.id)
    final = layout.benchmark / chapter.chapter_id
    tmp = final.with_name(f"{final.name}{TMP_TAG}{uuid.uuid4().hex[:8]}")
    for sub in ("refs", "gt", *(s["folder"] for s in styles.values())):
        (tmp / sub).mkdir(parents=True)
    refs = []
    for page_id, page_index in chapter.refs:
        name = f"refs/{page_id}.{EXTENSIONS[rows[page_id]['encoding']]}"
        (tmp / name).write_bytes(rows[page_id]["image"])
        refs.append({"page_id": page_id, "page_index": page_index, "file": name})
    bw = []
    for page_id, page_index in chapter.bw:
        color = fit_image(decode_page(rows[page_id]["image"]), config.width, config.height)
        tone = renderer.render(np.asarray(color), page_seed(config.seed, page_id))
        gt = f"gt/{page_id}.jpg"
        inputs = {style: f"{entry['folder']}/{page_id}.png" for style, entry in styles.items()}
        (tmp / gt).write_bytes(encode_page(color, "jpeg", config.jpeg_quality))
        (tmp / inputs[GREY_STYLE]).write_bytes(encode_page(color.convert("L"), "png"))
        (tmp / inputs[tone_style]).write_bytes(encode_page(Image.fromarray(tone, mode="L"), "png"))
        grey = np.asarray(color.convert("L"))
        line_art = line_art_frames(lines(grey), grey, (config.width, config.height))  # at this size: not resized
        (tmp / inputs["sketch"]).write_bytes(encode_page(line_art.sketch, "png"))
        (tmp / inputs["shading"]).write_bytes(encode_page(line_art.shading, "png"))
        bw.append({"page_id": page_id, "page_index": page_index, "gt": gt, "inputs": inputs})
    index = {
        "format_version": BENCHMARK_FORMAT_VERSION,
        "chapter_id": chapter.chapter_id,
        "series": chapter.series,
        "chapter": chapter.chapter,
        "size": [config.width, config.height],
        "styles": styles,
        "refs": refs,
        "bw": bw,
    }
    (tmp / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)
    publish_tree(tmp, final)
    write_marker(final, {"fingerprint": task.fingerprint, "refs": len(refs), "bw": len(bw)})
    return {"refs": len(refs), "bw": len(bw)}


def _write_chapter_unit(unit: Unit) -> dict[str, Any]:
    return write_chapter(unit.payload)


def _sweep(root: Path, keep: set[str]) -> None:
    """Remove temporary folders of killed runs and chapters that are no longer in the plan."""
    if not root.exists():
        return
    for path in root.iterdir():
        name = path.name
        stale_tmp = TMP_TAG in name
        stale_chapter = path.is_dir() and name not in keep
        stale_marker = name.endswith(".done.json") and name.removesuffix(".done.json") not in keep
        if stale_tmp or stale_chapter:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        elif stale_marker:
            path.unlink()


def write_benchmark(
    data: str | Path,
    plan: BenchmarkPlan,
    *,
    code_version: dict[str, Any] | None = None,
    local: bool = False,
    verify: bool = False,
) -> dict[str, Any]:
    """Write the benchmark folder (chapters as resumable units, then benchmark.json last); returns its summary.
    `verify` checks every chapter's files even when benchmark.json says the plan is written, and writes the
    chapters missing any again (the same bytes: the benchmark stays frozen)."""
    from screentone.render import renderer_for

    layout = DataLayout.at(data)
    plan.renderer_id = renderer_for(plan.config.renderer).id
    plan.line_extractor_id = line_extractor_id(plan.config.line_extractor_weights)
    fingerprint = _plan_fingerprint(plan)
    top = layout.benchmark / "benchmark.json"
    written = read_json(top) if top.exists() else None
    same_plan = written is not None and written.get("fingerprint") == fingerprint
    if same_plan and not verify:
        return {**written["summary"], "skipped": True}
    if written is not None and not same_plan:
        top.unlink()  # a different plan: its chapters are rebuilt or removed below
    _sweep(layout.benchmark, {c.chapter_id for c in plan.chapters})
    units = [
        Unit(c.chapter_id, ChapterTask(str(layout.root), c, plan.config, fingerprint, plan.line_extractor_id))
        for c in plan.chapters
    ]
    report = run_units(
        units,
        _write_chapter_unit,
        is_done=lambda u: _chapter_done(layout, u.key, fingerprint, verify),
        desc="benchmark",
        local=local,
    )
    complete = all(_chapter_done(layout, c.chapter_id, fingerprint, verify) for c in plan.chapters)
    summary = {
        "chapters": len(plan.chapters),
        "requested": plan.requested,
        "eligible": plan.eligible,
        "ref_pages": sum(len(c.refs) for c in plan.chapters),
        "bw_pages": sum(len(c.bw) for c in plan.chapters),
        "notes": plan.notes,
        "complete": complete,
        **{k: v for k, v in report.summary().items() if k != "seconds"},
    }
    if complete:
        atomic_write_json(
            top,
            {
                "fingerprint": fingerprint,
                "format_version": BENCHMARK_FORMAT_VERSION,
                "config": asdict(plan.config),
                "size": [plan.config.width, plan.config.height],
                "renderer_id": plan.renderer_id,
                "line_extractor_id": plan.line_extractor_id,
                "styles": benchmark_styles(plan.renderer_id, plan.line_extractor_id),
                "layout": FOLDER_LAYOUT,
                "chapters": [
                    {
                        "chapter_id": c.chapter_id,
                        "series": c.series,
                        "chapter": c.chapter,
                        "refs": len(c.refs),
                        "bw": len(c.bw),
                        "index": f"{c.chapter_id}/index.json",
                    }
                    for c in plan.chapters
                ],
                "code_version": code_version or {},
                "summary": {k: v for k, v in summary.items() if k not in ("units_run", "units_skipped")},
            },
        )
    return {**summary, "skipped": False}
