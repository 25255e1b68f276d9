"""Append-only shard generations through `jobs.pipeline` on the tiny sample corpus: a no-op rerun writes only its
run record; one chapter added is processed alone by every stage and leaves every existing tar byte-identical; the
same chapter taken down changes only the tars that held it, and the manifest says so; a new held-out chapter that
repeats a train page rewrites only the tar that held the leaked frames, with the reason recorded; a dataset of another
sample format is never appended to, and readers refuse it."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import PIPELINE_ARGS

from jobs.pipeline import main as pipeline_main
from pipelines.core.geometry import RANKS_PER_PATCH
from pipelines.core.layout import DataLayout
from pipelines.core.pagestore import kept_chapter_ids
from pipelines.core.samples import SampleFormatError
from pipelines.core.schemas import DUPLICATES, PAGES, RETRIEVALS, SHARD_PLAN, SPLITS
from pipelines.core.seeding import unit_hash
from pipelines.core.sources import stable_id
from pipelines.core.storage import read_json, read_parquet, read_table
from pipelines.shards.splits import split_of
from pipelines.shards.stage import ShardOptions
from training.data import check_shards, resolve_shard_source, resumed_source


def _tars(data: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data)): p.read_bytes() for p in sorted((data / "shards").rglob("*.tar"))}


def _members(tar: Path) -> dict[str, dict[str, bytes]]:
    """key -> member suffix -> bytes, as webdataset reads the tar."""
    samples = wds.WebDataset([str(tar)], shardshuffle=False, empty_check=False)
    return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")} for s in samples}


TABLES = ("pages.parquet", "chapters.parquet", "pools.parquet", "retrievals.parquet")


def _chapter_files(data: Path) -> dict[str, bytes]:
    """Every per-chapter file (and folder record) of the stages that keep one file set per chapter."""
    folders = [data / name for name in ("ingest", "pagestore", "retrieval", "screentone", *TABLES)]
    return {str(p.relative_to(data)): p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


def _stats(data: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(data)): (p.stat().st_mtime_ns, p.stat().st_size) for p in data.rglob("*") if p.is_file()}


def test_add_take_down_and_rerun_a_chapter(tmp_path: Path) -> None:
    corpus, data = tmp_path / "corpus", tmp_path / "data"
    argv = ["--generate-sample", str(corpus), "--output", str(data), *PIPELINE_ARGS]
    pipeline_main(argv)
    layout = DataLayout.at(data)
    first = _tars(data)
    first_files = _chapter_files(data)
    assert first and all("-g0000-" in name for name in first)

    # a rerun with nothing new writes nothing but its run record
    before = _stats(data)
    pipeline_main(argv)
    after = _stats(data)
    assert sorted(name for name in after if after[name] != before.get(name)) == ["pipeline.summary.json"]

    # one chapter added to a training series: only it is processed, every existing tar keeps its bytes
    splits = split_of(read_parquet(layout.splits, SPLITS))
    series = next(s for s, split in sorted(splits.items()) if split == "train")
    colour = next(p for p in sorted((corpus / series).iterdir()) if p.name.startswith("ch001"))
    copy = corpus / series / colour.name.replace("ch001", "ch900")
    shutil.copytree(colour, copy) if colour.is_dir() else shutil.copy2(colour, copy)
    added = pipeline_main(argv)["stages"]
    assert added["ingest"]["summary"]["run"]["chapters_processed"] == 1
    assert added["ingest"]["summary"]["run"]["chapters_vouched"] == 7  # the others: no marker read
    assert added["retrieval"]["summary"]["embeddings"]["chapters_embedded"] == 1
    assert added["retrieval"]["summary"]["search"]["chapters_searched"] == 1
    assert added["screentone"]["summary"]["chapters_rendered"] == 1
    # every other chapter on its stage's ledger (no marker read), its table parts and vectors from the shard state
    retrieval = added["retrieval"]["summary"]
    assert retrieval["embeddings"]["chapters_vouched"] == retrieval["search"]["chapters_vouched"] == 2
    assert added["screentone"]["summary"]["chapters_vouched"] == 2
    shard_summary = added["shards"]["summary"]
    assert set(shard_summary["inputs"]["parts_read"].values()) == {1}
    assert shard_summary["leakage"]["state"]["chapters_read"] == 1
    train = added["shards"]["summary"]["splits"]["train"]
    now = _tars(data)
    assert {name: now[name] for name in first} == first
    new_tars = sorted(set(now) - set(first))
    assert new_tars and all(name.startswith("shards/train/train-g0001-") for name in new_tars)
    assert train["units_run"] == len(new_tars) and train["shards_replaced"] == 0
    manifest = read_json(layout.shards("train") / "manifest.json")
    assert manifest["generation"] == 1 and manifest["generations"][1]["frames_added"] == 24
    assert {g["sample_format_version"] for g in manifest["generations"]} == {manifest["sample_format_version"]}
    assert (layout.shards("train") / "manifest.g0000.json").is_file()  # the shard list a resumed run keeps
    now_files = _chapter_files(data)
    new_files = sorted(set(now_files) - set(first_files))
    for folder in ("ingest/markers", "pagestore", "retrieval/embeddings", "retrieval/search"):
        assert any(name.startswith(folder) for name in new_files), folder
    # each table folder gained one part, the added chapter's; every old part (every old file) kept its bytes
    added_id = stable_id(f"{series}/{copy.name}")
    for table in TABLES:
        assert [n for n in new_files if n.startswith(f"{table}/")] == [f"{table}/{added_id}.parquet"], table
    assert [n for n in first_files if now_files[n] != first_files[n]] == ["ingest/kept.json"]
    assert pq.read_table(data / "chapters.parquet").num_rows == 8  # pyarrow reads the folder as one table
    assert read_table(layout.pages, columns=["chapter_id"]).num_rows == added["ingest"]["summary"]["pages"]["total"]
    assert any(name.startswith("screentone") and name.endswith(".done.json") for name in new_files)

    # the chapter taken down: its files go in every stage, only the tars that held its frames go, and the new
    # generation records it; every other chapter's files keep their bytes
    shutil.rmtree(copy) if copy.is_dir() else copy.unlink()
    removed_stages = pipeline_main(argv)["stages"]
    assert removed_stages["ingest"]["summary"]["run"]["chapters_purged"] == 1
    assert removed_stages["retrieval"]["summary"]["chapters_purged"] == 1
    assert removed_stages["screentone"]["summary"]["chapters_purged"] == 1
    assert _chapter_files(data) == first_files
    assert _tars(data) == first
    manifest = read_json(layout.shards("train") / "manifest.json")
    removed = manifest["generations"][2]
    assert removed["shards_removed"] == [Path(name).name for name in new_tars] and not removed["shards_replaced"]
    assert len(removed["frames_removed"]) == 24
    assert all("no longer in the input" in frame["reason"] for frame in removed["frames_removed"])

    # a run that started on generation 1 and resumes now refuses in one line: its tars were taken down
    generation1 = layout.shards("train") / "manifest.g0001.json"
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "train_state.json").write_text(json.dumps({"shard_manifest": str(generation1)}))
    pinned = resumed_source(resolve_shard_source(data), checkpoint)
    assert pinned.manifest == str(generation1)
    with pytest.raises(Exception, match="a later generation removed it"):
        check_shards(pinned)


def test_verify_redoes_what_was_deleted_by_hand(tmp_path: Path, pipeline_data: Path) -> None:
    """Files deleted by hand go unnoticed by a rerun that trusts its summaries and ledgers; `--verify` checks every
    chapter, shard and benchmark chapter against its files and writes the missing ones again, with the same bytes."""
    data = shutil.copytree(pipeline_data, tmp_path / "data")
    layout = DataLayout.at(data)
    chapter = kept_chapter_ids(layout)[0]
    deleted = [
        layout.pagestore_chapter(chapter),
        next((data / "retrieval" / "embeddings").glob(f"*/{chapter}.npy")),
        next((data / "screentone").rglob(f"{chapter}.parquet")),
        sorted(layout.shards("train").glob("*.tar"))[0],
        sorted((data / "benchmark").glob("*/gt/*.jpg"))[0],
    ]
    before = {path: path.read_bytes() for path in deleted}
    for path in deleted:
        path.unlink()
    argv = ["--input", str(pipeline_data.parent / "corpus"), "--output", str(data), *PIPELINE_ARGS]
    trusted = pipeline_main(argv)["stages"]
    assert all(entry["skipped"] for entry in trusted.values())
    assert not any(path.exists() for path in deleted)

    verified = pipeline_main([*argv, "--verify"])["stages"]
    assert not any(entry["skipped"] for entry in verified.values())
    assert {path: path.read_bytes() for path in deleted} == before
    ingest = verified["ingest"]["summary"]["run"]
    assert ingest["chapters_processed"] == 1 and ingest["chapters_vouched"] == 0
    embeddings = verified["retrieval"]["summary"]["embeddings"]
    assert embeddings["chapters_embedded"] == 1 and embeddings["chapters_vouched"] == 0
    screentone = verified["screentone"]["summary"]
    assert screentone["chapters_rendered"] == 1 and screentone["chapters_vouched"] == 0
    assert verified["shards"]["summary"]["splits"]["train"]["units_run"] == 1
    assert verified["shards"]["summary"]["benchmark"]["units_run"] == 1


def test_another_sample_format_is_never_appended_to(tmp_path: Path, pipeline_data: Path) -> None:
    data = shutil.copytree(pipeline_data, tmp_path / "data")
    layout = DataLayout.at(data)
    for name in ("plan.json", "manifest.json"):  # as if an older code version had written the shards
        path = layout.shards("train") / name
        path.write_text(json.dumps({**read_json(path), "sample_format_version": 0}))
    (data / "shards.summary.json").unlink()
    argv = ["--input", str(pipeline_data.parent / "corpus"), "--output", str(data), *PIPELINE_ARGS]
    with pytest.raises(SampleFormatError, match="--rebuild"):
        pipeline_main(argv)
    path = layout.shards("train") / "manifest.json"
    with pytest.raises(SampleFormatError, match="version 0"):
        resolve_shard_source(path)


def test_a_new_held_out_chapter_removes_its_leaked_train_frame_from_one_tar(
    tmp_path: Path, pipeline_data: Path
) -> None:
    corpus = shutil.copytree(pipeline_data.parent / "corpus", tmp_path / "corpus")
    data = shutil.copytree(pipeline_data, tmp_path / "data")
    layout = DataLayout.at(data)
    train = layout.shards("train")
    argv = ["--input", str(corpus), "--output", str(data), *PIPELINE_ARGS]
    assert split_of(read_parquet(layout.splits, SPLITS)) == {"s1": "train", "s2": "bench"}
    first = _tars(data)
    benchmark = {str(p.relative_to(data)): p.read_bytes() for p in sorted(layout.benchmark.rglob("*")) if p.is_file()}

    # the train page to leak: one that other frames show in their rings, all of them in its own shard, so the
    # frames the leakage check removes (it and the frames whose ring shows it) sit in one tar
    shard_of = {r["frame_id"]: r["shard"] for r in read_parquet(train / "plan.parquet", SHARD_PLAN).to_pylist()}
    shown_by: dict[str, set[str]] = {}
    for row in read_table(layout.retrievals, RETRIEVALS).to_pylist():
        if row["rank"] < RANKS_PER_PATCH:
            shown_by.setdefault(row["ref_page_id"], set()).add(row["frame_id"])
    leaked = next(p for p in sorted(shard_of) if {shard_of[f] for f in shown_by.get(p, ())} == {shard_of[p]})
    source = {r["page_id"]: r["source"] for r in read_table(layout.pages, PAGES).to_pylist()}[leaked]

    # a new series that goes to validation by its hash, whose one chapter holds 20 benchmark pages (held out
    # already, so no other leak) and a copy of the train page
    val_series = next(n for n in (f"v{i}" for i in range(1000)) if unit_hash(0, "val", n) < ShardOptions().val_fraction)
    chapter = corpus / val_series / "ch001"
    chapter.mkdir(parents=True)
    with zipfile.ZipFile(corpus / "s2" / "ch001.cbz") as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".JPG"))
        for name in names[:20]:
            (chapter / name).write_bytes(archive.read(name))
    shutil.copy2(corpus / source, chapter / f"leak{Path(source).suffix}")
    stages = pipeline_main(argv)["stages"]
    assert split_of(read_parquet(layout.splits, SPLITS))[val_series] == "val"

    duplicates = [r for r in read_parquet(layout.duplicates, DUPLICATES).to_pylist() if r["duplicate"]]
    assert {(r["split"], r["series"], r["train_page_id"]) for r in duplicates} == {("val", val_series, leaked)}
    manifest = read_json(train / "manifest.json")
    generation = manifest["generations"][1]
    removed = {f["frame_id"]: f for f in generation["frames_removed"]}
    assert removed[leaked]["reason"] == "leakage: near-duplicate of a held-out page"
    assert {f["reason"] for k, f in removed.items() if k != leaked} == {
        "leakage: its ring shows a near-duplicate of a held-out page"
    }
    assert set(removed) == {leaked} | shown_by[leaked]
    rewritten = f"shards/train/{shard_of[leaked]}"
    assert generation["shards_replaced"] == [shard_of[leaked]] and not generation["shards_added"]
    assert not generation["shards_removed"] and generation["frames_added"] == 0
    assert stages["shards"]["summary"]["leakage"]["train_frames_removed_as_duplicates"] == 1

    # only that tar changed; the new validation frames went to new val shards; the benchmark is untouched
    now = _tars(data)
    assert {name: now[name] for name in first if name != rewritten} == {
        name: content for name, content in first.items() if name != rewritten
    }
    assert now[rewritten] != first[rewritten]
    added_tars = set(now) - set(first)
    assert added_tars and all(name.startswith("shards/val/val-g0000-") for name in added_tars)
    assert read_json(layout.shards("val") / "manifest.json")["nsamples"] == 21
    assert {str(p.relative_to(data)): p.read_bytes() for p in sorted(layout.benchmark.rglob("*")) if p.is_file()} == (
        benchmark
    )
    (tmp_path / "old.tar").write_bytes(first[rewritten])
    old, new = _members(tmp_path / "old.tar"), _members(data / rewritten)
    assert set(new) == set(old) - set(removed) and all(new[key] == old[key] for key in new)

    # a run that started on generation 0 refuses to resume over the rewritten tar, in one line
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "train_state.json").write_text(json.dumps({"shard_manifest": str(train / "manifest.g0000.json")}))
    with pytest.raises(Exception, match="a later generation rewrote it") as refused:
        check_shards(resumed_source(resolve_shard_source(data), checkpoint))
    assert "\n" not in str(refused.value) and shard_of[leaked] in str(refused.value)
