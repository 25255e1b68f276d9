"""Where each stage keeps its outputs under the data folder OUT: one place, so stages never guess paths.

OUT/
  manifest.parquet                         chapters found in the input (MANIFEST)
  pages.parquet/<chapter_id>.parquet       the pages table: a folder of one part per chapter (a Parquet dataset)
  chapters.parquet/<chapter_id>.parquet    the chapters table, one part (one row) per chapter
  ingest/markers/<chapter_id>.done.json    a chapter's ingestion marker: signature, counts, its parts' sha256
  ingest/kept.json                         the ids of the kept chapters (what later stages work on)
  pagestore/<chapter_id>.parquet           normalised colour frames of kept chapters (PAGE_STORE)
  ingest.summary.json                      run summary, written last: the stage's completion marker
  ledgers/<name>.parquet                   per stage, what each chapter was last finished from (LEDGER): a
                                           rerun skips the chapters whose key still matches without reading
                                           their markers
  retrieval/embeddings/<encoder_id>/       per-chapter embeddings (.npy fp16 + .parquet ids, pages/ hashes), one
                                           folder per encoder and page size (the id hashes both)
  retrieval/runs/<run_id>/run.json         the settings of a retrieval run (encoder, size, refs, k, seed)
  retrieval/search/<chapter_id>.done.json  a chapter's search marker: run id, counts, its parts' sha256
  pools.parquet/, retrievals.parquet/      the latest retrieval run's tables, one part per chapter
  screentone/<renderer_id>/<WxH>/          per-chapter screentone renderings (SCREENTONE)
  splits.parquet                           series -> split
  duplicates.parquet                       leakage check: held-out pages and their training near-duplicates
  shards/leakage/                          the leakage check's state kept between runs: the whole-page vectors
                                           it gathered, per page its chapter's embeddings version, and the
                                           candidate pairs found so far (state.json, written last, names them)
  shards/<split>/                          WebDataset tars, Parquet indexes, stats markers, manifest.json
  shards/manifest.json                     the dataset manifest (every split and shard, config, code version)
  shards/inputs/<table>                    the planned columns of pages, chapters and pools, each row with its
                                           part's sha256: a rerun reads only the parts that changed
  benchmark/                               ColorFlow-Bench-style held-out chapters
  shards.summary.json                      run summary of the shard job, written last

A table (`pages.parquet`, `chapters.parquet`, `pools.parquet`, `retrievals.parquet`) is a folder of part files
that pyarrow.dataset, DuckDB (`read_parquet('OUT/pages.parquet/*.parquet')`) and Ray Data read as one table; a
run adds or replaces the parts of the chapters it processed and never rewrites the others. Read them in code
with `pipelines.core.storage.read_table`, which also reads the single files of an output folder written before.
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
    def ingest_markers(self) -> Path:
        return self.root / "ingest" / "markers"

    @property
    def kept_chapters(self) -> Path:
        """The sorted ids of the kept chapters (JSON), written with the ingestion summary: later stages' list."""
        return self.root / "ingest" / "kept.json"

    @property
    def legacy_ingest_parts(self) -> tuple[Path, Path]:
        """Where an earlier version kept the per-chapter parts it consolidated (removed by the next ingestion)."""
        return self.root / "ingest" / "pages", self.root / "ingest" / "chapters"

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

    def ledger(self, name: str) -> Path:
        """A stage's chapter ledger (`pipelines.core.ledger`): `name` is the stage, plus what its output folder
        is specific to (an encoder, a renderer and size)."""
        return self.root / "ledgers" / f"{name}.parquet"

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
    def search_markers(self) -> Path:
        return self.root / "retrieval" / "search"

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

    def shard_inputs(self, table: str) -> Path:
        """The shard stage's snapshot of a table's planned columns (`pipelines.shards.inputs`), an Arrow IPC file
        named after the table, e.g. ``shards/inputs/pages.arrow`` for ``pages.parquet``."""
        return self.root / "shards" / "inputs" / f"{table.removesuffix('.parquet')}.arrow"

    @property
    def leakage_state(self) -> Path:
        """The leakage check's state (`pipelines.shards.leakage_state`): a rerun reads only the chapters it lacks."""
        return self.root / "shards" / "leakage"

    @property
    def shards_manifest(self) -> Path:
        return self.root / "shards" / "manifest.json"


def subfolders(folder: Path) -> list[Path]:
    """The folders directly in `folder`, sorted (none if it does not exist)."""
    return sorted(path for path in folder.iterdir() if path.is_dir()) if folder.is_dir() else []
