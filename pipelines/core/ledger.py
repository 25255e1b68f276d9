"""A stage's chapter ledger: per chapter, the key of what its output was made from and the record its task returned.

Every stage already writes a completion marker per chapter, and a check task reads it on each run. At 50k chapters
those reads are the whole cost of a run that changes one chapter, and the driver still needs each chapter's record
(counts, the sha256 of its table parts) to write the stage summary. The ledger keeps both in one Parquet file
(`LEDGER` rows, one per chapter) that the stage writes after a run: on the next run the driver computes each
chapter's key from what it already holds (options, an upstream ledger's record, a signature the pipeline took) and
skips every chapter whose stored key matches, without a task or a marker read (`vouched`). Chapters whose key
differs, or that the ledger lacks, are checked against their markers as before, so a missing or stale ledger only
costs time, never correctness.

A stage reads its ledger only when its summary exists at the start of the run (the previous run completed; a
killed run leaves no summary, and the next run reads every marker). It is trusted as a stage summary is: a file
deleted by hand under a vouched chapter is not noticed. Delete the ledger (or pass the stage's rebuild option) to
have every marker read again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.layout import DataLayout
from pipelines.core.schemas import LEDGER
from pipelines.core.storage import stable_hash, write_parquet


@dataclass(frozen=True)
class LedgerEntry:
    key: str  # what the chapter's output was made from (a hash the stage defines)
    record: dict[str, Any]  # what its task (or its marker) said: counts, part fingerprints


def chapter_key(*parts: Any) -> str:
    """A ledger key from the things a chapter's output depends on (JSON-able values)."""
    return stable_hash(list(parts), 24)


def read_ledger(path: str | os.PathLike) -> dict[str, LedgerEntry]:
    """chapter_id -> entry; empty when the ledger is missing or unreadable (the stage then reads every marker)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        table = pq.read_table(path, columns=LEDGER.names)
    except (OSError, pa.ArrowInvalid):
        return {}
    columns = [table.column(name).to_pylist() for name in LEDGER.names]
    return {chapter: LedgerEntry(key, json.loads(record)) for chapter, key, record in zip(*columns, strict=True)}


def vouched(ledger: dict[str, LedgerEntry], keys: dict[str, str]) -> dict[str, dict[str, Any]]:
    """chapter_id -> record of the chapters of `keys` (chapter_id -> the key it has now) whose ledger key matches."""
    return {c: ledger[c].record for c, key in keys.items() if c in ledger and ledger[c].key == key}


def write_ledger(path: str | os.PathLike, entries: dict[str, LedgerEntry], previous: dict[str, LedgerEntry]) -> bool:
    """Write the ledger atomically, rows in chapter order, when it differs from `previous` (what was read at the
    start): a run that changed nothing writes nothing. Returns whether it wrote."""
    ids = sorted(entries)
    rows = {c: (entries[c].key, _json(entries[c].record)) for c in ids}
    if Path(path).is_file() and rows == {c: (e.key, _json(e.record)) for c, e in previous.items()}:
        return False
    table = pa.table(
        {"chapter_id": ids, "key": [rows[c][0] for c in ids], "record": [rows[c][1] for c in ids]}, schema=LEDGER
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_parquet(table, path, LEDGER)
    return True


INGEST_LEDGER = "ingest"  # the ledger ingestion writes; later stages key theirs on it


def ingested_versions(layout: DataLayout) -> dict[str, str]:
    """chapter_id -> a version of what ingestion made of the chapter, from its ledger: the entry's key (options,
    input signature) and its record's parts' sha256. Later stages key their ledgers on it, so a chapter ingested
    again is checked again by them (the parts alone would miss a page store re-encoded under other options). Empty
    without an ingest ledger (an older output folder): every chapter is then checked against its markers."""
    ledger = read_ledger(layout.ledger(INGEST_LEDGER))
    return {c: chapter_key(e.key, e.record["parts"]) for c, e in ledger.items() if "parts" in e.record}


def _json(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, default=str)
