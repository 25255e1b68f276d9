"""The leakage check's reading of the stored whole-page vectors (whole-page reference patch, role "ref", patch 4;
L2-normalised fp16, as the retrieval job wrote them): no page is decoded or encoded again for the search.

Vectors are read only through `pipelines.core.embeddings.EmbeddingStore`, only for the chapters of the pages asked
for, by a pool of threads (`READ_THREADS` chapters at once, in a bounded window of `WINDOW_PER_THREAD` chapters per
thread). A chapter without a completion marker (a retrieval run was killed while rewriting it) or with inconsistent
files is skipped with its reason, never read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core.embeddings import REF_ROLE, EmbeddingStore
from pipelines.core.geometry import WHOLE_PAGE_PATCH
from pipelines.core.layout import DataLayout


@dataclass(frozen=True)
class PageRef:
    """A page given to the check: the chapter its vector is read from, the split that makes it held out or training."""

    page_id: str
    series: str
    chapter_id: str
    split: str


def embedding_store(layout: DataLayout, encoder_id: str) -> EmbeddingStore:
    """The encoder's embeddings as the retrieval job stored them; a clear error if it never ran."""
    store = EmbeddingStore(layout.embeddings(encoder_id))
    if not store.folder.exists():
        raise FileNotFoundError(
            f"no embeddings for encoder {encoder_id!r} at {store.folder}: run the retrieval job first"
        )
    return store


def by_chapter(pages: Iterable[PageRef]) -> dict[str, set[str]]:
    """chapter_id -> the page ids of `pages` in it: each chapter's embeddings are read once, and only these."""
    out: dict[str, set[str]] = {}
    for page in pages:
        out.setdefault(page.chapter_id, set()).add(page.page_id)
    return out


# chapters whose vectors are read at once: threads overlap the waits on storage; on local disk the per-chapter
# work holds the GIL, so more threads than cores only cost (measured on 2 cores: 8 threads 1.85 ms per chapter,
# 2 threads 1.22)
READ_THREADS = min(8, os.cpu_count() or 1)
WINDOW_PER_THREAD = 4  # chapters read ahead per thread: bounds what the reading holds besides the index


@dataclass(frozen=True)
class ChapterVectors:
    chapter_id: str
    version: str  # the chapter's embeddings version (its marker's), what the state is keyed by
    page_ids: list[str]
    raw: np.ndarray  # the wanted pages' whole-page vectors as stored (float16, not re-normalised)


def normalised(raw: np.ndarray) -> np.ndarray:
    """float32 copies of `raw`'s rows scaled to unit length (stored fp16 vectors are only nearly unit)."""
    vectors = np.array(raw, dtype=np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


def _chapter_vectors(store: EmbeddingStore, chapter_id: str, page_ids: set[str]) -> ChapterVectors | str | None:
    """One chapter's wanted pages and their stored whole-page vectors; a reason (str) when the chapter is
    skipped; None when none of the pages has a vector."""
    try:
        stored = store.read_vectors(chapter_id)
        if stored is None:
            return "no completed embeddings (retrieval not run on it, or killed while writing it)"
        marker, ids, matrix = stored
        mask = pc.and_(
            pc.and_(pc.equal(ids["role"], REF_ROLE), pc.equal(ids["patch"], WHOLE_PAGE_PATCH)),
            pc.is_in(ids["page_id"], value_set=pa.array(sorted(page_ids), pa.string())),
        )
        ids = ids.filter(mask)
        if ids.num_rows == 0:
            return None
        found, rows = ids.column("page_id").to_pylist(), ids.column("row").to_numpy()
        raw = np.asarray(matrix[rows], dtype=np.float16)
    except Exception as exc:  # noqa: BLE001 - one unreadable chapter is reported, it never ends the check
        return f"unreadable embeddings: {type(exc).__name__}: {exc}"
    return ChapterVectors(chapter_id, str(marker.get("version", "")), found, raw)


def iter_chapter_vectors(
    store: EmbeddingStore, wanted: dict[str, set[str]], skipped: dict[str, str], threads: int = READ_THREADS
) -> Iterator[ChapterVectors]:
    """Per chapter of `wanted` (chapter_id -> page ids), in chapter id order: those pages' stored whole-page
    vectors, read by `threads` threads at once.

    Memory: besides what the caller keeps, at most `threads` x WINDOW_PER_THREAD chapters' vectors are held
    (pages x dim x 2 bytes each). A chapter that is not completely embedded, or whose files cannot be read,
    yields nothing and is recorded in `skipped` (chapter_id -> reason).
    """
    items = sorted(wanted.items())
    window = max(1, threads) * WINDOW_PER_THREAD
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="leakage-read") as pool:
        for start in range(0, len(items), window):
            chunk = items[start : start + window]
            for (chapter_id, _), result in zip(
                chunk, pool.map(lambda item: _chapter_vectors(store, *item), chunk), strict=True
            ):
                if isinstance(result, str):
                    skipped[chapter_id] = result
                elif result is not None:
                    yield result


def iter_page_vectors(
    store: EmbeddingStore, wanted: dict[str, set[str]], skipped: dict[str, str], threads: int = READ_THREADS
) -> Iterator[tuple[list[str], np.ndarray]]:
    """`iter_chapter_vectors` as (page ids, float32 unit vectors) per chapter."""
    for chapter in iter_chapter_vectors(store, wanted, skipped, threads):
        yield chapter.page_ids, normalised(chapter.raw)
