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

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.layout import DataLayout
from pipelines.core.schemas import LEDGER
from pipelines.core.storage import write_parquet


@dataclass(frozen=True)
class LedgerEntry:
    key: str  # what the chapter's output was made from (versions the stage joins with `chapter_key`)
    record: dict[str, Any]  # what its task (or its marker) said: counts, part fingerprints


def chapter_key(*parts: str) -> str:
    """A ledger key from the versions a chapter's output depends on (hashes, run ids: short strings), joined as
    they are: a stage keys every chapter on every run, so no hashing here. Hash settings once per run
    (`stable_hash`) and versions once per chapter (`content_version`) before passing them."""
    return ":".join(parts)


def content_version(*parts: str) -> str:
    """24 hex chars of the sha256 of `parts`: a short version of a chapter's output for later stages' keys."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


# path -> (file signature, entries, each entry's record as stored) of the ledger this process last read or wrote
_READ: dict[str, tuple[tuple[int, int, int], dict[str, LedgerEntry], dict[str, str]]] = {}


def read_ledger(path: str | os.PathLike) -> dict[str, LedgerEntry]:
    """chapter_id -> entry; empty when the ledger is missing or unreadable (the stage then reads every marker).

    The pipeline's stages read the same upstream ledgers in one process: a ledger whose file is unchanged since
    this process last read or wrote it (same inode, size and modification time; writes replace the file) is not
    parsed again.
    """
    path = Path(path)
    signature = _file_signature(path)
    if signature is None:
        return {}
    cached = _READ.get(str(path))
    if cached is not None and cached[0] == signature:
        return dict(cached[1])
    try:
        table = pq.read_table(path, columns=LEDGER.names)
    except (OSError, pa.ArrowInvalid):
        return {}
    chapters, keys, records = (table.column(name).to_pylist() for name in LEDGER.names)
    entries = {c: LedgerEntry(key, json.loads(record)) for c, key, record in zip(chapters, keys, records, strict=True)}
    _READ[str(path)] = (signature, entries, dict(zip(chapters, records, strict=True)))
    return dict(entries)


def vouched(ledger: dict[str, LedgerEntry], keys: dict[str, str]) -> dict[str, dict[str, Any]]:
    """chapter_id -> record of the chapters of `keys` (chapter_id -> the key it has now) whose ledger key matches."""
    return {c: ledger[c].record for c, key in keys.items() if c in ledger and ledger[c].key == key}


def write_ledger(path: str | os.PathLike, entries: dict[str, LedgerEntry], previous: dict[str, LedgerEntry]) -> bool:
    """Write the ledger atomically, rows in chapter order, when it differs from `previous` (what was read at the
    start): a run that changed nothing writes nothing. Returns whether it wrote."""
    path = Path(path)
    if path.is_file() and entries == previous:  # records compared as values: no serialisation
        return False
    cached = _READ.get(str(path))
    stored_entries, stored = (cached[1], cached[2]) if cached is not None else ({}, {})
    ids = sorted(entries)
    records = [
        stored[c]  # a record this process read from this file and still holds: its stored text is reused
        if c in stored and stored_entries[c].record is entries[c].record
        else json.dumps(entries[c].record, sort_keys=True, default=str)
        for c in ids
    ]
    table = pa.table({"chapter_id": ids, "key": [entries[c].key for c in ids], "record": records}, schema=LEDGER)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(table, path, LEDGER)
    signature = _file_signature(path)
    if signature is not None:  # later stages of this process read what was just written without parsing it
        _READ[str(path)] = (signature, dict(entries), dict(zip(ids, records, strict=True)))
    return True


INGEST_LEDGER = "ingest"  # the ledger ingestion writes; later stages key theirs on it


def ingested_versions(layout: DataLayout) -> dict[str, str]:
    """chapter_id -> a version of what ingestion made of the chapter, from its ledger: the entry's key (options,
    input signature) and its record's parts' sha256. Later stages key their ledgers on it, so a chapter ingested
    again is checked again by them (the parts alone would miss a page store re-encoded under other options). Empty
    without an ingest ledger (an older output folder): every chapter is then checked against its markers."""
    path = layout.ledger(INGEST_LEDGER)
    ledger = read_ledger(path)
    signature = _file_signature(path)
    cached = _VERSIONS.get(str(path))
    if cached is not None and cached[0] == signature:
        return dict(cached[1])
    # entries this process already versioned (the same objects, kept by a rewrite of the ledger) keep their version
    known_entries, known = (cached[2], cached[1]) if cached is not None else ({}, {})
    versions = {
        c: known[c]
        if c in known and known_entries.get(c) is e
        else content_version(e.key, *(f"{table}:{sha}" for table, sha in sorted(e.record["parts"].items())))
        for c, e in ledger.items()
        if "parts" in e.record
    }
    if signature is not None:
        _VERSIONS[str(path)] = (signature, versions, ledger)
    return dict(versions)


# ingest ledger path -> (its file signature, the versions, the entries they were computed from)
_VERSIONS: dict[str, tuple[tuple[int, int, int], dict[str, str], dict[str, LedgerEntry]]] = {}


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, modification time) of a ledger file, None when it is missing: writes replace the file, so an
    equal signature means the content this process already parsed."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns
