"""`--compact` through `jobs.pipeline` on the tiny sample corpus: two generations that each end in a small shard are
merged on request only; every sample survives exactly once with the same bytes, full shards keep theirs, a second
compaction changes nothing, the readers see the compacted set, and a run resumed on the old shard list refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import PIPELINE_ARGS

from jobs.pipeline import main as pipeline_main
from pipelines.core.layout import DataLayout
from pipelines.core.storage import read_json
from training.data import check_shards, resolve_shard_source, resumed_source


def _tars(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def _samples(tars: dict[str, bytes], folder: Path) -> dict[str, tuple[str, dict[str, bytes]]]:
    """key -> (its tar, member suffix -> bytes), read with webdataset from the tars' paths."""
    import webdataset as wds

    out: dict[str, tuple[str, dict[str, bytes]]] = {}
    for name in tars:
        for sample in wds.WebDataset([str(folder / name)], shardshuffle=False, empty_check=False):
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            assert sample["__key__"] not in out, f"{sample['__key__']} in two tars"
            out[sample["__key__"]] = (name, members)
    return out


def _add_chapter(corpus: Path, name: str, pages: list[str]) -> None:
    """A new chapter of the training series s1 made of the given pages of its first chapter (by source path)."""
    folder = corpus / "s1" / name
    folder.mkdir()
    for source in pages:
        shutil.copy2(corpus / source, folder / Path(source).name)


def test_compact_merges_small_generations_on_request_only(tmp_path: Path, pipeline_data: Path) -> None:
    corpus = shutil.copytree(pipeline_data.parent / "corpus", tmp_path / "corpus")
    data = shutil.copytree(pipeline_data, tmp_path / "data")
    layout = DataLayout.at(data)
    train = layout.shards("train")
    argv = ["--input", str(corpus), "--output", str(data), *PIPELINE_ARGS]
    per_shard = read_json(train / "manifest.json")["samples_per_shard"]
    assert per_shard == 6 and all(s["nsamples"] == per_shard for s in read_json(train / "manifest.json")["shards"])

    # two chapters of 21 frames (the fewest ingestion keeps): two generations of three full shards and a small one
    plan = pq.read_table(train / "plan.parquet").column("frame_id").to_pylist()
    pages = pq.read_table(layout.pages, columns=["page_id", "source"]).to_pylist()
    sources = sorted(p["source"] for p in pages if p["page_id"] in set(plan))
    for name, chosen in (("ch901", sources[:21]), ("ch902", sources[3:])):
        _add_chapter(corpus, name, chosen)
        pipeline_main(argv)
    manifest = read_json(train / "manifest.json")
    assert manifest["generation"] == 2
    sizes = {s["name"]: s["nsamples"] for s in manifest["shards"]}
    small = sorted(name for name, count in sizes.items() if count < per_shard)
    assert [name.split("-")[1] for name in small] == ["g0001", "g0002"]  # never compacted implicitly
    before = _tars(train)
    samples_before = _samples(before, train)
    assert len(samples_before) == manifest["nsamples"] == 24 + 2 * 21

    # --compact: the small shards' frames move to new shards of generation 3; nothing else changes
    compacted = pipeline_main([*argv, "--compact"])["stages"]["shards"]["summary"]["splits"]["train"]
    manifest = read_json(train / "manifest.json")
    generation = manifest["generations"][3]
    after = _tars(train)
    assert manifest["generation"] == 3 and compacted["shards_removed"] == len(small) == 2
    assert generation["shards_removed"] == small and not generation["shards_replaced"]
    assert generation["frames_added"] == 0 and not generation["frames_removed"]
    assert generation["frames_moved_by_compaction"] == sum(sizes[name] for name in small)
    assert sorted(set(after) - set(before)) == generation["shards_added"]
    assert all(name.startswith("train-g0003-") for name in generation["shards_added"])
    assert {name: after[name] for name in set(before) - set(small)} == {
        name: before[name] for name in set(before) - set(small)
    }  # full shards, of every generation, keep their bytes
    assert not set(small) & set(after)
    samples_after = _samples(after, train)
    assert {k: v[1] for k, v in samples_after.items()} == {k: v[1] for k, v in samples_before.items()}
    moved = {k for k, (name, _) in samples_before.items() if name in small}
    assert {k for k, (name, _) in samples_after.items() if name in generation["shards_added"]} == moved
    assert [s["nsamples"] for s in manifest["shards"] if s["name"] in generation["shards_added"]] == [6]

    # a second --compact finds one small shard, nothing to merge: it writes nothing (the stage is made to plan
    # again by removing its summary, which would otherwise skip it as already done with these options)
    stats = {p.name: p.stat().st_mtime_ns for p in train.iterdir()}
    (data / "shards.summary.json").unlink()
    again = pipeline_main([*argv, "--compact"])["stages"]["shards"]["summary"]["splits"]["train"]
    assert again["touched"] is False and again["generation"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in train.iterdir()} == stats

    # the readers see the compacted set: webdataset over the trainer's resolved URLs and wids through its index
    import wids

    source = resolve_shard_source(data)
    assert sorted(Path(url).name for url in source.urls) == sorted(after)
    assert source.manifest == str(train / "manifest.g0003.json") and source.nsamples == len(samples_before)
    dataset = wids.ShardListDataset(
        str(train / "index.wids.json"), cache_dir=str(tmp_path / "wids"), transformations=[]
    )
    assert len(dataset) == len(samples_before)
    assert {dataset[i]["__key__"] for i in range(len(dataset))} == set(samples_before)
    dataset.close()

    # a run that started on generation 2 keeps that shard list, and refuses in one line: a compacted tar is gone
    checkpoint = tmp_path / "checkpoint-8"
    checkpoint.mkdir()
    pinned_manifest = train / "manifest.g0002.json"
    (checkpoint / "train_state.json").write_text(json.dumps({"shard_manifest": str(pinned_manifest)}))
    pinned = resumed_source(source, checkpoint)
    assert sorted(Path(url).name for url in pinned.urls) == sorted(before)
    with pytest.raises(Exception, match="a later generation removed it") as refused:
        check_shards(pinned)
    assert "\n" not in str(refused.value) and small[0] in str(refused.value)
