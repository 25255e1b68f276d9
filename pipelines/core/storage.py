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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; if the block succeeds, fsync it, rename it over `path` and fsync
    the folder, so the file is on disk under its final name before anything (a marker) declares it done."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}")
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


def read_parquet(path: str | os.PathLike, schema: pa.Schema | None = None) -> pa.Table:
    table = pq.read_table(path)
    return table.select(schema.names).cast(schema) if schema is not None else table


def read_parquet_parts(folder: str | os.PathLike, schema: pa.Schema) -> pa.Table:
    """Concatenate every completed part of a table folder in name order (deterministic row order)."""
    parts = sorted(p for p in Path(folder).glob("*.parquet") if TMP_TAG not in p.name) if Path(folder).exists() else []
    tables = [read_parquet(p, schema) for p in parts]
    return pa.concat_tables(tables) if tables else schema.empty_table()


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


def chapter_of(path: Path) -> str:
    """The chapter id a per-chapter file is named by: its name up to the first dot (ids have none)."""
    return path.name.split(".", 1)[0]


def purge_chapter_files(folder: str | os.PathLike, keep: set[str]) -> set[str]:
    """Delete the per-chapter files (`<chapter_id>.npy`, `.parquet` and their `.done.json` markers) in `folder`
    (not below it) whose chapter is not in `keep`; returns the ids of the chapters purged.

    Markers go before data, so a purge killed half-way never leaves a marker over missing files; a rerun purges
    the rest. Other files (`encoder.json`, `run.json`) and temporary files are left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return set()
    purged: set[str] = set()
    for suffix in CHAPTER_FILE_SUFFIXES:
        for path in sorted(folder.glob(f"*{suffix}")):
            if TMP_TAG in path.name or chapter_of(path) in keep or not path.is_file():
                continue
            path.unlink(missing_ok=True)
            purged.add(chapter_of(path))
    return purged
