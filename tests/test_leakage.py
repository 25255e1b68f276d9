"""Leakage check: planted duplicates of held-out pages in training are found (flat and IVF) and removed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from shard_inputs import Corpus, build_corpus, chapter_id_of, page_id_of

from pipelines.core.embeddings import EmbeddingStore
from pipelines.core.encoders import WEIGHT_FREE, WeightFreeEncoder, resolve_encoder
from pipelines.core.layout import DataLayout
from pipelines.core.ledger import LedgerEntry, write_ledger
from pipelines.shards.leakage import LeakageConfig, duplicate_train_pages, find_duplicates
from pipelines.shards.leakage_vectors import PageRef
from pipelines.shards.splits import TRAIN, VAL, SplitConfig, assign_splits, split_of
from pipelines.shards.stage import ShardOptions, run_shards

SERIES = [f"s{i}" for i in range(5)]
SEED = 7
SPLIT_OF = split_of(assign_splits(SERIES, ["s0"], SplitConfig(val_fraction=0.3, seed=SEED)))
TRAIN_SERIES = sorted(s for s, split in SPLIT_OF.items() if split == TRAIN)
VAL_SERIES = sorted(s for s, split in SPLIT_OF.items() if split == VAL)
OPTIONS = ShardOptions(
    size=(128, 192),
    shard_size=400_000,
    estimate_frames=4,
    val_fraction=0.3,
    bench_series=("s0",),
    bench_chapters=2,
    bench_refs=4,
    bench_bw=4,  # 8 of 8 pages: every page of a benchmark chapter is in the benchmark
    seed=SEED,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    assert TRAIN_SERIES and VAL_SERIES
    t0, t1 = SERIES.index(TRAIN_SERIES[0]), SERIES.index(TRAIN_SERIES[-1])
    v = SERIES.index(VAL_SERIES[0])
    plant = [
        ((0, 0, 2), (t0, 1)),  # a benchmark page re-saved into a training chapter
        ((0, 1, 5), (t1, 0)),  # another one
        ((v, 0, 3), (t0, 0)),  # a validation page re-saved into training
    ]
    root = tmp_path_factory.mktemp("leak") / "out"
    corpus = build_corpus(root, series=5, chapters_per_series=2, pages_per_chapter=8, plant=plant, render=(128, 192))
    return corpus


def _store(layout: DataLayout) -> EmbeddingStore:
    return EmbeddingStore(layout.embeddings(resolve_encoder(WEIGHT_FREE).encoder_id))


def _refs(corpus: Corpus, split_of_series: dict[str, str]) -> tuple[list[PageRef], list[PageRef]]:
    held, train = [], []
    for page_id, row in sorted(corpus.pages.items()):
        split = split_of_series[row["series"]]
        ref = PageRef(page_id, row["series"], row["chapter_id"], "bench" if split == "bench" else split)
        (train if split == TRAIN else held).append(ref)
    return held, train


def _planted_pairs(corpus: Corpus) -> set[tuple[str, str]]:
    return {(original, copy) for copy, original in corpus.planted.items()}


@pytest.mark.parametrize("ivf_min_train", [10**6, 1], ids=["flat", "ivf"])
def test_planted_duplicates_are_found_and_nothing_else(corpus: Corpus, ivf_min_train: int) -> None:
    encoder_id = resolve_encoder(WEIGHT_FREE).encoder_id
    held, train = _refs(corpus, SPLIT_OF)
    config = LeakageConfig(threshold=0.95, ivf_min_train=ivf_min_train, nlist=4, nprobe=4, seed=SEED)
    table, summary = find_duplicates(corpus.layout, encoder_id, held, train, config)
    assert summary["index"] == ("ivf" if ivf_min_train == 1 else "flat")
    confirmed = {(r["page_id"], r["train_page_id"]) for r in table.to_pylist() if r["duplicate"]}
    assert confirmed == _planted_pairs(corpus)
    assert summary["duplicates"] == 3 and summary["train_pages_removed"] == 3 and summary["unchecked"] == 0
    assert summary["by_split"]["bench"]["pages_with_duplicates"] == 2
    assert summary["by_split"]["val"]["pages_with_duplicates"] == 1
    rows = {(r["page_id"], r["train_page_id"]): r for r in table.to_pylist()}
    for pair in _planted_pairs(corpus):
        assert rows[pair]["score"] > 0.99 and rows[pair]["hash_distance"] < 0.25
    assert duplicate_train_pages(table) == set(corpus.planted)


def test_without_confirmation_every_candidate_counts(corpus: Corpus) -> None:
    encoder_id = resolve_encoder(WEIGHT_FREE).encoder_id
    held, train = _refs(corpus, SPLIT_OF)
    table, summary = find_duplicates(corpus.layout, encoder_id, held, train, LeakageConfig(confirm=False))
    assert summary["rejected_by_hash"] == 0 and table.column("hash_distance").null_count == table.num_rows
    assert _planted_pairs(corpus) <= {(r["page_id"], r["train_page_id"]) for r in table.to_pylist()}


def test_chapters_killed_mid_write_or_inconsistent_are_skipped_and_reported(corpus: Corpus, tmp_path: Path) -> None:
    layout = DataLayout.at(shutil.copytree(corpus.root, tmp_path / "out"))
    store = _store(layout)
    chapter_of = {page_id: row["chapter_id"] for page_id, row in corpus.pages.items()}
    pairs = sorted(_planted_pairs(corpus))
    # a training chapter holding a planted copy: new vectors (one page fewer) beside the old ids, marker intact
    corrupted = chapter_of[pairs[0][1]]
    rows = store.state(corrupted)["rows"]
    np.save(store.vectors_path(corrupted), np.zeros((rows - 1, WeightFreeEncoder.dim), dtype=np.float16))
    # a held-out chapter holding another original: a run killed while rewriting it (marker removed first)
    unmarked = next(chapter_of[a] for a, b in pairs if chapter_of[b] != corrupted)
    store.marker(unmarked).unlink()

    held, train = _refs(corpus, SPLIT_OF)
    table, summary = find_duplicates(layout, store.folder.name, held, train, LeakageConfig(seed=SEED))
    expected = {(a, b) for a, b in pairs if chapter_of[b] != corrupted and chapter_of[a] != unmarked}
    assert expected and expected != set(pairs)
    assert {(r["page_id"], r["train_page_id"]) for r in table.to_pylist() if r["duplicate"]} == expected
    skipped = {e["chapter_id"]: e["reason"] for e in summary["chapters_skipped_examples"]}
    assert summary["chapters_skipped"] == 2 and set(skipped) == {corrupted, unmarked}
    assert "disagree" in skipped[corrupted] and "no completed embeddings" in skipped[unmarked]
    assert summary["unchecked"] == sum(chapter_of[p.page_id] == unmarked for p in held) > 0
    assert summary["train_pages_indexed"] == sum(chapter_of[p.page_id] != corrupted for p in train)


def test_a_page_both_held_out_and_in_training_is_refused(corpus: Corpus) -> None:
    ref = PageRef("x", "s", "c", TRAIN)
    with pytest.raises(ValueError, match="both held out and in training"):
        find_duplicates(corpus.layout, "any", [ref], [ref], LeakageConfig())


def test_missing_embeddings_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run the retrieval job"):
        find_duplicates(DataLayout.at(tmp_path), "nope", [], [PageRef("a", "s", "c", TRAIN)], LeakageConfig())


def test_the_shard_job_removes_duplicates_from_training(corpus: Corpus) -> None:
    summary = run_shards(corpus.root, OPTIONS, local=True)
    layout = corpus.layout
    duplicates = pq.read_table(layout.duplicates)
    assert duplicate_train_pages(duplicates) == set(corpus.planted)
    leakage = summary["leakage"]
    assert leakage["train_frames_removed_as_duplicates"] == 3
    # frames whose reference ring shows a duplicate are dropped too (no pixel of a held-out page in training)
    retrievals = pq.read_table(layout.retrievals).to_pylist()
    referencing = {r["frame_id"] for r in retrievals if r["ref_page_id"] in corpus.planted} - set(corpus.planted)
    assert referencing and leakage["train_frames_removed_referencing_duplicates"] == len(referencing)
    keys = {
        key
        for index in sorted(layout.shards(TRAIN).glob("*.index.parquet"))
        for key in pq.read_table(index).column("key").to_pylist()
    }
    assert keys and not keys & (set(corpus.planted) | referencing)
    train_frames = [p for p, row in corpus.pages.items() if SPLIT_OF[row["series"]] == TRAIN]
    assert len(keys) == len(train_frames) - 3 - len(referencing)
    assert summary["frames_per_split"]["bench"] == 16
    copy_in_train = page_id_of(TRAIN_SERIES[0], "ch01", 8)
    assert copy_in_train in corpus.planted and corpus.pages[copy_in_train]["chapter_id"] == chapter_id_of(
        TRAIN_SERIES[0], "ch01"
    )


def test_with_the_embeddings_ledger_the_shard_job_keeps_a_leakage_state(corpus: Corpus, tmp_path: Path) -> None:
    layout = DataLayout.at(shutil.copytree(corpus.root, tmp_path / "out"))
    store = _store(layout)
    chapters = sorted({row["chapter_id"] for row in corpus.pages.values()})
    entries = {c: LedgerEntry("key", {"version": store.state(c)["version"], "n_ok": 8, "n_error": 0}) for c in chapters}
    write_ledger(layout.ledger(f"embeddings-{store.folder.name}"), entries, {})
    summary = run_shards(layout.root, OPTIONS, local=True, rebuild=True)  # the copy may hold a finished run
    state = summary["leakage"]["state"]
    assert state["kept"] and state["started_over"] and state["pages_read"] == len(corpus.pages)
    assert (layout.leakage_state / "state.json").is_file()
    assert duplicate_train_pages(pq.read_table(layout.duplicates)) == set(corpus.planted)
