"""Atomic writes and markers: a final name never holds a partial file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipelines.core.storage import (
    atomic_path,
    atomic_write_json,
    is_done,
    purge_chapter_files,
    read_json,
    read_parquet_parts,
    read_table,
    sweep_tmp,
    tables_fingerprint,
    write_marker,
    write_parquet,
    write_part,
)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "a" / "file.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_json_is_byte_stable(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    first = (tmp_path / "a.json").read_bytes()
    atomic_write_json(tmp_path / "a.json", {"a": [1, 2], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == first
    assert read_json(tmp_path / "a.json") == {"a": [1, 2], "b": 1}


def test_markers_and_parts(tmp_path: Path) -> None:
    schema = pa.schema([pa.field("x", pa.int32(), nullable=False)])
    write_parquet(pa.table({"x": [2]}), tmp_path / "parts" / "b.parquet", schema)
    write_parquet(pa.table({"x": [1]}), tmp_path / "parts" / "a.parquet", schema)
    (tmp_path / "parts" / "c.parquet.tmp-1-abc").write_bytes(b"garbage from a killed run")
    assert read_parquet_parts(tmp_path / "parts", schema).column("x").to_pylist() == [1, 2]
    assert sweep_tmp(tmp_path) == 1
    assert not is_done(tmp_path / "parts")
    write_marker(tmp_path / "parts", {"rows": 2})
    assert is_done(tmp_path / "parts")
    assert read_parquet_parts(tmp_path / "missing", schema).num_rows == 0


def test_a_table_folder_reads_as_one_table_and_by_chapter(tmp_path: Path) -> None:
    schema = pa.schema([pa.field("chapter_id", pa.string(), nullable=False), pa.field("x", pa.int32())])
    table = tmp_path / "retrievals.parquet"
    digests = {
        c: write_part(table, c, pa.table({"chapter_id": [c, c], "x": [i, i + 10]}), schema) for i, c in enumerate("ab")
    }
    assert digests["a"] == hashlib.sha256((table / "a.parquet").read_bytes()).hexdigest()  # the part's fingerprint
    (table / ".c.parquet.tmp-1-abc").write_bytes(b"a part still being written: hidden from every reader")
    assert pq.read_table(table).num_rows == read_table(table, schema).num_rows == 4
    assert ds.dataset(table, format="parquet").to_table().column("x").to_pylist() == [0, 10, 1, 11]
    (table / "z.parquet").write_bytes(b"another chapter's broken part")
    assert read_table(table, schema, keys=["b"]).column("x").to_pylist() == [1, 11]  # z is never opened
    assert read_table(table, schema, keys=["missing"]).num_rows == 0
    with pytest.raises(pa.ArrowInvalid):
        read_table(table, schema)
    legacy = tmp_path / "pools.parquet"  # a single file of an earlier version is read the same way
    write_parquet(pa.table({"chapter_id": ["a", "b"], "x": [1, 2]}), legacy, schema)
    assert read_table(legacy, schema, keys=["b"]).column("x").to_pylist() == [2]
    assert tables_fingerprint(digests) != tables_fingerprint({**digests, "b": digests["a"]})


@pytest.mark.parametrize("named", [False, True])
def test_purge_deletes_only_the_files_of_chapters_not_kept(tmp_path: Path, named: bool) -> None:
    """Listed or named (`candidates`), a purge deletes a chapter's parts, vectors and marker, and nothing else: not
    the kept chapter's files, a folder's own records, temporary files or subfolders."""
    for name in ("keep.parquet", "keep.done.json", "gone.parquet", "gone.npy", "gone.done.json", "encoder.json"):
        (tmp_path / name).write_text(name)
    (tmp_path / ".gone.parquet.tmp-1-ab").write_text("being written")
    (tmp_path / "pages").mkdir()
    candidates = ["keep", "gone", "never"] if named else None
    assert purge_chapter_files(tmp_path, {"keep"}, candidates) == {"gone"}
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".gone.parquet.tmp-1-ab", "encoder.json", "keep.done.json", "keep.parquet", "pages"]
    assert purge_chapter_files(tmp_path, {"keep"}, candidates) == set()
