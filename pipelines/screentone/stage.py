"""The screentone stage: render every frame's screentone and line art at the sizes the shards use, once, beside
the page store.

Units are kept chapters. Each frame is fitted to the training size W x H and to the GSRP size, and the colour
page is rendered at exactly that size (tone is never resampled afterwards). Frames go to the renderer in
batches of ``batch_size`` pages of one size, each with its own seed, so a batch renders what single pages
render (exactly on CPU in float32).

Beside the tone, each frame gets the line-art family's inputs, made as colorize makes them
(`pipelines.core.page_styles.pages_line_art`): ``sketch`` and ``shading`` at W x H and ``hires_sketch`` (the
plain line art, GSRP's guide) at the GSRP size. The extractor is the release's network when
``line_extractor_weights`` (an erika.pth) is given, batched on the worker's device, else weight-free XDoG; its id
(`pipelines.core.page_styles.line_extractor_id`) fills those rows' ``renderer`` column. A frame that fails becomes
error rows; a chapter is done when its marker exists and records the same options (renderer and extractor ids
included), so reruns only render what is missing. The stage's ledger (`pipelines.core.ledger`, keyed on those
options and the chapter's ingest version) spares the marker reads of chapters it vouches for.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pipelines.core.geometry import RESAMPLE_LANCZOS, CompositeLayout, fit_image, hires_size
from pipelines.core.layout import DataLayout, subfolders
from pipelines.core.ledger import LedgerEntry, chapter_key, ingested_versions, read_ledger, vouched, write_ledger
from pipelines.core.page_styles import line_extractor_id, pages_line_art
from pipelines.core.pagestore import (
    decode_page,
    encode_page,
    ingested_chapter_ids,
    kept_chapter_ids,
    read_chapter_pages,
)
from pipelines.core.samples import LINE_ART_VARIANTS, encode_line_art
from pipelines.core.schemas import SCREENTONE, STATUS_ERROR, STATUS_OK, table_from_rows
from pipelines.core.seeding import derive_seed
from pipelines.core.storage import (
    atomic_write_json,
    is_done,
    marker_path,
    purge_chapter_files,
    read_marker,
    stable_hash,
    sweep_tmp,
    write_marker,
    write_parquet,
)
from pipelines.runtime.distributor import Unit, run_units
from pipelines.runtime.heap import runs_with_frozen_heap

if TYPE_CHECKING:
    from model.line_extractor import LineExtractor

STAGE = "screentone"
VARIANT_TRAIN = "train"
VARIANT_HIRES = "hires"
VARIANT_SKETCH, VARIANT_SHADING, VARIANT_HIRES_SKETCH = LINE_ART_VARIANTS.values()


@dataclass(frozen=True)
class ScreentoneOptions:
    renderer: str = "halftone"  # spec for screentone.render.make_renderer
    width: int = 512
    height: int = 800
    hires_scale: float = 1.5
    seed: int = 0
    device: str | None = None
    batch_size: int = 8  # pages of one size per renderer call; does not change the output on CPU
    fit_resample: str = RESAMPLE_LANCZOS  # the fit the tone is rendered from (the shards' frames use the same)
    line_extractor_weights: str | None = None  # erika.pth of the line-art variants (None: weight-free XDoG)

    @property
    def sizes(self) -> dict[str, tuple[int, int]]:
        """The tone variants and their sizes."""
        return {
            VARIANT_TRAIN: (self.width, self.height),
            VARIANT_HIRES: hires_size(self.width, self.height, self.hires_scale),
        }

    @property
    def line_art_sizes(self) -> dict[str, tuple[int, int]]:
        """The line-art variants and their sizes."""
        train, hires = self.sizes.values()
        return {VARIANT_SKETCH: train, VARIANT_SHADING: train, VARIANT_HIRES_SKETCH: hires}

    @property
    def all_sizes(self) -> dict[str, tuple[int, int]]:
        return {**self.sizes, **self.line_art_sizes}


def frame_seed(seed: int, frame_id: str, variant: str) -> int:
    return derive_seed(seed, "screentone", frame_id, variant)


def render_frame(page: Image.Image, frame_id: str, options: ScreentoneOptions, renderer) -> dict[str, bytes]:
    """PNG-encoded tone per variant for one colour frame."""
    out: dict[str, bytes] = {}
    for variant, (width, height) in options.sizes.items():
        fitted = np.asarray(fit_image(page, width, height, resample=options.fit_resample))
        tone = renderer.render(fitted, frame_seed(options.seed, frame_id, variant))
        out[variant] = encode_page(Image.fromarray(tone, mode="L"), "png")
    return out


def render_frames(
    pages: Mapping[str, bytes], options: ScreentoneOptions, renderer, lines: LineExtractor | None = None
) -> tuple[dict[str, dict[str, bytes]], dict[str, str]]:
    """PNG tone per variant of every frame (as `render_frame` gives them), plus its line-art variants when `lines`
    is given, and an error per frame that failed.

    Frames are taken ``options.batch_size`` at a time; per variant their fitted pages (all of one size) go to
    ``renderer.render_batch`` together, and their line art is extracted in one call. A batch that fails is
    rendered again page by page, so only the broken frame becomes an error.
    """
    tones: dict[str, dict[str, bytes]] = {}
    errors: dict[str, str] = {}
    frame_ids = sorted(pages)
    for start in range(0, len(frame_ids), max(1, options.batch_size)):
        decoded: dict[str, Image.Image] = {}
        fitted: dict[str, dict[str, np.ndarray]] = {}
        for frame_id in frame_ids[start : start + options.batch_size]:
            try:
                decoded[frame_id] = page = decode_page(pages[frame_id])
                fitted[frame_id] = {
                    v: np.asarray(fit_image(page, w, h, resample=options.fit_resample))
                    for v, (w, h) in options.sizes.items()
                }
            except Exception as exc:  # noqa: BLE001 - one bad frame is a row, not a failed chapter
                errors[frame_id] = f"{type(exc).__name__}: {exc}"
        for variant in options.sizes:
            for frame_id, tone in _render_variant(fitted, variant, options, renderer, errors).items():
                tones.setdefault(frame_id, {})[variant] = encode_page(Image.fromarray(tone, mode="L"), "png")
        if lines is not None:
            for frame_id, line_art in _line_art_variants(decoded, options, lines, errors).items():
                tones.setdefault(frame_id, {}).update(line_art)
    return {frame_id: tone for frame_id, tone in tones.items() if frame_id not in errors}, errors


def _line_art_variants(
    decoded: dict[str, Image.Image], options: ScreentoneOptions, lines: LineExtractor, errors: dict
) -> dict[str, dict[str, bytes]]:
    """PNG line-art variants of the decoded frames not in `errors`; a failed batch is redone page by page."""
    train, hires = options.sizes.values()
    frame_ids = [frame_id for frame_id in decoded if frame_id not in errors]
    try:
        made = pages_line_art([decoded[frame_id] for frame_id in frame_ids], train, hires, lines.many)
        return {frame_id: encode_line_art(frames) for frame_id, frames in zip(frame_ids, made, strict=True)}
    except Exception:  # noqa: BLE001 - find the broken page: extract again one page at a time
        out: dict[str, dict[str, bytes]] = {}
        for frame_id in frame_ids:
            try:
                out[frame_id] = encode_line_art(pages_line_art([decoded[frame_id]], train, hires, lines.many)[0])
            except Exception as exc:  # noqa: BLE001 - one bad frame is a row, not a failed chapter
                errors[frame_id] = f"line art: {type(exc).__name__}: {exc}"
        return out


def _render_variant(
    fitted: dict[str, dict[str, np.ndarray]], variant: str, options: ScreentoneOptions, renderer, errors: dict
) -> dict[str, np.ndarray]:
    frame_ids = [frame_id for frame_id in fitted if frame_id not in errors]
    pages = [fitted[frame_id][variant] for frame_id in frame_ids]
    seeds = [frame_seed(options.seed, frame_id, variant) for frame_id in frame_ids]
    try:
        return dict(zip(frame_ids, renderer.render_batch(pages, seeds, options.batch_size), strict=True))
    except Exception:  # noqa: BLE001 - find the broken page: render the batch again one page at a time
        rendered: dict[str, np.ndarray] = {}
        for frame_id, page, seed in zip(frame_ids, pages, seeds, strict=True):
            try:
                rendered[frame_id] = renderer.render(page, seed)
            except Exception as exc:  # noqa: BLE001 - one bad frame is a row, not a failed chapter
                errors[frame_id] = f"{variant}: {type(exc).__name__}: {exc}"
        return rendered


def _chapter_worker(unit: Unit) -> dict[str, Any]:
    data, options, renderer_id, lines_id = unit.payload
    layout = DataLayout.at(data)
    options = ScreentoneOptions(**options)
    from screentone.render import renderer_for  # torch only where a renderer runs

    renderer = renderer_for(options.renderer, options.device)
    if renderer.id != renderer_id:
        raise RuntimeError(f"worker built renderer {renderer.id}, the driver planned {renderer_id}: weights differ")
    lines = _line_extractor(options.line_extractor_weights, options.device)
    tones, errors = render_frames(read_chapter_pages(layout, unit.key), options, renderer, lines)
    rows: list[dict[str, Any]] = []
    made_by = {variant: lines_id if variant in options.line_art_sizes else renderer_id for variant in options.all_sizes}
    for frame_id in sorted([*tones, *errors]):
        base = {"frame_id": frame_id, "chapter_id": unit.key}
        if frame_id in errors:
            error = f"frame {frame_id} of chapter {unit.key}: {errors[frame_id]}"
            failed = {"width": None, "height": None, "image": None, "status": STATUS_ERROR, "error": error}
            rows += [{**base, "renderer": made_by[v], "variant": v, **failed} for v in options.all_sizes]
            continue
        for variant, png in tones[frame_id].items():
            width, height = options.all_sizes[variant]
            rows.append(
                {**base, "renderer": made_by[variant], "variant": variant, "width": width, "height": height}
                | {"image": png, "status": STATUS_OK, "error": None}
            )
    output = _chapter_output(layout, renderer_id, options, unit.key)
    marker_path(output).unlink(missing_ok=True)  # the output changes: its old marker must not vouch for it
    write_parquet(table_from_rows(rows, SCREENTONE), output, SCREENTONE)
    stats = {
        "options": _done_options(options, renderer_id, lines_id),
        "batch_size": options.batch_size,
        "frames": len(tones) + len(errors),
        "errors": len(errors),
    }
    write_marker(output, stats)
    return stats


def recorded_options(options: ScreentoneOptions) -> dict[str, Any]:
    """The options as markers and the summary record them: the fit is named only when it is not the original
    Lanczos, so what was recorded before it was an option stays current."""
    recorded = asdict(options)
    if options.fit_resample == RESAMPLE_LANCZOS:
        del recorded["fit_resample"]
    return recorded


@functools.cache
def _line_extractor(weights: str | None, device: str | None) -> LineExtractor:
    """One extractor per worker process (the network's weights load once, as the renderers' do)."""
    from model.line_extractor import LineExtractor

    return LineExtractor(weights, device)


def _done_options(options: ScreentoneOptions, renderer_id: str, lines_id: str) -> dict[str, Any]:
    """What a chapter's output depends on: the options without the batch size and the weights' path, plus the
    renderer and line extractor ids (the extractor's contents, not where its file lies)."""
    kept = {k: v for k, v in recorded_options(options).items() if k not in ("batch_size", "line_extractor_weights")}
    return kept | {"renderer_id": renderer_id, "line_extractor_id": lines_id}


def chapter_done(
    layout: DataLayout, renderer_id: str, options: ScreentoneOptions, chapter_id: str, lines_id: str
) -> dict[str, int] | None:
    """Done = marker present and written with the same options (another seed, scale or extractor renders again);
    returns the chapter's record (its frame and error counts, what the ledger keeps), None when not done."""
    output = _chapter_output(layout, renderer_id, options, chapter_id)
    if not is_done(output) or not output.exists():
        return None
    marker = read_marker(output)
    if marker.get("options") != _done_options(options, renderer_id, lines_id):
        return None
    return _chapter_record(marker)


def _chapter_record(stats: dict[str, Any]) -> dict[str, int]:
    return {"frames": stats.get("frames", 0), "errors": stats.get("errors", 0)}


def _unit_done(
    layout: DataLayout, renderer_id: str, options: ScreentoneOptions, lines_id: str, unit: Unit
) -> dict[str, int] | None:
    return chapter_done(layout, renderer_id, options, unit.key, lines_id)


def _chapter_output(layout: DataLayout, renderer_id: str, options: ScreentoneOptions, chapter_id: str):
    return layout.screentone(renderer_id, options.width, options.height) / f"{chapter_id}.parquet"


def purge_taken_down(layout: DataLayout) -> set[str]:
    """Delete the renderings (every renderer and size) of chapters ingestion no longer lists; returns their ids."""
    keep = ingested_chapter_ids(layout)
    purged: set[str] = set()
    for renderer_folder in subfolders(layout.screentone_root):
        for size_folder in subfolders(renderer_folder):
            purged |= purge_chapter_files(size_folder, keep)
    return purged


@runs_with_frozen_heap
def run_screentone(
    data: str,
    options: ScreentoneOptions = ScreentoneOptions(),
    *,
    chapters_per_task: int = 1,
    local: bool = False,
    verify: bool = False,
) -> dict[str, Any]:
    """Render the screentone of every frame; returns (and writes) the stage summary."""
    from pipelines.runtime.ray import cluster_has_gpus

    CompositeLayout(options.width, options.height)  # validates the size before any work
    layout = DataLayout.at(data)
    # a run that did not finish (no summary) may have left temporary files, and rewritten chapters the ledger still
    # vouches for: then the folder is swept and every marker is read (a completed run needs neither)
    unfinished = verify or not layout.summary(STAGE).exists()  # `verify`: as after a killed run
    layout.summary(STAGE).unlink(missing_ok=True)  # the summary marks a complete run: not until this one is
    from screentone.render import renderer_for  # torch only where a renderer runs

    renderer = renderer_for(options.renderer, options.device)
    lines_id = line_extractor_id(options.line_extractor_weights)
    neural = not renderer.id.startswith("halftone") or options.line_extractor_weights is not None
    num_gpus = 1.0 if neural and not local and cluster_has_gpus() else 0.0
    purged = purge_taken_down(layout)
    folder = layout.screentone(renderer.id, options.width, options.height)
    if unfinished:
        sweep_tmp(folder)
    chapter_ids = kept_chapter_ids(layout)
    payload = (str(layout.root), asdict(options), renderer.id, lines_id)
    units = [Unit(key=chapter_id, payload=payload) for chapter_id in chapter_ids]
    # chapters rendered with these options from the page store ingestion still vouches for skip the marker check
    ledger_path = layout.ledger(f"{STAGE}-{renderer.id}-{options.width}x{options.height}")
    ledger = {} if unfinished else read_ledger(ledger_path)
    ingested = ingested_versions(layout)
    done_options = _done_options(options, renderer.id, lines_id)
    options_key = stable_hash(done_options)
    keys = {c: chapter_key(options_key, ingested[c]) for c in chapter_ids if c in ingested}
    ledger_vouched = vouched(ledger, keys)
    started = time.perf_counter()
    report = run_units(
        units,
        _chapter_worker,
        is_done=functools.partial(_unit_done, layout, renderer.id, options, lines_id),  # picklable: check tasks run it
        desc="screentone chapters",
        units_per_task=chapters_per_task,
        num_gpus=num_gpus,
        local=local,
        vouched=ledger_vouched,
    )
    seconds = time.perf_counter() - started
    frames = sum(r.get("frames", 0) for r in report.results)
    summary = {
        "stage": STAGE,
        "complete": not report.failed,
        "renderer_id": renderer.id,
        "line_extractor_id": lines_id,
        "options": recorded_options(options),
        "sizes": {variant: list(size) for variant, size in options.all_sizes.items()},
        "folder": str(folder.relative_to(layout.root)),
        "chapters": len(units),
        "chapters_rendered": len(report.results),
        "chapters_reused": len(report.skipped),
        "chapters_vouched": len(ledger_vouched),  # reused per the ledger, without a check
        "chapters_purged": len(purged),
        "frames_rendered": frames,
        "frame_errors": sum(r.get("errors", 0) for r in report.results),
        "frames_per_second": round(frames / seconds, 3) if seconds > 0 else None,
        "distributor": report.summary(),
    }
    rendered = {r["key"]: _chapter_record(r) for r in report.results if r.get("status") != STATUS_ERROR}
    records = rendered | report.skipped_records
    write_ledger(ledger_path, {c: LedgerEntry(keys[c], records[c]) for c in records if c in keys}, ledger)
    atomic_write_json(layout.summary(STAGE), summary)
    return summary
