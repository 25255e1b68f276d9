"""Where each stage keeps its outputs under the data folder OUT: one place, so stages never guess paths.

OUT/
  manifest.parquet                         chapters found in the input (MANIFEST)
  ingest/pages/<chapter_id>.parquet        per-chapter parts of the pages table (+ .done.json markers)
  ingest/chapters/<chapter_id>.parquet     per-chapter row of the chapters table
  pagestore/<chapter_id>.parquet           normalised colour frames of kept chapters (PAGE_STORE)
  pages.parquet, chapters.parquet          consolidated tables, written when the stage completes
  ingest.summary.json                      run summary, written last: the stage's completion marker
  retrieval/embeddings/<encoder_id>/       per-chapter embeddings (.npy fp16 + .parquet ids, pages/ hashes), one
                                           folder per encoder and page size (the id hashes both)
  retrieval/runs/<run_id>/                 pools and retrievals of one (encoder, size, refs, k, seed) setting
  pools.parquet, retrievals.parquet        consolidated tables of the latest retrieval run
  screentone/<renderer_id>/<WxH>/          per-chapter screentone renderings (SCREENTONE)
  splits.parquet                           series -> split
  duplicates.parquet                       leakage check: held-out pages and their training near-duplicates
  shards/<split>/                          WebDataset tars, Parquet indexes, stats markers, manifest.json
  shards/manifest.json                     the dataset manifest (every split and shard, config, code version)
  benchmark/                               ColorFlow-Bench-style held-out chapters
  shards.summary.json                      run summary of the shard job, written last
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataLayout:
    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike) -> DataLayout:
        return cls(Path(root))

    # ingestion
    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def ingest_pages(self) -> Path:
        return self.root / "ingest" / "pages"

    @property
    def ingest_chapters(self) -> Path:
        return self.root / "ingest" / "chapters"

    @property
    def pagestore(self) -> Path:
        return self.root / "pagestore"

    def pagestore_chapter(self, chapter_id: str) -> Path:
        return self.pagestore / f"{chapter_id}.parquet"

    @property
    def pages(self) -> Path:
        return self.root / "pages.parquet"

    @property
    def chapters(self) -> Path:
        return self.root / "chapters.parquet"

    def summary(self, stage: str) -> Path:
        return self.root / f"{stage}.summary.json"

    # retrieval
    @property
    def embeddings_root(self) -> Path:
        return self.root / "retrieval" / "embeddings"

    def embeddings(self, encoder_id: str) -> Path:
        return self.embeddings_root / encoder_id

    @property
    def retrieval_runs(self) -> Path:
        return self.root / "retrieval" / "runs"

    def retrieval_run(self, run_id: str) -> Path:
        return self.retrieval_runs / run_id

    @property
    def pools(self) -> Path:
        return self.root / "pools.parquet"

    @property
    def retrievals(self) -> Path:
        return self.root / "retrievals.parquet"

    # screentone
    @property
    def screentone_root(self) -> Path:
        return self.root / "screentone"

    def screentone(self, renderer_id: str, width: int, height: int) -> Path:
        return self.screentone_root / renderer_id / f"{width}x{height}"

    # shards and splits
    @property
    def splits(self) -> Path:
        return self.root / "splits.parquet"

    def shards(self, split: str) -> Path:
        return self.root / "shards" / split

    @property
    def benchmark(self) -> Path:
        return self.root / "benchmark"

    @property
    def duplicates(self) -> Path:
        return self.root / "duplicates.parquet"

    @property
    def shards_manifest(self) -> Path:
        return self.root / "shards" / "manifest.json"


def subfolders(folder: Path) -> list[Path]:
    """The folders directly in `folder`, sorted (none if it does not exist)."""
    return sorted(path for path in folder.iterdir() if path.is_dir()) if folder.is_dir() else []
