"""The leakage check's state kept between runs (`layout.leakage_state`, used when the caller passes each chapter's
embeddings version, from the embeddings ledger).

It holds the whole-page vectors already gathered, float16 as the retrieval job stored them, in a few vectors files;
per page its chapter, split, the chapter's embeddings version and its row (`LEAKAGE_STATE_PAGES`); the candidate rows
found so far (DUPLICATES, confirmed); for an IVF state its trained, empty index; and `state.json`, written last,
naming those files and the settings they were computed under (encoder, threshold, confirmation and its rule, exact or
IVF and the IVF settings): other settings start it over. A rerun drops the pages whose chapter version changed or
that left the input, re-files the pages whose split changed (their vector is kept, their pairs searched again), reads
the pages it lacks, and searches only pairs with a new side: new held-out pages against every training page (an
exact index of the new held-out pages, every training vector streamed past it from the state's files), the held-out
pages it kept against the new training pages; the rows of pairs whose two pages stay are kept. With the exact index
the result equals a check from scratch (tested). With IVF (from `ivf_min_train` training pages) the search is exact
too as long as there are no more new held-out pages than IVF lists (streaming costs fewer multiply-adds than
assigning every training vector to a list); beyond that every training page goes into an IVF index whose coarse
quantiser is trained once, on the seeded sample of the run that first needs it, and kept in the state. So an IVF
check from scratch (another sample, every pair through IVF) may differ slightly, usually finding fewer pairs; the
shard stage's `rebuild` starts the state over. Skipped chapters are not kept, so the next run reads them again; the
state is written only after the search finished (new files under new names, then `state.json` atomically, then the
old files removed), so a killed run leaves the previous state, which stays valid. The versions are trusted as the
embeddings ledger is: a chapter re-embedded without the ledger saying so keeps its old vectors here.

Memory bound of the check: without a state (no versions, the first run, settings changed, more new held-out pages
than IVF lists) the index of training pages holds every training frame's vector, train frames x dim x 4 bytes with
the exact index (below `ivf_min_train`) or x 2 bytes with the IVF fp16 index, e.g. 1.2M frames x 1024 (ViT-H-14) x 2
= 2.5 GB. Beside a state, the new held-out pages' index (x 4 bytes) and the new training pages' (x 4 bytes, only
when the state has held-out pages) replace it. The vectors read in a run are held until the state is written (pages
read x dim x 2 bytes: every page on a first run); the reading holds at most `READ_THREADS` x `WINDOW_PER_THREAD`
chapters' vectors besides (`pipelines.shards.leakage_vectors`), and the stored vectors are normalised `STORED_CHUNK`
at a time. Merging the vectors files (more than `MAX_SEGMENTS`, or under half of their rows live) holds every kept
vector once (pages x dim x 2 bytes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.core.schemas import DUPLICATES, LEAKAGE_STATE_PAGES
from pipelines.core.storage import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    read_arrow,
    read_json,
    write_arrow,
)
from pipelines.shards.leakage_vectors import ChapterVectors, PageRef, normalised

STATE_FORMAT = 2  # 2: pages and candidates as Arrow IPC files (1: Parquet; such a state starts over)
STATE_FILE = "state.json"
MAX_SEGMENTS = 16  # vectors files a state may hold before they are merged into one
STORED_CHUNK = 4096  # state vectors normalised, added or searched at once
_GENERATION = re.compile(r"-(\d+)\.")


@dataclass
class LeakageState:
    """What earlier runs gathered (see the module doc): per page its chapter, split, embeddings version and the
    row of its stored (float16, as the retrieval job wrote it) vector; the candidate rows found among them."""

    folder: Path
    generation: int
    pages: pa.Table  # LEAKAGE_STATE_PAGES
    segments: dict[int, np.ndarray]  # segment -> its vectors, memory-mapped
    candidates: pa.Table  # DUPLICATES
    ivf: bytes | None  # the trained, empty IVF index (IVF states only, once trained)
    files: dict[str, Any]  # the file names state.json gives

    @classmethod
    def load(cls, folder: Path, settings: dict[str, Any]) -> LeakageState | None:
        """The state at `folder` if it was computed under `settings`; None (start over) if absent, made under
        other settings or unreadable."""
        path = folder / STATE_FILE
        if not path.is_file():
            return None
        try:
            meta = read_json(path)
            if meta.get("format") != STATE_FORMAT or meta.get("settings") != settings:
                return None
            return cls(
                folder,
                int(meta["generation"]),
                read_arrow(folder / meta["pages"], LEAKAGE_STATE_PAGES),
                {int(s): np.load(folder / name, mmap_mode="r") for s, name in meta["segments"].items()},
                read_arrow(folder / meta["candidates"], DUPLICATES),
                (folder / meta["ivf"]).read_bytes() if meta.get("ivf") else None,
                {key: meta[key] for key in ("segments", "pages", "candidates", "ivf")},
            )
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowInvalid):
            return None

    def raw(self, rows: list[tuple[int, int]]) -> np.ndarray:
        """The stored vectors at (segment, row) `rows`, in that order."""
        order = np.lexsort(([r for _, r in rows], [s for s, _ in rows]))
        out = np.empty((len(rows), next(iter(self.segments.values())).shape[1]), dtype=np.float16)
        segments = np.array([s for s, _ in rows], dtype=np.int64)
        wanted = np.array([r for _, r in rows], dtype=np.int64)
        for segment in np.unique(segments):
            positions = order[segments[order] == segment]
            out[positions] = self.segments[int(segment)][wanted[positions]]
        return out

    def chunks(self, pages: dict[str, tuple[int, int]]) -> Iterator[tuple[list[str], np.ndarray]]:
        """(page ids, float32 unit vectors) of stored `pages` (page_id -> (segment, row)), STORED_CHUNK at once."""
        items = sorted(pages.items(), key=lambda item: item[1])
        for start in range(0, len(items), STORED_CHUNK):
            chunk = items[start : start + STORED_CHUNK]
            yield [p for p, _ in chunk], normalised(self.raw([where for _, where in chunk]))


def state_settings(encoder_id: str, search: dict[str, Any]) -> dict[str, Any]:
    """What a state's vectors and candidate rows were computed under: the encoder and the check's settings that
    change its result (`LeakageConfig.result_settings`); any change starts the state over. As JSON reads it back,
    so it compares equal to what `state.json` holds."""
    return json.loads(json.dumps({"encoder_id": encoder_id} | search))


def _next_generation(folder: Path, state: LeakageState | None) -> int:
    """Above every generation named in the folder, so a new state never overwrites a file the old one names."""
    found = [int(m.group(1)) for p in folder.iterdir() if (m := _GENERATION.search(p.name))] if folder.is_dir() else []
    return 1 + max([state.generation if state else 0, *found])


def save_state(
    folder: Path,
    settings: dict[str, Any],
    previous: LeakageState | None,
    kept: dict[str, tuple[int, int, str, str, str]],
    added: list[ChapterVectors],
    refs: Callable[[str], PageRef],
    candidates: pa.Table,
    ivf: bytes | None,
) -> None:
    """Write the new state: its files under new names first, then `state.json` naming them (atomically), then
    remove what the old state named. A kill at any point leaves one complete state, the old or the new.

    `kept`: page_id -> (segment, row, version, chapter_id, split) of the old state's pages that stay (split: the
    one they have now); `added`: vectors read this run, whose pages `refs` (page_id -> its PageRef) files.
    Segments are merged into one when there would be more than MAX_SEGMENTS or under half their rows live.
    """
    folder.mkdir(parents=True, exist_ok=True)
    generation = _next_generation(folder, previous)
    new_raw = [chapter.raw for chapter in added]
    # (page_id, version, chapter_id, split) of the rows written to the new vectors file
    new_pages = [(p, chapter.version, chapter.chapter_id, refs(p).split) for chapter in added for p in chapter.page_ids]
    segments = {where[0] for where in kept.values()}
    stored_rows = sum(previous.segments[s].shape[0] for s in segments) if previous else 0
    ordered = sorted(kept)
    if kept and (len(segments) + bool(added) > MAX_SEGMENTS or stored_rows > 2 * len(kept)):
        new_raw.insert(0, previous.raw([kept[p][:2] for p in ordered]))  # merge: every live vector into the new one
        new_pages = [(p, *kept[p][2:]) for p in ordered] + new_pages
        segments, ordered = set(), []
    names: dict[str, Any] = {"segments": {}}
    if previous:
        names["segments"] = {str(s): previous.files["segments"][str(s)] for s in sorted(segments)}
    if new_raw:
        name = f"vectors-{generation:06d}.npy"
        with atomic_path(folder / name) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.concatenate(new_raw).astype(np.float16, copy=False))
        names["segments"][str(generation)] = name
    # built column by column: twice as fast as a dict per row (30k pages: 0.013 against 0.031 s)
    rows = [kept[p] for p in ordered]
    pages = {
        "page_id": ordered + [p[0] for p in new_pages],
        "chapter_id": [r[3] for r in rows] + [p[2] for p in new_pages],
        "split": [r[4] for r in rows] + [p[3] for p in new_pages],
        "version": [r[2] for r in rows] + [p[1] for p in new_pages],
        "segment": [r[0] for r in rows] + [generation] * len(new_pages),
        "row": [r[1] for r in rows] + list(range(len(new_pages))),
    }
    names["pages"] = f"pages-{generation:06d}.arrow"
    write_arrow(pa.table(pages, schema=LEAKAGE_STATE_PAGES), folder / names["pages"], LEAKAGE_STATE_PAGES)
    names["candidates"] = f"candidates-{generation:06d}.arrow"
    write_arrow(candidates, folder / names["candidates"], DUPLICATES)
    names["ivf"] = None
    if ivf is not None:
        if previous is not None and previous.ivf == ivf:
            names["ivf"] = previous.files["ivf"]
        else:
            names["ivf"] = f"ivf-{generation:06d}.faiss"
            atomic_write_bytes(folder / names["ivf"], ivf)
    atomic_write_json(
        folder / STATE_FILE, {"format": STATE_FORMAT, "settings": settings, "generation": generation} | names
    )
    named = {STATE_FILE, names["pages"], names["candidates"], names["ivf"], *names["segments"].values()}
    for path in folder.iterdir():
        if path.name not in named and path.is_file():
            path.unlink(missing_ok=True)
