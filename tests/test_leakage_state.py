"""The leakage state kept between runs: a rerun reads only the chapters it lacks and returns exactly what a
from-scratch check returns (exact index), across added, changed, moved and removed chapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipelines.core.embeddings import EmbeddingStore
from pipelines.core.geometry import WHOLE_PAGE_PATCH
from pipelines.core.layout import DataLayout
from pipelines.core.pools import HASH_BYTES
from pipelines.core.schemas import EMBEDDED_PAGES, EMBEDDINGS, table_from_rows
from pipelines.core.storage import read_json
from pipelines.shards.leakage import LeakageConfig, find_duplicates
from pipelines.shards.leakage_vectors import PageRef

ENCODER = "enc-test"
DIM = 24
PAGES = 4
CONFIG = LeakageConfig(threshold=0.95, seed=3)


class Fixture:
    """Chapters of random unit vectors and random edge hashes written through `EmbeddingStore`; a planted page
    copies another page's vector (plus noise) and, unless `same_art` is False, its hash."""

    def __init__(self, root: Path) -> None:
        self.layout = DataLayout.at(root)
        self.store = EmbeddingStore(self.layout.embeddings(ENCODER))
        self.rng = np.random.default_rng(0)
        self.vectors: dict[str, np.ndarray] = {}
        self.hashes: dict[str, bytes] = {}
        self.splits: dict[str, str] = {}  # chapter -> split
        self.writes: dict[str, int] = {}

    def chapter(self, chapter: str, split: str, copies: dict[int, tuple[str, bool]] | None = None) -> None:
        """(Re)write `chapter`: page index -> (page id it copies, same art) for planted pages."""
        self.splits[chapter] = split
        self.writes[chapter] = self.writes.get(chapter, 0) + 1
        ids = [f"{chapter}-p{i}" for i in range(PAGES)]
        for i, page_id in enumerate(ids):
            source, same_art = (copies or {}).get(i, (None, False))
            vector = self.rng.standard_normal(DIM)
            if source is not None:
                vector = self.vectors[source] + 0.03 * self.rng.standard_normal(DIM)
            self.vectors[page_id] = vector / np.linalg.norm(vector)
            self.hashes[page_id] = self.hashes[source] if same_art else self.rng.bytes(HASH_BYTES)
        ids_table = table_from_rows(
            [{"page_id": p, "role": "ref", "patch": WHOLE_PAGE_PATCH, "row": i} for i, p in enumerate(ids)], EMBEDDINGS
        )
        pages = table_from_rows(
            [
                {"page_id": p, "chapter_id": chapter, "image_sha1": p, "hashes": [self.hashes[p]], "status": "ok"}
                for p in ids
            ],
            EMBEDDED_PAGES,
        )
        vectors = np.stack([self.vectors[p] for p in ids]).astype(np.float16)
        version = f"{chapter}-v{self.writes[chapter]}"
        self.store.write(chapter, vectors, ids_table, pages, {"version": version, "rows": len(ids)})

    def refs(self) -> tuple[list[PageRef], list[PageRef]]:
        held, train = [], []
        for chapter, split in sorted(self.splits.items()):
            refs = [PageRef(f"{chapter}-p{i}", f"series-{chapter}", chapter, split) for i in range(PAGES)]
            (train if split == "train" else held).extend(refs)
        return held, train

    def versions(self) -> dict[str, str]:
        return {chapter: self.store.state(chapter)["version"] for chapter in self.splits}


def _run(fixture: Fixture, config: LeakageConfig = CONFIG, **kwargs) -> tuple[pa.Table, dict]:
    held, train = fixture.refs()
    return find_duplicates(fixture.layout, ENCODER, held, train, config, **kwargs)


def _pairs(table: pa.Table) -> set[tuple[str, str, bool]]:
    return {(r["page_id"], r["train_page_id"], r["duplicate"]) for r in table.to_pylist()}


def test_a_rerun_reads_only_what_changed_and_equals_a_full_check(tmp_path: Path) -> None:
    fixture = Fixture(tmp_path / "out")
    for chapter in ("t0", "t1", "t2"):
        fixture.chapter(chapter, "train")
    fixture.chapter("v0", "val", {0: ("t1-p2", True), 1: ("t0-p1", False)})  # a duplicate, a look-alike
    fixture.chapter("b0", "bench")
    steps = [
        ("first run", lambda: None, 5, {("v0-p0", "t1-p2", True), ("v0-p1", "t0-p1", False)}),
        (
            "a train chapter repeats a benchmark page",
            lambda: fixture.chapter("t3", "train", {2: ("b0-p1", True)}),
            1,
            None,
        ),
        ("a val chapter repeats a train page", lambda: fixture.chapter("v1", "val", {3: ("t0-p3", True)}), 1, None),
        ("a chapter re-embedded", lambda: fixture.chapter("t2", "train", {0: ("v1-p0", True)}), 1, None),
        ("a chapter removed", lambda: fixture.splits.pop("t1"), 0, None),
        ("a chapter moved to val", lambda: fixture.splits.update(t3="val"), 0, None),
    ]
    for name, change, chapters_read, pairs in steps:
        change()
        table, summary = _run(fixture, versions=fixture.versions())
        full_table, full_summary = _run(fixture)
        state = summary.pop("state")
        assert full_summary.pop("state")["kept"] is False
        assert table.equals(full_table), name
        assert summary == full_summary, name
        assert state["chapters_read"] == chapters_read and state["started_over"] == (name == "first run"), name
        assert state["new_held_out_streamed"] == (
            name in ("a val chapter repeats a train page", "a chapter moved to val")
        )
        if pairs is not None:
            assert _pairs(table) == pairs
    # what the sequence planted, seen through the final splits: t1 is gone, t3 is held out now
    assert _pairs(table) == {("v0-p1", "t0-p1", False), ("v1-p3", "t0-p3", True), ("v1-p0", "t2-p0", True)}
    assert summary["unchecked"] == 0 and summary["duplicates"] == 2 and summary["rejected_by_hash"] == 1

    # nothing changed: nothing read, nothing written
    state_file = fixture.layout.leakage_state / "state.json"
    before = {p.name: p.stat().st_mtime_ns for p in fixture.layout.leakage_state.iterdir()}
    table_again, summary_again = _run(fixture, versions=fixture.versions())
    assert table_again.equals(table) and summary_again["state"]["pages_read"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in fixture.layout.leakage_state.iterdir()} == before
    named = read_json(state_file)
    assert set(before) == {"state.json", named["pages"], named["candidates"], *named["segments"].values()}

    # a run killed while writing its state left files the state does not name: the old state is used, they go
    strays = [fixture.layout.leakage_state / "pages-999999.parquet", fixture.layout.leakage_state / ".state.json.tmp"]
    for stray in strays:
        stray.write_bytes(b"half written")
    fixture.chapter("t9", "train", {0: ("b0-p2", True)})
    table, summary = _run(fixture, versions=fixture.versions())
    assert summary["state"]["chapters_read"] == 1 and not summary["state"]["started_over"]
    assert table.equals(_run(fixture)[0]) and ("b0-p2", "t9-p0", True) in _pairs(table)
    assert not any(stray.exists() for stray in strays)

    # another threshold, or rebuild: the state starts over (and stays equal to a full check)
    looser = LeakageConfig(threshold=0.9, seed=3)
    table_looser, summary_looser = _run(fixture, looser, versions=fixture.versions())
    assert summary_looser["state"]["started_over"] and table_looser.equals(_run(fixture, looser)[0])
    rebuilt = _run(fixture, versions=fixture.versions(), rebuild=True)[1]["state"]
    assert rebuilt["started_over"] and rebuilt["pages_read"] == len(fixture.splits) * PAGES


def test_without_versions_no_state_is_read_or_written(tmp_path: Path) -> None:
    fixture = Fixture(tmp_path / "out")
    fixture.chapter("t0", "train")
    fixture.chapter("v0", "val", {0: ("t0-p0", True)})
    table, summary = _run(fixture)
    assert _pairs(table) == {("v0-p0", "t0-p0", True)} and summary["state"]["kept"] is False
    assert not fixture.layout.leakage_state.exists()


def test_skipped_chapters_are_not_kept_and_are_read_again(tmp_path: Path) -> None:
    fixture = Fixture(tmp_path / "out")
    fixture.chapter("t0", "train")
    fixture.chapter("v0", "val", {0: ("t0-p0", True)})
    fixture.store.marker("v0").unlink()  # a retrieval run killed while rewriting it
    versions = {"t0": fixture.store.state("t0")["version"], "v0": "v0-v1"}  # the ledger still holds it
    table, summary = _run(fixture, versions=versions)
    assert table.num_rows == 0 and summary["unchecked"] == PAGES and summary["chapters_skipped"] == 1
    fixture.chapter("v0", "val", {0: ("t0-p0", True)})  # the retrieval job finishes it
    table, summary = _run(fixture, versions=fixture.versions())
    assert _pairs(table) == {("v0-p0", "t0-p0", True)} and summary["unchecked"] == 0
    assert summary["state"]["chapters_read"] == 1  # only the skipped chapter


def test_many_runs_merge_the_vectors_files(tmp_path: Path) -> None:
    fixture = Fixture(tmp_path / "out")
    fixture.chapter("v0", "val")
    for i in range(20):
        fixture.chapter(f"t{i:02d}", "train", {0: ("v0-p0", True)} if i == 17 else None)
        table, summary = _run(fixture, versions=fixture.versions())
        assert len(list(fixture.layout.leakage_state.glob("vectors-*.npy"))) <= 16
    assert table.equals(_run(fixture)[0]) and _pairs(table) == {("v0-p0", "t17-p0", True)}


@pytest.mark.parametrize(
    ("added", "nlist"),
    [("train", 2), ("val", 2), ("val", 4)],
    ids=["train", "val-through-ivf", "val-streamed-exactly"],  # 4 new held-out pages: more than 2 lists, not 4
)
def test_ivf_state_keeps_its_quantiser_and_finds_new_pairs(tmp_path: Path, added: str, nlist: int) -> None:
    fixture = Fixture(tmp_path / "out")
    for chapter in ("t0", "t1", "t2", "t3"):
        fixture.chapter(chapter, "train")
    fixture.chapter("v0", "val", {0: ("t1-p2", True)})
    ivf = LeakageConfig(threshold=0.95, ivf_min_train=1, nlist=nlist, nprobe=2, seed=3)
    table, summary = _run(fixture, ivf, versions=fixture.versions())
    assert summary["index"] == "ivf" and _pairs(table) == {("v0-p0", "t1-p2", True)}
    quantiser = sorted(fixture.layout.leakage_state.glob("ivf-*.faiss"))
    assert len(quantiser) == 1
    if added == "train":
        fixture.chapter("t4", "train", {1: ("v0-p3", True)})
    else:
        fixture.chapter("v1", "val", {1: ("t3-p3", True)})
    table, summary = _run(fixture, ivf, versions=fixture.versions())
    new_pair = ("v0-p3", "t4-p1", True) if added == "train" else ("v1-p1", "t3-p3", True)
    assert _pairs(table) == {("v0-p0", "t1-p2", True), new_pair} and summary["state"]["chapters_read"] == 1
    assert summary["state"]["new_held_out_streamed"] == (nlist == 4)
    assert sorted(fixture.layout.leakage_state.glob("ivf-*.faiss")) == quantiser  # trained once, kept
