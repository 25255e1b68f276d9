"""Leakage check: held-out pages (benchmark and validation) that also exist in training are found and removed.

Manga dumps repeat art: the same page re-saved in another release, a colour edition of a scan, a chapter
uploaded twice under two series names. A held-out page whose twin is a training frame makes benchmark and
validation scores lie. The check runs on the embeddings the retrieval job already stored (whole-page reference
patch, read by `pipelines.shards.leakage_vectors`), so no page is decoded or encoded again for the search:

- every training page's vector goes into a FAISS inner-product index: exact (`IndexFlatIP`) below
  `ivf_min_train` pages, else an IVF index with fp16 scalar-quantised vectors (`nprobe` lists searched, the
  coarse quantiser trained on a seeded sample; approximate: a pair it misses is reported by neither);
- a range search returns every training page with cosine similarity >= `threshold` to a held-out page;
- optionally each candidate is confirmed by the project's near-duplicate rule (`pipelines.core.pools`: edge-hash
  distance of the content boxes, spread halves included, combined with the cosine), the same rule that keeps
  a frame's twins out of its reference pool; the hashes are those the retrieval job stored, else computed from
  the page store. It rejects pages the encoder merely finds alike (same characters, same palette) and keeps
  re-encoded, re-levelled or re-trimmed copies.

Every candidate is a DUPLICATES row (``duplicate`` False when the hash rejected it, so thresholds can be
re-cut); the training pages of confirmed rows are removed from the training shards.

A FAISS score only proposes a pair (within `SEARCH_MARGIN` of the threshold); every proposed pair is rescored
exactly (`exact_cosine`), so a pair's score does not depend on the batch or index that found it. A chapter whose
embeddings cannot be read completely is skipped and listed in the summary: its held-out pages count as
``unchecked``, its training pages are not indexed.

Given each chapter's embeddings version, the check keeps a state between runs and searches only pairs with a new
side; that state and the check's memory bound are described in `pipelines.shards.leakage_state`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core import pools
from pipelines.core.embeddings import EmbeddingStore
from pipelines.core.layout import DataLayout
from pipelines.core.pagestore import decode_page, read_chapter_pages
from pipelines.core.schemas import DUPLICATES, EMBEDDED_PAGES, LEAKAGE_STATE_PAGES, table_from_rows
from pipelines.core.seeding import unit_hash
from pipelines.core.storage import read_parquet
from pipelines.shards.leakage_state import LeakageState, save_state, state_settings
from pipelines.shards.leakage_vectors import (
    ChapterVectors,
    PageRef,
    by_chapter,
    embedding_store,
    iter_chapter_vectors,
    iter_page_vectors,
    normalised,
)


@dataclass(frozen=True)
class LeakageConfig:
    threshold: float = 0.95  # cosine similarity of whole-page embeddings above which a pair is a candidate
    confirm: bool = True  # confirm candidates with the edge-hash near-duplicate rule on the stored pages
    rule: pools.NearDuplicateRule = field(default_factory=pools.NearDuplicateRule)
    ivf_min_train: int = 100_000  # exact search below this many training pages, IVF above
    nprobe: int = 32
    nlist: int | None = None  # IVF lists (default: about 4 sqrt(n), at least 39 training pages per list)
    seed: int = 0
    threads: int = 0  # FAISS OpenMP threads (0: FAISS's default)

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"leakage threshold is a cosine similarity in [-1, 1], got {self.threshold}")

    def result_settings(self, ivf: bool) -> dict[str, Any]:
        """The settings the check's result depends on (the index kind `ivf` included): the state kept between
        runs is valid only under them."""
        settings = {
            "threshold": self.threshold,
            "confirm": self.confirm,
            "rule": self.rule.as_dict(),
            "index": "ivf" if ivf else "flat",
        }
        if ivf:
            settings |= {"nlist": self.nlist, "nprobe": self.nprobe, "seed": self.seed}
        return settings


# ---- confirmation by edge hash ------------------------------------------------------------------------------


def page_hashes(layout: DataLayout, store: EmbeddingStore, pages: Iterable[tuple[str, str]]) -> dict[str, list[bytes]]:
    """page_id -> its edge hashes (`pipelines.core.pools.page_hashes`) for (page_id, chapter_id) pairs.

    The retrieval job stores them beside the embeddings (used only for completely embedded chapters); a page
    without stored hashes is decoded from the page store (each chapter read once).
    """
    wanted_by_chapter: dict[str, set[str]] = {}
    for page_id, chapter_id in pages:
        wanted_by_chapter.setdefault(chapter_id, set()).add(page_id)
    hashes: dict[str, list[bytes]] = {}
    for chapter_id, wanted in sorted(wanted_by_chapter.items()):
        stored_hashes = store.pages_path(chapter_id)
        if store.state(chapter_id) is not None and stored_hashes.exists():
            table = read_parquet(stored_hashes, EMBEDDED_PAGES).to_pylist()
            hashes.update({r["page_id"]: list(r["hashes"]) for r in table if r["page_id"] in wanted and r["hashes"]})
        missing = wanted - set(hashes)
        if not missing:
            continue
        try:
            stored = read_chapter_pages(layout, chapter_id)
        except FileNotFoundError:
            continue
        for page_id in sorted(missing & set(stored)):
            hashes[page_id] = pools.page_hashes(decode_page(stored[page_id]))
    return hashes


def hash_distance(a: list[bytes], b: list[bytes]) -> float:
    """Smallest edge-hash distance between any hash of one page and any of the other (spread halves count)."""
    return float(pools.hash_distance_matrix(a, b).min())


def is_same_art(distance: float, score: float, rule: pools.NearDuplicateRule) -> bool:
    """The project's near-duplicate rule (the one that keeps twins out of reference pools)."""
    return distance <= rule.max_hash_distance or (distance <= rule.loose_hash_distance and score >= rule.min_cosine)


# ---- the search ------------------------------------------------------------------------------------------------

SEARCH_MARGIN = 1e-3  # FAISS's float32 scores only propose pairs: all within this of the threshold are rescored
SCORE_TOLERANCE = 1e-6  # a pair whose exact cosine is this close below the threshold still counts


def exact_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The cosine of two unit vectors, correctly rounded (float64 products, `math.fsum`): a pure function of
    the pair, so a pair scores the same whichever batch, index or run found it."""
    return math.fsum((np.asarray(a, np.float64) * np.asarray(b, np.float64)).tolist())


class _Index:
    """A FAISS inner-product index filled chunk by chunk, with the page id of each row: exact (created flat on
    the first vectors) unless a trained IVF index is given."""

    def __init__(self, index: Any = None) -> None:
        self.index = index
        self.page_ids: list[str] = []

    def add(self, page_ids: list[str], vectors: np.ndarray) -> None:
        if self.index is None:
            import faiss

            self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)
        self.page_ids += page_ids

    def pairs(self, page_ids: list[str], vectors: np.ndarray, threshold: float) -> Iterator[tuple[str, str, float]]:
        """(query page, index page, exact cosine) of every pair at or above `threshold`."""
        if self.index is None or self.index.ntotal == 0:
            return
        lims, _, rows = self.index.range_search(vectors, threshold - SEARCH_MARGIN)
        for i, page_id in enumerate(page_ids):
            for row in rows[lims[i] : lims[i + 1]]:
                score = exact_cosine(vectors[i], self.index.reconstruct(int(row)))
                if score >= threshold - SCORE_TOLERANCE:
                    yield page_id, self.page_ids[int(row)], score


def ivf_lists(train_pages: int, config: LeakageConfig) -> int:
    """IVF lists for `train_pages` training pages: `config.nlist`, else about 4 sqrt(n), at least 39 pages a list."""
    return config.nlist or max(1, min(int(4 * np.sqrt(train_pages)), train_pages // 39))


def _swapped(pairs: Iterable[tuple[str, str, float]]) -> list[tuple[str, str, float]]:
    """(training page, held-out page, score) pairs as (held-out page, training page, score)."""
    return [(held_page, train_page, score) for train_page, held_page, score in pairs]


def _trained_ivf(
    store: EmbeddingStore, train: dict[str, PageRef], config: LeakageConfig, skipped: dict[str, str], kept: bytes | None
) -> tuple[Any, bytes | None]:
    """An empty IVF index trained on a seeded sample of the training pages (or the one the state kept), and its
    bytes to keep; (None, None) when no sampled page has a vector."""
    import faiss

    if kept is not None:
        index = faiss.deserialize_index(np.frombuffer(kept, dtype=np.uint8))
    else:
        nlist = ivf_lists(len(train), config)
        fraction = min(1.0, 256 * nlist / len(train))
        sample = [train[p] for p in sorted(train) if unit_hash(config.seed, "ivf-train", p) < fraction]
        chunks = [v for _, v in iter_page_vectors(store, by_chapter(sample), skipped)]
        if not chunks:
            return None, None
        sample_vectors = np.concatenate(chunks)
        quantizer = faiss.IndexFlatIP(sample_vectors.shape[1])
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, sample_vectors.shape[1], nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
        index.cp.seed = config.seed
        index.train(sample_vectors)
        index.nprobe = min(config.nprobe, nlist)
        kept = faiss.serialize_index(index).tobytes()
    index.set_direct_map_type(faiss.DirectMap.Array)  # pairs are rescored from the index's own vectors
    return index, kept


# ---- the check -------------------------------------------------------------------------------------------------


def _new_rows(
    layout: DataLayout,
    store: EmbeddingStore,
    pairs: list[tuple[str, str, float]],
    held: dict[str, PageRef],
    trained: dict[str, PageRef],
    config: LeakageConfig,
) -> pa.Table:
    """DUPLICATES rows of the (held-out page, training page, score) pairs found, confirmed by edge hash."""
    candidates = [
        {
            "page_id": page_id,
            "split": held[page_id].split,
            "series": held[page_id].series,
            "train_page_id": train_page_id,
            "train_series": trained[train_page_id].series,
            "train_chapter_id": trained[train_page_id].chapter_id,
            "score": min(1.0, score),
            "hash_distance": None,
            "duplicate": True,
        }
        for page_id, train_page_id, score in pairs
    ]
    if config.confirm and candidates:
        pages = {(c["page_id"], held[c["page_id"]].chapter_id) for c in candidates}
        pages |= {(c["train_page_id"], c["train_chapter_id"]) for c in candidates}
        hashes = page_hashes(layout, store, pages)
        for c in candidates:
            a, b = hashes.get(c["page_id"]), hashes.get(c["train_page_id"])
            if a is None or b is None:
                continue  # a page without a stored image stays a duplicate on the embedding alone
            c["hash_distance"] = hash_distance(a, b)
            c["duplicate"] = is_same_art(c["hash_distance"], c["score"], config.rule)
    return table_from_rows(candidates, DUPLICATES)


def _in_row_order(table: pa.Table) -> pa.Table:
    """DUPLICATES rows by split, held-out page, score (highest first), training page: one order however found."""
    keys = pa.table(
        {
            "split": table["split"],
            "page_id": table["page_id"],
            "score": pc.negate(table["score"]),
            "train": table["train_page_id"],
        }
    )
    return table.take(pc.sort_indices(keys, sort_keys=[(name, "ascending") for name in keys.column_names]))


def find_duplicates(
    layout: DataLayout,
    encoder_id: str,
    held_out: Iterable[PageRef],
    train: Iterable[PageRef],
    config: LeakageConfig,
    *,
    versions: dict[str, str] | None = None,
    rebuild: bool = False,
) -> tuple[pa.Table, dict[str, Any]]:
    """Candidate and confirmed duplicates of held-out pages among training pages (DUPLICATES) and a summary.

    `versions` (chapter_id -> embeddings version, from the embeddings ledger) turns on the state kept in
    `layout.leakage_state`: only pages it lacks are read and only pairs with a new side searched. None reads
    every vector and keeps no state; `rebuild` ignores the state and writes a new one.
    """
    held = {p.page_id: p for p in held_out}
    trained = {p.page_id: p for p in train}
    overlap = sorted(set(held) & set(trained))
    if overlap:
        raise ValueError(f"pages {overlap[:5]} are both held out and in training: the split is broken")
    store = embedding_store(layout, encoder_id)
    if config.threads:
        import faiss

        faiss.omp_set_num_threads(config.threads)
    use_ivf = len(trained) >= config.ivf_min_train
    settings = state_settings(encoder_id, config.result_settings(use_ivf))
    keep_state = versions is not None
    state = LeakageState.load(layout.leakage_state, settings) if keep_state and not rebuild else None

    # what the state still holds: pages of the same chapter version; those whose split changed are re-filed (their
    # vector is kept, their pairs are searched again)
    stored: dict[str, tuple[int, int, str, str, str]] = {}  # page_id -> (segment, row, version, chapter, split now)
    kept_train: dict[str, tuple[int, int]] = {}  # page_id -> (segment, row), filed as before
    kept_held: dict[str, tuple[int, int]] = {}
    refiled_train: dict[str, tuple[int, int]] = {}  # page_id -> (segment, row), whose split changed
    refiled_held: dict[str, tuple[int, int]] = {}
    if state is not None:  # one pass over the state's pages: a rerun over 30k pages does nothing else per page
        columns = [state.pages.column(name).to_pylist() for name in LEAKAGE_STATE_PAGES.names]
        for page_id, chapter_id, split, version, segment, row in zip(*columns, strict=True):
            ref, kept, moved = trained.get(page_id), kept_train, refiled_train
            if ref is None:
                ref, kept, moved = held.get(page_id), kept_held, refiled_held
            if ref is None or ref.chapter_id != chapter_id or versions.get(chapter_id) != version:
                continue
            stored[page_id] = (segment, row, version, chapter_id, ref.split)
            if ref.split != split:
                moved[page_id] = (segment, row)
            else:
                kept[page_id] = (segment, row)
    unread_train = [ref for p, ref in trained.items() if p not in stored]
    unread_held = [ref for p, ref in held.items() if p not in stored]

    skipped: dict[str, str] = {}
    added: list[ChapterVectors] = []
    kind = "ivf" if use_ivf else "flat"
    ivf = state.ivf if state is not None else None
    pairs: list[tuple[str, str, float]] = []
    with_vectors = set(kept_held) | set(refiled_held)
    new_held = len(unread_held) + len(refiled_held)
    # Beside a state, the new held-out pages are indexed (exactly) and every training vector streams past them: no
    # index of the training pages is built. With IVF only while that costs fewer multiply-adds than assigning every
    # training vector to one of the IVF lists (new held-out pages <= lists); else every training page is indexed.
    streamed = state is not None and new_held > 0 and (not use_ivf or new_held <= ivf_lists(len(trained), config))
    held_index = _Index() if streamed else None
    every_train = None  # every training page, searched by the new held-out pages when they are not streamed past
    if new_held and not streamed:
        every_train = _Index()
        if use_ivf:
            every_train.index, ivf = _trained_ivf(store, trained, config, skipped, ivf)
            if every_train.index is None:
                kind, every_train, keep_state = "none", None, False
        if every_train is not None and state is not None:
            for page_ids, vectors in state.chunks(kept_train):
                every_train.add(page_ids, vectors)
    if held_index is not None:
        for page_ids, vectors in state.chunks(refiled_held):
            held_index.add(page_ids, vectors)
        for chapter in iter_chapter_vectors(store, by_chapter(unread_held), skipped):
            with_vectors.update(chapter.page_ids)
            held_index.add(chapter.page_ids, normalised(chapter.raw))
            added.append(chapter)
        for page_ids, vectors in state.chunks(kept_train):
            pairs += _swapped(held_index.pairs(page_ids, vectors, config.threshold))
    new_train = _Index()  # the new training pages, searched by the held-out pages of the state
    train_indexed = len(kept_train) + len(refiled_train)

    def add_new_train(page_ids: list[str], vectors: np.ndarray) -> None:
        if every_train is not None:
            every_train.add(page_ids, vectors)
        if held_index is not None:
            pairs.extend(_swapped(held_index.pairs(page_ids, vectors, config.threshold)))
        if kept_held:
            new_train.add(page_ids, vectors)

    if kind == "none":
        train_indexed = 0
    else:
        for page_ids, vectors in state.chunks(refiled_train) if refiled_train else ():
            add_new_train(page_ids, vectors)
        for chapter in iter_chapter_vectors(store, by_chapter(unread_train), skipped):
            add_new_train(chapter.page_ids, normalised(chapter.raw))
            train_indexed += len(chapter.page_ids)
            if keep_state:
                added.append(chapter)
        if every_train is not None:
            for page_ids, vectors in state.chunks(refiled_held) if refiled_held else ():
                pairs += every_train.pairs(page_ids, vectors, config.threshold)
            for chapter in iter_chapter_vectors(store, by_chapter(unread_held), skipped):
                with_vectors.update(chapter.page_ids)
                pairs += every_train.pairs(chapter.page_ids, normalised(chapter.raw), config.threshold)
                if keep_state:
                    added.append(chapter)
        if new_train.page_ids:
            for page_ids, vectors in state.chunks(kept_held):
                pairs += new_train.pairs(page_ids, vectors, config.threshold)

    parts = [_new_rows(layout, store, pairs, held, trained, config)]
    if state is not None:  # the rows of pairs whose pages both stay
        old = state.candidates
        stays = pc.and_(
            pc.is_in(old["page_id"], value_set=pa.array(sorted(kept_held), pa.string())),
            pc.is_in(old["train_page_id"], value_set=pa.array(sorted(kept_train), pa.string())),
        )
        parts.append(old.filter(stays))
    table = _in_row_order(pa.concat_tables(parts))
    refiled = bool(refiled_train or refiled_held)
    changed = state is None or added or refiled or len(stored) != state.pages.num_rows or ivf != state.ivf
    if keep_state and changed:
        save_state(
            layout.leakage_state,
            settings,
            state,
            stored,
            added,
            lambda page_id: held.get(page_id) or trained[page_id],  # held out or training, never both (checked)
            table,
            ivf,
        )

    checked = with_vectors if train_indexed else set()
    rows = table.select(["page_id", "split", "train_page_id", "duplicate"]).to_pylist()
    confirmed = [r for r in rows if r["duplicate"]]
    unchecked = sorted(set(held) - checked)
    by_split = {}
    for split in sorted({p.split for p in held.values()}):
        pages_of_split = [p for p in held.values() if p.split == split]
        by_split[split] = {
            "pages": len(pages_of_split),
            "pages_with_duplicates": len({c["page_id"] for c in confirmed if c["split"] == split}),
            "unchecked": sum(1 for p in pages_of_split if p.page_id not in checked),
        }
    summary = {
        "index": kind,
        "train_pages": len(trained),
        "train_pages_indexed": train_indexed,
        "held_out_pages": len(held),
        "candidates": len(rows),
        "duplicates": len(confirmed),
        "rejected_by_hash": len(rows) - len(confirmed),
        "train_pages_removed": len({c["train_page_id"] for c in confirmed}),
        "unchecked": len(unchecked),
        "unchecked_examples": unchecked[:10],
        "chapters_skipped": len(skipped),
        "chapters_skipped_examples": [{"chapter_id": c, "reason": skipped[c]} for c in sorted(skipped)[:10]],
        "by_split": by_split,
        "config": {"threshold": config.threshold, "confirm": config.confirm, "rule": config.rule.as_dict()}
        | {k: v for k, v in asdict(config).items() if k not in ("threshold", "confirm", "rule")},
        "state": {
            "kept": keep_state,
            "started_over": keep_state and state is None,
            "pages_kept": len(stored),
            "chapters_read": len({c.chapter_id for c in added}) if keep_state else None,
            "pages_read": sum(len(c.page_ids) for c in added) if keep_state else None,
            "new_held_out_streamed": streamed,
        },
    }
    return table, summary


def duplicate_train_pages(duplicates: pa.Table) -> set[str]:
    """Training pages of confirmed duplicates: the ones to remove from training."""
    confirmed = duplicates.filter(pc.equal(duplicates["duplicate"], True))
    return set(confirmed.column("train_page_id").to_pylist())
