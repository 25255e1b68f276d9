"""The shard plan's input snapshot (`pipelines.shards.inputs`): with the upstream ledgers, a rerun reads only the
parts whose sha256 changed (a new chapter, a changed one, one the ledger lacks) and drops the parts gone, and what it
returns is the whole-table read, row order included; on Ray the parts are read by tasks with the same result; the
stage itself reads no part on a rerun over unchanged tables, and without ledgers reads the tables whole."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipelines.core.layout import DataLayout
from pipelines.core.ledger import LedgerEntry, read_ledger, write_ledger
from pipelines.core.schemas import CHAPTERS, PAGES, POOLS
from pipelines.core.storage import part_path, read_json, read_table, table_parts, write_part
from pipelines.shards import inputs as plan_inputs
from pipelines.shards.benchmark import read_frames
from pipelines.shards.inputs import PlanInputs
from pipelines.shards.stage import ShardOptions, run_shards

POOL_COLUMNS = ["frame_id", "status"]


@pytest.fixture
def data(pipeline_data: Path, tmp_path: Path) -> Path:
    """A copy of the pipeline fixture's output (its stages wrote the ingest and retrieval ledgers) without the shard
    stage's snapshot, so the first read here reads every part."""
    copy = tmp_path / "data"
    shutil.copytree(pipeline_data, copy)
    shutil.rmtree(DataLayout.at(copy).shard_inputs("pages.parquet").parent)
    return copy


def _whole(layout: DataLayout) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Frames, chapters and pool columns as the stage read them before the snapshot: every part, every run."""
    frames, chapters = read_frames(layout)
    return frames, chapters, read_table(layout.pools, columns=POOL_COLUMNS)


def _planned(inputs: PlanInputs) -> tuple[pa.Table, pa.Table, pa.Table]:
    frames, chapters = read_frames(inputs.layout, inputs.read)
    return frames, chapters, inputs.read(inputs.layout.pools, POOL_COLUMNS)


def _assert_same(got: tuple[pa.Table, ...], want: tuple[pa.Table, ...]) -> None:
    for table, expected in zip(got, want, strict=True):
        assert table.column_names == expected.column_names and table.schema.types == expected.schema.types
        assert table.to_pylist() == expected.to_pylist()  # values and row order


def _rewrite_part(layout: DataLayout, table: Path, schema: pa.Schema, source: str, chapter_id: str, edit) -> str:
    """Write `chapter_id`'s part of `table` from `source`'s rows (ids renamed, `edit` applied); returns its sha256."""
    rows = read_table(part_path(table, source), schema).to_pylist()
    for row in rows:
        for column in ("page_id", "frame_id"):
            if column in row and chapter_id != source:
                row[column] = f"{chapter_id}-{row[column]}"
        row["chapter_id"] = chapter_id
        edit(row)
    return write_part(table, chapter_id, pa.Table.from_pylist(rows, schema), schema)


def test_a_rerun_reads_only_the_changed_parts_and_returns_the_whole_table_read(data: Path) -> None:
    layout = DataLayout.at(data)
    first = PlanInputs(layout, local=True)
    _assert_same(_planned(first), _whole(layout))
    chapter_ids = sorted(read_ledger(layout.ledger("ingest")))
    tables = (layout.pages, layout.chapters, layout.pools)
    assert first.parts_read == {t.name: len(table_parts(t)) for t in tables} and len(chapter_ids) == 7
    snapshots = [layout.shard_inputs(t.name) for t in tables]
    stats = [p.stat().st_mtime_ns for p in snapshots]

    again = PlanInputs(layout, local=True)
    _assert_same(_planned(again), _whole(layout))
    assert set(again.parts_read.values()) == {0}
    assert [p.stat().st_mtime_ns for p in snapshots] == stats  # nothing changed: nothing written

    # a new chapter (its id sorts between two others), a changed one, one taken down, one the ledger lacks
    ingest, retrieval = read_ledger(layout.ledger("ingest")), read_ledger(layout.ledger("retrieval"))
    kept = [c for c in chapter_ids if c in retrieval]
    dropped = [c for c in chapter_ids if c not in retrieval]  # by ingestion: parts of pages and chapters only
    source, changed, gone, unledgered = kept[0], kept[1], dropped[0], dropped[1]
    frames_before = _whole(layout)[0]
    unstored = frames_before.filter(pc.equal(frames_before["chapter_id"], changed))["page_id"][0].as_py()
    added = chapter_ids[3][:-1] + ("0" if chapter_ids[3][-1] != "0" else "1")
    assert added not in chapter_ids
    parts = {
        "pages": _rewrite_part(layout, layout.pages, PAGES, source, added, lambda row: None),
        "chapters": _rewrite_part(layout, layout.chapters, CHAPTERS, source, added, lambda row: None),
    }
    ingest[added] = LedgerEntry("new", {"parts": parts})
    retrieval[added] = LedgerEntry("new", {"parts": {"pools": _rewrite_part(
        layout, layout.pools, POOLS, source, added, lambda row: row.update(status="excluded")
    )}})  # fmt: skip
    unstore = lambda row: row.update(stored=False) if row["page_id"] == unstored else None  # noqa: E731
    ingest[changed] = LedgerEntry("changed", {"parts": {**ingest[changed].record["parts"], "pages": _rewrite_part(
        layout, layout.pages, PAGES, changed, changed, unstore
    )}})  # fmt: skip
    for table in tables:
        part_path(table, gone).unlink(missing_ok=True)
    del ingest[gone]
    del ingest[unledgered]
    write_ledger(layout.ledger("ingest"), ingest, {})
    write_ledger(layout.ledger("retrieval"), retrieval, {})

    rerun = PlanInputs(layout, local=True)
    planned = _planned(rerun)
    _assert_same(planned, _whole(layout))
    assert rerun.parts_read == {"pages.parquet": 3, "chapters.parquet": 2, "pools.parquet": 1}
    frames, chapters, pools = planned
    assert added in frames["chapter_id"].to_pylist() and gone not in chapters["chapter_id"].to_pylist()
    assert unstored not in frames["page_id"].to_pylist()
    assert pc.sum(pc.equal(pools["status"], "excluded")).as_py() >= 3

    settled = PlanInputs(layout, local=True)
    _assert_same(_planned(settled), planned)
    # only the chapter the ledger lacks is read again, on every run (it is never kept)
    assert settled.parts_read == {"pages.parquet": 1, "chapters.parquet": 1, "pools.parquet": 0}


def test_on_ray_the_changed_parts_are_read_by_tasks(
    data: Path, ray_local: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = DataLayout.at(data)
    monkeypatch.setattr(plan_inputs, "PARTS_PER_READ", 2)  # 7 parts: four reading tasks
    whole = _whole(layout)
    on_ray = PlanInputs(layout, local=False)
    _assert_same(_planned(on_ray), whole)
    assert on_ray.parts_read["pages.parquet"] == 7
    _assert_same(_planned(PlanInputs(layout, local=False, rebuild=True)), whole)
    for table, columns in ((layout.pages, ["page_id", "chapter_id"]), (layout.pools, POOL_COLUMNS)):
        assert plan_inputs.read_parts(table, columns, local=False).equals(read_table(table, columns=columns))


def _untimed(summary: Any) -> Any:
    """A summary without its wall-clock figures (an empty split's run report has one each run)."""
    if isinstance(summary, dict):
        return {k: _untimed(v) for k, v in summary.items() if k != "seconds"}
    return summary


def test_the_stage_reads_no_part_when_no_table_changed(data: Path) -> None:
    layout = DataLayout.at(data)
    options = read_json(layout.shards_manifest)["options"]
    options = ShardOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    tars = {p: p.read_bytes() for p in sorted((data / "shards").rglob("*.tar"))}
    layout.summary("shards").unlink()
    first = run_shards(data, options, local=True)
    assert first["inputs"]["parts_read"]["pages.parquet"] == 7 and first["complete"]
    layout.summary("shards").unlink()
    rerun = run_shards(data, options, local=True)
    assert set(rerun["inputs"]["parts_read"].values()) == {0}
    assert _untimed({**rerun, "inputs": None}) == _untimed({**first, "inputs": None})
    assert {p: p.read_bytes() for p in sorted((data / "shards").rglob("*.tar"))} == tars
    for name in ("ingest", "retrieval"):
        layout.ledger(name).unlink()
    layout.summary("shards").unlink()
    assert set(run_shards(data, options, local=True)["inputs"]["parts_read"].values()) == {None}
