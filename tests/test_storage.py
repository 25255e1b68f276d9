"""Atomic writes and markers: a final name never holds a partial file."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from pipelines.core.storage import (
    atomic_path,
    atomic_write_json,
    is_done,
    read_json,
    read_parquet_parts,
    sweep_tmp,
    write_marker,
    write_parquet,
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
