"""The embeddings store: one encoder's per-chapter patch vectors, their ids and completion markers.

The retrieval stage writes it; the leakage check, benchmarks and tools read vectors only through `EmbeddingStore`,
which refuses files whose marker is missing or disagrees with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core.schemas import EMBEDDED_PAGES, EMBEDDINGS, QUERY_PATCHES, REF_PATCHES
from pipelines.core.storage import atomic_path, marker_path, read_json, read_parquet, write_marker, write_parquet

QUERY_ROLE = "query"
REF_ROLE = "ref"
PATCHES_PER_PAGE = QUERY_PATCHES + REF_PATCHES


@dataclass
class ChapterEmbeddings:
    chapter_id: str
    version: str
    vectors: np.ndarray  # (rows, dim) float16, memory-mapped
    ids: pa.Table  # EMBEDDINGS
    pages: pa.Table  # EMBEDDED_PAGES

    def page_rows(self) -> dict[str, np.ndarray]:
        """page_id -> its 9 vector rows in patch order: query 0..3, then reference 0..4."""
        page_ids = self.ids.column("page_id").to_pylist()
        roles = self.ids.column("role").to_pylist()
        patches = self.ids.column("patch").to_pylist()
        rows = self.ids.column("row").to_pylist()
        out: dict[str, np.ndarray] = {}
        for page_id, role, patch, row in zip(page_ids, roles, patches, rows, strict=True):
            slot = patch if role == QUERY_ROLE else QUERY_PATCHES + patch
            out.setdefault(page_id, np.full(PATCHES_PER_PAGE, -1, dtype=np.int64))[slot] = row
        for page_id, page in out.items():
            if (page < 0).any():
                raise ValueError(f"chapter {self.chapter_id}: page {page_id} lacks some of its 9 patch vectors")
        return out


@dataclass(frozen=True)
class EmbeddingStore:
    """One encoder's embeddings folder (encoder + patch geometry), chapter files and markers."""

    folder: Path

    def vectors_path(self, chapter_id: str) -> Path:
        return self.folder / f"{chapter_id}.npy"

    def ids_path(self, chapter_id: str) -> Path:
        return self.folder / f"{chapter_id}.parquet"

    def pages_path(self, chapter_id: str) -> Path:
        return self.folder / "pages" / f"{chapter_id}.parquet"

    def marker(self, chapter_id: str) -> Path:
        return marker_path(self.folder / chapter_id)

    def files_present(self, chapter_id: str) -> bool:
        """Every file `write` makes is there (a check after files were deleted by hand; their bytes are not read)."""
        paths = (self.vectors_path(chapter_id), self.ids_path(chapter_id), self.pages_path(chapter_id))
        return all(path.exists() for path in paths)

    def state(self, chapter_id: str) -> dict[str, Any] | None:
        """The chapter's completion marker (version, page-store stat), or None if not (completely) embedded."""
        path = self.marker(chapter_id)
        return read_json(path) if path.exists() else None

    def read_vectors(self, chapter_id: str) -> tuple[dict[str, Any], pa.Table, np.ndarray] | None:
        """(marker, EMBEDDINGS ids, memory-mapped vectors) of a completely embedded chapter; None if incomplete.

        The one way to read vectors: without the marker (never embedded, or a run killed while rewriting it,
        since `write` removes it first) the files may pair new vectors with old ids, so they are not read at all.
        Files that disagree with each other or the marker raise ValueError.
        """
        state = self.state(chapter_id)
        if state is None:
            return None
        vectors = np.load(self.vectors_path(chapter_id), mmap_mode="r")
        ids = read_parquet(self.ids_path(chapter_id), EMBEDDINGS)
        rows = state.get("rows", ids.num_rows)
        if vectors.ndim != 2 or not vectors.shape[0] == ids.num_rows == rows:
            raise ValueError(
                f"chapter {chapter_id} in {self.folder}: vectors {vectors.shape}, {ids.num_rows} id rows and "
                f"{rows} rows in its marker disagree (rerun the retrieval job)"
            )
        bounds = pc.min_max(ids["row"]).as_py()
        if ids.num_rows and not 0 <= bounds["min"] <= bounds["max"] < vectors.shape[0]:
            raise ValueError(f"chapter {chapter_id} in {self.folder}: id rows {bounds} lie outside its {rows} vectors")
        return state, ids, vectors

    def load(self, chapter_id: str) -> ChapterEmbeddings:
        stored = self.read_vectors(chapter_id)
        if stored is None:
            raise FileNotFoundError(f"chapter {chapter_id} has no completed embeddings in {self.folder}")
        state, ids, vectors = stored
        pages = read_parquet(self.pages_path(chapter_id), EMBEDDED_PAGES)
        return ChapterEmbeddings(chapter_id, state["version"], vectors, ids, pages)

    def write(
        self, chapter_id: str, vectors: np.ndarray, ids: pa.Table, pages: pa.Table, marker: dict[str, Any]
    ) -> None:
        """Replace a chapter's files; the marker goes first and comes back last, so a crash never pairs stale files."""
        self.marker(chapter_id).unlink(missing_ok=True)
        write_parquet(pages, self.pages_path(chapter_id), EMBEDDED_PAGES)
        with atomic_path(self.vectors_path(chapter_id)) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(vectors, dtype=np.float16))
        write_parquet(ids, self.ids_path(chapter_id), EMBEDDINGS)
        write_marker(self.folder / chapter_id, marker)
