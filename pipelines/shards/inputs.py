"""The shard plan's inputs, kept between runs: the columns of the pages, chapters and pools tables the plan uses.

The plan needs every chapter's frames (pages and chapters tables) and every frame's pool status (pools table).
Reading those tables whole opens one part per chapter per table on every run, also on a run that adds a single
chapter. The snapshot keeps the planned columns in one Arrow IPC file per table (``OUT/shards/inputs/<table>.arrow``:
only this stage reads it, whole, and IPC writes and reads a few times faster than Parquet), each
row with the sha256 of the part it came from (`SNAPSHOT_SHA256`) as the upstream ledgers record it
(`pipelines.core.ledger`: the ingest record's ``parts`` for pages and chapters, the retrieval record's for pools).
A run lists each table folder once and reads only the parts whose recorded sha256 is not the snapshot's: new or
changed chapters, and chapters the ledger lacks (read on every run, never kept). Parts gone from the folder drop
out. Rows come out in part-name order, as a whole-table read returns them, so the plan is the same either way.

A row is kept under the sha256 of the part it was read from, so it stays right for as long as a ledger says the
part has those bytes: the snapshot is trusted as far as the ledgers are. Without the ledgers (an output folder
written before them), for a table kept as one file, or with ``rebuild``, the tables are read whole as before.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core.layout import DataLayout
from pipelines.core.ledger import LedgerEntry, read_ledger
from pipelines.core.schemas import SNAPSHOT_SHA256
from pipelines.core.storage import read_arrow, read_table, table_part_keys, write_arrow
from pipelines.runtime.distributor import map_in_tasks

PARTS_PER_READ = 256  # parts one reading task returns
PART_COLUMN = "chapter_id"  # every planned table's rows name the chapter whose part holds them


def _read_chunk(table: str, columns: list[str], keys: list[str]) -> pa.Table:
    return read_table(table, columns=columns, keys=keys)


def read_parts(table: Path, columns: list[str], local: bool, keys: list[str] | None = None) -> pa.Table:
    """Columns of a table's parts (those of the chapters `keys`, else every part). On Ray the parts are read by
    tasks of `PARTS_PER_READ` parts and the driver concatenates what they return; in this process by threads when
    `local`, for a table kept as one file, or for parts that fit one task."""
    if local or not table.is_dir():
        return read_table(table, columns=columns, keys=keys)
    keys = keys if keys is not None else table_part_keys(table)
    chunks = [keys[i : i + PARTS_PER_READ] for i in range(0, len(keys), PARTS_PER_READ)]
    read = functools.partial(_read_chunk, str(table), columns)
    tables = map_in_tasks(read, chunks, desc=f"read {table.name}", chunk=1, in_tasks_from=2)
    if any(t is None for t in tables):
        raise RuntimeError(f"{table}: a task reading its parts failed; rerun the shard job")
    return pa.concat_tables(tables, promote_options="default") if tables else read_table(table, columns=columns)


@dataclass(frozen=True)
class SnapshotRead:
    table: pa.Table  # the planned columns, rows as a whole-table read returns them
    parts_read: int  # parts read from the table folder on this run


def _stored(snapshot: Path, columns: list[str]) -> pa.Table | None:
    """The snapshot's rows, or None when it is missing, unreadable or lacks a planned column."""
    if not snapshot.is_file():
        return None
    try:
        stored = read_arrow(snapshot)
    except (OSError, pa.ArrowInvalid):
        return None
    return stored.select(columns) if set(columns) <= set(stored.column_names) else None


def _part_keys(table: pa.Table) -> dict[str, str]:
    """chapter -> the sha256 its rows were read under (rows without one are not counted)."""
    pairs = table.select([PART_COLUMN, SNAPSHOT_SHA256]).filter(pc.is_valid(table[SNAPSHOT_SHA256]))
    distinct = pairs.group_by([PART_COLUMN, SNAPSHOT_SHA256]).aggregate([])
    return dict(zip(distinct[PART_COLUMN].to_pylist(), distinct[SNAPSHOT_SHA256].to_pylist(), strict=True))


def read_through_snapshot(
    table: Path, columns: list[str], keys: dict[str, str], snapshot: Path, *, local: bool, reuse: bool = True
) -> SnapshotRead:
    """The `columns` of every part of `table`, read only where `keys` (chapter -> its part's sha256 now) differs
    from what `snapshot` holds (with `reuse=False`, every part); writes the snapshot (atomically) when it changed."""
    planned = columns if PART_COLUMN in columns else [*columns, PART_COLUMN]
    stored_columns = [*planned, SNAPSHOT_SHA256]
    listing = table_part_keys(table)
    if not listing:
        return SnapshotRead(read_parts(table, columns, local), 0)
    stored = _stored(snapshot, stored_columns) if reuse else None
    before = _part_keys(stored) if stored is not None else {}
    kept = [c for c in listing if c in keys and before.get(c) == keys[c]]
    fresh = [c for c in listing if not (c in keys and before.get(c) == keys[c])]
    pieces, after = [], {c: before[c] for c in kept}
    if kept and stored is not None:  # kept implies a stored snapshot
        pieces.append(stored.filter(pc.is_in(stored[PART_COLUMN], value_set=pa.array(kept, pa.string()))))
    if fresh:
        rows = read_parts(table, planned, local, fresh).select(planned)
        fresh_keys = pa.array([keys.get(c) for c in fresh], pa.string())
        at = pc.index_in(rows[PART_COLUMN], value_set=pa.array(fresh, pa.string()))
        pieces.append(rows.append_column(SNAPSHOT_SHA256, fresh_keys.take(at)))
        after |= {c: keys[c] for c in pc.unique(rows[PART_COLUMN]).to_pylist() if c in keys}
    combined = pa.concat_tables(pieces, promote_options="default")
    order = pc.index_in(combined[PART_COLUMN], value_set=pa.array(listing, pa.string()))
    combined = combined.take(pc.sort_indices(order))  # a stable sort: rows keep their order within a part
    if stored is None or after != before:  # the chapters kept, and under which sha256, changed
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        write_arrow(combined.filter(pc.is_valid(combined[SNAPSHOT_SHA256])), snapshot)
        snapshot.with_suffix(".parquet").unlink(missing_ok=True)  # the snapshot of earlier versions, if any
    return SnapshotRead(combined.select(columns), len(fresh))


@dataclass
class PlanInputs:
    """Reads the plan's tables for the shard stage (`read(table, columns)`, the reader `read_frames` takes):
    through the snapshot where the upstream ledgers give the parts' sha256, else whole."""

    layout: DataLayout
    local: bool
    rebuild: bool = False
    parts_read: dict[str, int | None] = field(default_factory=dict)  # table -> parts read (None: whole)
    _ledgers: dict[str, dict[str, LedgerEntry]] = field(default_factory=dict)

    def _sources(self) -> dict[Path, tuple[str, str]]:
        """table -> (the ledger recording its parts, the part's name in a ledger record's ``parts``)."""
        return {
            self.layout.pages: ("ingest", "pages"),
            self.layout.chapters: ("ingest", "chapters"),
            self.layout.pools: ("retrieval", "pools"),
        }

    def part_keys(self, table: Path) -> dict[str, str]:
        """chapter -> its part's sha256 in `table`, as the upstream ledger records it (empty without a ledger)."""
        ledger, part = self._sources()[table]
        if ledger not in self._ledgers:
            self._ledgers[ledger] = read_ledger(self.layout.ledger(ledger))
        entries = self._ledgers[ledger]
        return {c: e.record["parts"][part] for c, e in entries.items() if part in e.record.get("parts", {})}

    def read(self, table: Path, columns: list[str]) -> pa.Table:
        keys = self.part_keys(table)
        if not keys or not table.is_dir():
            self.parts_read[table.name] = None  # the whole table
            return read_parts(table, columns, self.local)
        snapshot = self.layout.shard_inputs(table.name)
        read = read_through_snapshot(table, columns, keys, snapshot, local=self.local, reuse=not self.rebuild)
        self.parts_read[table.name] = read.parts_read
        return read.table

    def summary(self) -> dict[str, Any]:
        return {"parts_read": dict(self.parts_read)}
