"""Atomic, idempotent file output shared by every stage.

A file appears under its final name only when complete (write to a temporary sibling, then rename), and a unit
of work is done only when its completion marker exists; the marker is written last. A killed run therefore
leaves either nothing or temporary files that the next run sweeps, never a partial file under a final name.

Durability: every file is flushed to disk (fsync) before it is renamed into place, and the folder holding it
after the rename, so a power loss cannot leave a marker that declares done a file whose bytes never reached
the disk (the marker is itself written the same way, after its data).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

TMP_TAG = ".tmp-"
MARKER_SUFFIX = ".done.json"


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's bytes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (names created or renamed in it) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under a folder, then every folder bottom-up (before the tree is renamed into place)."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync_dir(path) if path.is_dir() else fsync_file(path)
    fsync_dir(folder)


def publish_tree(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename a completed temporary folder onto `final` durably: its files first, then the parent's entry."""
    fsync_tree(tmp)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def replace_tree(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """`publish_tree` onto a folder that may already exist: the old one is moved aside first, removed after."""
    final = Path(final)
    old = final.with_name(f"{final.name}{TMP_TAG}old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.replace(final, old)
    publish_tree(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def tmp_sibling(final: Path) -> Path:
    """A unique temporary name beside `final`, hidden (leading dot) so that readers of a table folder
    (pyarrow.dataset, DuckDB globs, Ray Data) never see a part that is still being written."""
    return final.with_name(f".{final.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; if the block succeeds, fsync it, rename it over `path` and fsync
    the folder, so the file is on disk under its final name before anything (a marker) declares it done."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(final)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON with sorted keys so identical content gives identical bytes across reruns."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """One JSON value per non-empty line (labels files and the like)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_parquet(table: pa.Table, path: str | os.PathLike, schema: pa.Schema | None = None) -> None:
    """Write one Parquet file atomically; `schema` casts (and so validates) the table first."""
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_arrow(table: pa.Table, path: str | os.PathLike, schema: pa.Schema | None = None) -> None:
    """Write one Arrow IPC file (LZ4) atomically: for the state a stage keeps for itself and reads back whole
    (a few times faster to write and read than Parquet); tables others read stay Parquet."""
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    options = pa.ipc.IpcWriteOptions(compression="lz4")
    with atomic_path(path) as tmp, pa.ipc.new_file(str(tmp), table.schema, options=options) as writer:
        writer.write_table(table)


def read_arrow(path: str | os.PathLike, schema: pa.Schema | None = None) -> pa.Table:
    with pa.OSFile(str(path), "rb") as source:
        table = pa.ipc.open_file(source).read_all()
    return table.select(schema.names).cast(schema) if schema is not None else table


def read_parquet(path: str | os.PathLike, schema: pa.Schema | None = None) -> pa.Table:
    table = pq.read_table(path)
    return table.select(schema.names).cast(schema) if schema is not None else table


def read_parquet_parts(folder: str | os.PathLike, schema: pa.Schema) -> pa.Table:
    """Concatenate every completed part of a table folder in name order (deterministic row order); none if the
    folder does not exist."""
    return read_table(folder, schema) if Path(folder).is_dir() else schema.empty_table()


PART_SUFFIX = ".parquet"


def _part_names(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    # one listing of names, no stat: a table folder holds part files only (and hidden temporary ones)
    return sorted(n for n in os.listdir(folder) if n.endswith(PART_SUFFIX) and not n.startswith((".", "_")))


def table_parts(table: str | os.PathLike) -> list[Path]:
    """The completed part files of a table folder in name order (hidden temporary files are not parts)."""
    folder = Path(table)
    return [folder / name for name in _part_names(folder)]


def table_part_keys(table: str | os.PathLike) -> list[str]:
    """The keys (chapter ids) of a table folder's completed parts in `table_parts` order, without a path each."""
    return [chapter_of(name) for name in _part_names(Path(table))]


def part_path(table: str | os.PathLike, key: str) -> Path:
    """The part of a table folder that holds unit `key` (a chapter id): `<table>/<key>.parquet`."""
    return Path(table) / f"{key}{PART_SUFFIX}"


def write_part(table: str | os.PathLike, key: str, rows: pa.Table, schema: pa.Schema) -> str:
    """Write unit `key`'s part of a table folder atomically; returns the part's fingerprint (sha256 of its bytes),
    computed here by the task that writes it, so nobody ever hashes a whole table."""
    rows = rows.select(schema.names).cast(schema)
    digest = hashlib.sha256()
    with atomic_path(part_path(table, key)) as tmp:
        pq.write_table(rows, tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def tables_fingerprint(parts: dict[str, str]) -> str:
    """One fingerprint of a table from its parts' fingerprints (key -> part sha256)."""
    return stable_hash(sorted(parts.items()))


READ_THREADS = 8  # part files read at once: small files cost an open and a footer each, which threads overlap


def _read_parts(files: list[Path], schema: pa.Schema | None, columns: list[str] | None, expression: Any) -> pa.Table:
    """Parts read by a pool of threads (pyarrow's own dataset scan reads tiny files one after another), in order."""

    def read(path: Path) -> pa.Table:
        part = pq.ParquetFile(path).read(columns=columns, use_threads=False)
        if schema is not None:
            part = part.cast(pa.schema([schema.field(name) for name in part.column_names]))
        return part.filter(expression) if expression is not None else part

    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(files))) as pool:
        parts = list(pool.map(read, files))
    return pa.concat_tables(parts, promote_options="default")


def read_table(
    table: str | os.PathLike,
    schema: pa.Schema | None = None,
    *,
    keys: Iterable[str] | None = None,
    columns: list[str] | None = None,
    filter: Any = None,  # noqa: A002 - the pyarrow.dataset keyword
) -> pa.Table:
    """Read a table: a folder of part files (read as one dataset, parts in name order), or a single Parquet file
    (an output folder written before tables became folders is read transparently).

    `keys` reads only those units' parts (a shard task reads only its chapters' retrievals); on a single file it
    filters on `chapter_id` instead. `columns` and `filter` (a pyarrow.compute expression) are pushed down.
    """
    path = Path(table)
    if path.is_file():
        expression = filter
        if keys is not None:
            chosen = pc.is_in(pc.field("chapter_id"), pa.array(sorted(set(keys)), pa.string()))
            expression = chosen if expression is None else expression & chosen
        result = ds.dataset(path, format="parquet").to_table(columns=columns, filter=expression)
    elif path.is_dir() or keys is not None:
        files = (
            table_parts(path) if keys is None else [p for k in sorted(set(keys)) if (p := part_path(path, k)).exists()]
        )
        if not files:
            empty = schema.empty_table() if schema is not None else pa.table({})
            return empty.select(columns) if columns is not None and schema is not None else empty
        result = _read_parts(files, schema, columns, filter)
    else:
        raise FileNotFoundError(f"table {path} is missing")
    if schema is not None and columns is None:
        result = result.select(schema.names).cast(schema)
    return result


def stable_hash(obj: Any, length: int | None = None) -> str:
    """sha256 of an object's canonical JSON: equal settings give equal names on every machine and run."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:length] if length else digest


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, remembered per (path, size, modification time): a multi-GB checkpoint that the
    preconditions, the job and its fingerprints all name is read once per process."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(chunk), b""):
                digest.update(block)
        _FILE_DIGESTS[key] = digest.hexdigest()
    return _FILE_DIGESTS[key]


def marker_path(output: str | os.PathLike) -> Path:
    """The completion marker of an output (file or folder): `<output>.done.json`."""
    output = Path(output)
    return output.with_name(output.name + MARKER_SUFFIX)


def is_done(output: str | os.PathLike) -> bool:
    return marker_path(output).exists()


def write_marker(output: str | os.PathLike, stats: dict[str, Any]) -> None:
    """Mark an output complete; call only after every file of the unit is in place."""
    atomic_write_json(marker_path(output), stats)


def read_marker(output: str | os.PathLike) -> dict[str, Any]:
    return read_json(marker_path(output))


def sweep_tmp(folder: str | os.PathLike) -> int:
    """Delete temporary files a killed run left behind; returns how many were removed."""
    folder = Path(folder)
    if not folder.exists():
        return 0
    removed = 0
    for path in folder.rglob(f"*{TMP_TAG}*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


CHAPTER_FILE_SUFFIXES = (MARKER_SUFFIX, ".parquet", ".npy")  # a chapter's marker is listed first: it goes first


def chapter_of(path: str | os.PathLike) -> str:
    """The chapter id a per-chapter file is named by: its name up to the first dot (ids have none). Takes a path
    or a bare file name (a folder listing's names need no path object each)."""
    name = os.fspath(path)
    if "/" in name:  # a path (a listing's bare names skip the split: the driver calls this for every file listed)
        name = os.path.basename(name)
    return name.split(".", 1)[0]


def purge_chapter_files(folder: str | os.PathLike, keep: set[str], candidates: Iterable[str] | None = None) -> set[str]:
    """Delete the per-chapter files (`<chapter_id>.npy`, `.parquet` and their `.done.json` markers) in `folder`
    (not below it) whose chapter is not in `keep`; returns the ids of the chapters purged.

    `candidates`, when given, are the only chapters that may have files here (those a completed run left, from its
    ledger or manifest): their names are looked at and the folder is not listed. Otherwise the folder is listed
    once. Markers go before data, so a purge killed half-way never leaves a marker over missing files; a rerun
    purges the rest. Other files (`encoder.json`, `run.json`) and temporary files are left alone.
    """
    folder = Path(folder)
    if candidates is not None:
        names = [f"{c}{suffix}" for suffix in CHAPTER_FILE_SUFFIXES for c in sorted(set(candidates) - keep)]
        going = [name for name in names if (folder / name).is_file()]
    elif not folder.is_dir():
        return set()
    else:  # one listing of names; only the names of chapters not kept cost a stat (the rule of `chapter_of`)
        others = [name for name in os.listdir(folder) if name.split(".", 1)[0] not in keep]
        going = [name for name in others if TMP_TAG not in name and (folder / name).is_file()]
    purged: set[str] = set()
    for suffix in CHAPTER_FILE_SUFFIXES:
        for name in sorted(n for n in going if n.endswith(suffix)):
            (folder / name).unlink(missing_ok=True)
            purged.add(chapter_of(name))
    return purged
