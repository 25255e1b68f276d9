"""Looking at a retrieval cache: contact sheets per frame, and the character hit rate on a labelled corpus.

Character hit rate (for the generated sample corpus, whose labels give every character's box per page): a
character is *in* a patch when at least `min_overlap` (default 30%) of its box, mapped into the fitted W x H
page through `geometry.fit_box`, lies inside the patch box. A query patch with at least one character *hits*
at rank r when the retrieved patch at rank r holds one of its characters. Reported: the top-1 hit rate, the
rate of "any of the top k", and the chance rate (the expected top-1 rate of a patch drawn uniformly from the
frame's pool), so the figure can be read against a baseline: pages of one chapter share their cast, so even a
random reference often shows one of the query's characters.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipelines.core.contact_sheets import RetrievedPatch, draw_contact_sheet
from pipelines.core.encoders import grey_version
from pipelines.core.geometry import Box, fit_box, quadrant_boxes, reference_boxes
from pipelines.core.layout import DataLayout
from pipelines.core.pagestore import decode_page, read_chapter_pages
from pipelines.core.patches import fitted_page
from pipelines.core.schemas import PAGE_STORE, POOLS, QUERY_PATCHES, RETRIEVALS, STATUS_OK
from pipelines.core.storage import read_json, read_jsonl, read_parquet, read_table


def retrieval_run_info(layout: DataLayout) -> dict[str, Any]:
    """The summary of the latest completed retrieval run (its size, encoder and parameters)."""
    path = layout.summary("retrieval")
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the retrieval job (python -m jobs.retrieval) first")
    return read_json(path)


def _frame_rows(layout: DataLayout, frame_ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    wanted = pc.is_in(pc.field("frame_id"), pa.array(sorted(frame_ids), pa.string()))
    table = read_table(layout.retrievals, columns=RETRIEVALS.names, filter=wanted)
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in table.to_pylist():
        rows[row["frame_id"]].append(row)
    return rows


# ---- contact sheets ----------------------------------------------------------------------------------------------


def frame_contact_sheet(layout: DataLayout, frame_id: str) -> Image.Image:
    """The contact sheet of one frame of the latest retrieval run."""
    info = retrieval_run_info(layout)
    width, height = info["params"]["width"], info["params"]["height"]
    rows = _frame_rows(layout, {frame_id}).get(frame_id)
    if not rows:
        raise KeyError(f"frame {frame_id!r} has no retrievals in {layout.retrievals} (not a frame, or excluded)")
    chapter_id = rows[0]["chapter_id"]
    stored = read_chapter_pages(layout, chapter_id)
    fitted: dict[str, Image.Image] = {}

    def page(page_id: str) -> Image.Image:
        if page_id not in fitted:
            fitted[page_id] = fitted_page(decode_page(stored[page_id]), width, height)
        return fitted[page_id]

    boxes = reference_boxes(width, height)
    retrieved: list[list[RetrievedPatch]] = [[] for _ in range(QUERY_PATCHES)]
    for row in sorted(rows, key=lambda r: (r["query_patch"], r["rank"])):
        crop = page(row["ref_page_id"]).crop(boxes[row["ref_patch"]])
        retrieved[row["query_patch"]].append(RetrievedPatch(crop, row["ref_page_id"], row["ref_patch"], row["score"]))
    title = f"frame {frame_id}  chapter {chapter_id}  encoder {info['encoder']['encoder_id']}  run {info['run_id']}"
    return draw_contact_sheet(grey_version(page(frame_id)), quadrant_boxes(width, height), retrieved, title=title)


def check_frames(pools: pa.Table, frame_ids: list[str]) -> None:
    """Refuse, before drawing anything, a frame id the retrieval run does not know or that has no retrievals."""
    status = dict(zip(pools.column("frame_id").to_pylist(), pools.column("status").to_pylist(), strict=True))
    reasons = dict(zip(pools.column("frame_id").to_pylist(), pools.column("error").to_pylist(), strict=True))
    for frame_id in frame_ids:
        if frame_id not in status:
            example = next(iter(sorted(status)), None)
            raise KeyError(
                f"frame {frame_id!r} is not a frame of this retrieval run ({len(status)} frames, page ids such as "
                f"{example!r}; list them from pools.parquet)"
            )
        if status[frame_id] != STATUS_OK:
            reason = reasons[frame_id] or "no reason recorded"
            raise KeyError(f"frame {frame_id!r} has no retrievals: its pool status is {status[frame_id]} ({reason})")


def write_contact_sheets(
    data: str | os.PathLike,
    *,
    frame_ids: list[str] | None = None,
    random_frames: int = 0,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """Write contact sheets of the given frames, or of `random_frames` frames drawn with `seed`.

    One frame with `out` writes exactly that file; otherwise files `<out_dir>/<frame_id>.png`.
    """
    layout = DataLayout.at(data)
    retrieval_run_info(layout)
    pools = read_table(layout.pools, POOLS)
    if frame_ids is None:
        candidates = sorted(pools.filter(pc.equal(pools["status"], STATUS_OK)).column("frame_id").to_pylist())
        if not candidates:
            raise ValueError(f"{layout.pools} has no frame with retrievals")
        frame_ids = sorted(random.Random(seed).sample(candidates, min(random_frames, len(candidates))))
    check_frames(pools, frame_ids)
    if out is not None and len(frame_ids) != 1:
        raise ValueError("--out names one file: use an output folder for several frames")
    written = []
    for frame_id in frame_ids:
        target = Path(out) if out is not None else Path(out_dir or ".") / f"{frame_id}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        frame_contact_sheet(layout, frame_id).save(target)
        written.append(target)
    return written


# ---- character hit rate ------------------------------------------------------------------------------------------


def map_box(box: Box, label_size: tuple[int, int], stored_size: tuple[int, int], width: int, height: int) -> tuple:
    """A labelled box (upright source page pixels) in the coordinates of the page fitted to width x height."""
    sx, sy = stored_size[0] / label_size[0], stored_size[1] / label_size[1]
    left, top, right, bottom = fit_box(stored_size[0], stored_size[1], width, height)
    fx, fy = width / (right - left), height / (bottom - top)
    x0, y0, x1, y1 = box
    return ((x0 * sx - left) * fx, (y0 * sy - top) * fy, (x1 * sx - left) * fx, (y1 * sy - top) * fy)


def character_areas(characters: list[tuple[str, tuple]], patch: Box, min_overlap: float) -> dict[str, float]:
    """Characters whose (mapped) box lies at least `min_overlap` inside the patch box -> their area inside it."""
    areas: dict[str, float] = {}
    for name, (x0, y0, x1, y1) in characters:
        area = max(0.0, x1 - x0) * max(0.0, y1 - y0)
        inside = max(0.0, min(x1, patch[2]) - max(x0, patch[0])) * max(0.0, min(y1, patch[3]) - max(y0, patch[1]))
        if area > 0 and inside >= min_overlap * area:
            areas[name] = areas.get(name, 0.0) + inside
    return areas


def characters_in(characters: list[tuple[str, tuple]], patch: Box, min_overlap: float) -> set[str]:
    """Names of the characters whose (mapped) box lies at least `min_overlap` inside the patch box."""
    return set(character_areas(characters, patch, min_overlap))


@dataclass
class HitRate:
    query_patches: int  # query patches holding at least one character (the denominator)
    top1_hits: int
    topk_hits: int
    chance: float  # expected top-1 hit rate of a uniformly drawn pool patch
    main_hits: int  # top-1 shows the query patch's main character (largest area inside the query patch)
    main_chance: float
    skipped_patches: int  # query patches without any character
    k: int

    @property
    def top1_rate(self) -> float:
        return self.top1_hits / self.query_patches if self.query_patches else 0.0

    @property
    def topk_rate(self) -> float:
        return self.topk_hits / self.query_patches if self.query_patches else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "query_patches": self.query_patches,
            "top1_hits": self.top1_hits,
            "top1_rate": round(self.top1_rate, 4),
            f"top{self.k}_rate": round(self.topk_rate, 4),
            "chance_rate": round(self.chance, 4),
            "top1_main_character_rate": round(self.main_hits / self.query_patches, 4) if self.query_patches else 0.0,
            "main_character_chance_rate": round(self.main_chance, 4),
            "skipped_patches_without_characters": self.skipped_patches,
        }


def character_hit_rate(data: str | os.PathLike, labels: str | os.PathLike, *, min_overlap: float = 0.3) -> HitRate:
    """How often the retrieved patches show a character of their query patch (sample corpus labels)."""
    layout = DataLayout.at(data)
    info = retrieval_run_info(layout)
    width, height = info["params"]["width"], info["params"]["height"]
    by_source = {label["source"]: label for label in read_jsonl(labels)}
    pages = read_table(layout.pages, columns=["page_id", "source"]).to_pylist()
    label_of = {p["page_id"]: by_source[p["source"]] for p in pages if p["source"] in by_source}
    pools = read_table(layout.pools, POOLS)
    pools = pools.filter(pc.equal(pools["status"], STATUS_OK)).to_pylist()
    retrievals = _frame_rows(layout, {p["frame_id"] for p in pools})
    query_boxes, ref_boxes = quadrant_boxes(width, height), reference_boxes(width, height)
    chars: dict[str, list[tuple[str, tuple]]] = {}

    def mapped(page_id: str, chapter_id: str) -> list[tuple[str, tuple]]:
        if page_id not in chars:
            if chapter_id not in sizes:
                store = read_parquet(layout.pagestore_chapter(chapter_id), PAGE_STORE).select(
                    ["page_id", "width", "height"]
                )
                sizes[chapter_id] = {r["page_id"]: (r["width"], r["height"]) for r in store.to_pylist()}
            label = label_of[page_id]
            stored = sizes[chapter_id][page_id]
            chars[page_id] = [
                (c["name"], map_box(tuple(c["box"]), (label["width"], label["height"]), stored, width, height))
                for c in label["characters"]
            ]
        return chars[page_id]

    sizes: dict[str, dict[str, tuple[int, int]]] = {}
    counted = top1 = topk = skipped = main_hits = 0
    chance_sum = main_chance_sum = 0.0
    k = info["params"]["k_per_patch"]
    for pool in pools:
        frame_id, chapter_id = pool["frame_id"], pool["chapter_id"]
        if frame_id not in label_of or any(p not in label_of for p in pool["ref_page_ids"]):
            continue
        by_patch = defaultdict(list)
        for row in retrievals.get(frame_id, []):
            by_patch[row["query_patch"]].append(row)
        for q in range(QUERY_PATCHES):
            areas = character_areas(mapped(frame_id, chapter_id), query_boxes[q], min_overlap)
            if not areas:
                skipped += 1
                continue
            wanted = set(areas)
            main = max(sorted(areas), key=lambda name: areas[name])
            ranked = sorted(by_patch[q], key=lambda r: r["rank"])
            shown = [
                characters_in(mapped(r["ref_page_id"], chapter_id), ref_boxes[r["ref_patch"]], min_overlap)
                for r in ranked
            ]
            counted += 1
            top1 += bool(shown and wanted & shown[0])
            topk += any(wanted & s for s in shown)
            main_hits += bool(shown and main in shown[0])
            pool_shown = [
                characters_in(mapped(p, chapter_id), box, min_overlap)
                for p in pool["ref_page_ids"]
                for box in ref_boxes
            ]
            chance_sum += sum(bool(wanted & s) for s in pool_shown) / len(pool_shown)
            main_chance_sum += sum(main in s for s in pool_shown) / len(pool_shown)
    n = max(counted, 1)
    return HitRate(counted, top1, topk, chance_sum / n, main_hits, main_chance_sum / n, skipped, k)
