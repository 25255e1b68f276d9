"""Leakage check: held-out pages (benchmark and validation) that also exist in training are found and removed.

Manga dumps repeat art: the same page re-saved in another release, a colour edition of a scan, a chapter
uploaded twice under two series names. A held-out page whose twin is a training frame makes benchmark and
validation scores lie. The check runs on the embeddings the retrieval job already stored (whole-page reference
patch, role "ref", patch 4; L2-normalised fp16), so no page is decoded or encoded again for the search:

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

Vectors are read only through `pipelines.retrieval.stage.EmbeddingStore`, only for the chapters of the pages asked
for, by a pool of threads (`READ_THREADS` chapters at once, in a bounded window). Memory bound: the index holds
every training frame's whole-page vector, train frames x dim x 4 bytes with the exact index (below
`ivf_min_train`) or x 2 bytes with the IVF fp16 index, e.g. 1.2M frames x 1024 (ViT-H-14) x 2 = 2.5 GB; the
reading holds at most `READ_THREADS` x `WINDOW_PER_THREAD` chapters' vectors besides, and the held-out vectors
are searched chapter by chapter. A chapter without a completion marker (a retrieval run was killed while rewriting it)
or with inconsistent files is skipped and listed in the summary, never read: its held-out pages count as
``unchecked``, its training pages are not indexed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core import pools
from pipelines.core.embeddings import REF_ROLE, EmbeddingStore
from pipelines.core.geometry import WHOLE_PAGE_PATCH
from pipelines.core.layout import DataLayout
from pipelines.core.pagestore import decode_page, read_chapter_pages
from pipelines.core.schemas import DUPLICATES, EMBEDDED_PAGES, table_from_rows
from pipelines.core.seeding import unit_hash
from pipelines.core.storage import read_parquet


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


@dataclass(frozen=True)
class PageRef:
    page_id: str
    series: str
    chapter_id: str
    split: str


# ---- stored embeddings ---------------------------------------------------------------------------------------


def embedding_store(layout: DataLayout, encoder_id: str) -> EmbeddingStore:
    """The encoder's embeddings as the retrieval job stored them; a clear error if it never ran."""
    store = EmbeddingStore(layout.embeddings(encoder_id))
    if not store.folder.exists():
        raise FileNotFoundError(
            f"no embeddings for encoder {encoder_id!r} at {store.folder}: run the retrieval job first"
        )
    return store


def by_chapter(pages: Iterable[PageRef]) -> dict[str, set[str]]:
    """chapter_id -> the page ids of `pages` in it: each chapter's embeddings are read once, and only these."""
    out: dict[str, set[str]] = {}
    for page in pages:
        out.setdefault(page.chapter_id, set()).add(page.page_id)
    return out


# chapters whose vectors are read at once: threads overlap the waits on storage; on local disk the per-chapter
# work holds the GIL, so more threads than cores only cost (measured on 2 cores: 8 threads 1.85 ms per chapter,
# 2 threads 1.22)
READ_THREADS = min(8, os.cpu_count() or 1)
WINDOW_PER_THREAD = 4  # chapters read ahead per thread: bounds what the reading holds besides the index


def _chapter_vectors(
    store: EmbeddingStore, chapter_id: str, page_ids: set[str]
) -> tuple[list[str], np.ndarray] | str | None:
    """(page ids, whole-page vectors float32 re-normalised) of one chapter's wanted pages; a reason (str) when the
    chapter is skipped; None when none of the pages has a vector."""
    try:
        stored = store.read_vectors(chapter_id)
        if stored is None:
            return "no completed embeddings (retrieval not run on it, or killed while writing it)"
        _, ids, matrix = stored
        mask = pc.and_(
            pc.and_(pc.equal(ids["role"], REF_ROLE), pc.equal(ids["patch"], WHOLE_PAGE_PATCH)),
            pc.is_in(ids["page_id"], value_set=pa.array(sorted(page_ids), pa.string())),
        )
        ids = ids.filter(mask)
        if ids.num_rows == 0:
            return None
        found, rows = ids.column("page_id").to_pylist(), ids.column("row").to_numpy()
        vectors = np.asarray(matrix[rows], dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - one unreadable chapter is reported, it never ends the check
        return f"unreadable embeddings: {type(exc).__name__}: {exc}"
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return found, vectors


def iter_page_vectors(
    store: EmbeddingStore, wanted: dict[str, set[str]], skipped: dict[str, str], threads: int = READ_THREADS
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Per chapter of `wanted` (chapter_id -> page ids), in chapter id order: those pages' whole-page vectors
    (float32, re-normalised), read by `threads` threads at once.

    Memory: besides what the caller keeps, at most `threads` x WINDOW_PER_THREAD chapters' vectors are held
    (pages x dim x 4 bytes each). A chapter that is not completely embedded, or whose files cannot be read,
    yields nothing and is recorded in `skipped` (chapter_id -> reason).
    """
    items = sorted(wanted.items())
    window = max(1, threads) * WINDOW_PER_THREAD
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="leakage-read") as pool:
        for start in range(0, len(items), window):
            chunk = items[start : start + window]
            for (chapter_id, _), result in zip(
                chunk, pool.map(lambda item: _chapter_vectors(store, *item), chunk), strict=True
            ):
                if isinstance(result, str):
                    skipped[chapter_id] = result
                elif result is not None:
                    yield result


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


def _build_index(store: EmbeddingStore, train: dict[str, PageRef], config: LeakageConfig, skipped: dict[str, str]):
    """A FAISS index of the training pages' vectors, and the page id of each index row."""
    import faiss

    if config.threads:
        faiss.omp_set_num_threads(config.threads)
    train_ids = set(train)
    use_ivf = len(train_ids) >= config.ivf_min_train
    index = None
    if use_ivf:
        nlist = config.nlist or max(1, min(int(4 * np.sqrt(len(train_ids))), len(train_ids) // 39))
        fraction = min(1.0, 256 * nlist / len(train_ids))
        sample = [train[p] for p in sorted(train_ids) if unit_hash(config.seed, "ivf-train", p) < fraction]
        chunks = [v for _, v in iter_page_vectors(store, by_chapter(sample), skipped)]
        if not chunks:
            return None, [], "none"
        sample_vectors = np.concatenate(chunks)
        quantizer = faiss.IndexFlatIP(sample_vectors.shape[1])
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, sample_vectors.shape[1], nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
        index.cp.seed = config.seed
        index.train(sample_vectors)
        index.nprobe = min(config.nprobe, nlist)
    row_ids: list[str] = []
    for page_ids, vectors in iter_page_vectors(store, by_chapter(train.values()), skipped):
        if index is None:
            index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        row_ids += page_ids
    return index, row_ids, ("ivf" if use_ivf else "flat")


def find_duplicates(
    layout: DataLayout,
    encoder_id: str,
    held_out: Iterable[PageRef],
    train: Iterable[PageRef],
    config: LeakageConfig,
) -> tuple[pa.Table, dict[str, Any]]:
    """Candidate and confirmed duplicates of held-out pages among training pages (DUPLICATES) and a summary."""
    held = {p.page_id: p for p in held_out}
    trained = {p.page_id: p for p in train}
    overlap = sorted(set(held) & set(trained))
    if overlap:
        raise ValueError(f"pages {overlap[:5]} are both held out and in training: the split is broken")
    store = embedding_store(layout, encoder_id)
    skipped: dict[str, str] = {}
    index, row_ids, kind = _build_index(store, trained, config, skipped)
    candidates: list[dict[str, Any]] = []
    checked: set[str] = set()
    if index is not None and index.ntotal > 0:
        for page_ids, vectors in iter_page_vectors(store, by_chapter(held.values()), skipped):
            checked.update(page_ids)
            lims, scores, rows = index.range_search(vectors, float(config.threshold) - 1e-6)
            for i, page_id in enumerate(page_ids):
                for score, row in zip(scores[lims[i] : lims[i + 1]], rows[lims[i] : lims[i + 1]], strict=True):
                    other = trained[row_ids[int(row)]]
                    candidates.append(
                        {
                            "page_id": page_id,
                            "split": held[page_id].split,
                            "series": held[page_id].series,
                            "train_page_id": other.page_id,
                            "train_series": other.series,
                            "train_chapter_id": other.chapter_id,
                            "score": min(1.0, float(score)),
                            "hash_distance": None,
                            "duplicate": True,
                        }
                    )
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
    candidates.sort(key=lambda c: (c["split"], c["page_id"], -c["score"], c["train_page_id"]))
    table = table_from_rows(candidates, DUPLICATES)
    confirmed = [c for c in candidates if c["duplicate"]]
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
        "train_pages_indexed": len(row_ids),
        "held_out_pages": len(held),
        "candidates": len(candidates),
        "duplicates": len(confirmed),
        "rejected_by_hash": len(candidates) - len(confirmed),
        "train_pages_removed": len({c["train_page_id"] for c in confirmed}),
        "unchecked": len(unchecked),
        "unchecked_examples": unchecked[:10],
        "chapters_skipped": len(skipped),
        "chapters_skipped_examples": [{"chapter_id": c, "reason": skipped[c]} for c in sorted(skipped)[:10]],
        "by_split": by_split,
        "config": {"threshold": config.threshold, "confirm": config.confirm, "rule": config.rule.as_dict()}
        | {k: v for k, v in asdict(config).items() if k not in ("threshold", "confirm", "rule")},
    }
    return table, summary


def duplicate_train_pages(duplicates: pa.Table) -> set[str]:
    """Training pages of confirmed duplicates: the ones to remove from training."""
    confirmed = duplicates.filter(pc.equal(duplicates["duplicate"], True))
    return set(confirmed.column("train_page_id").to_pylist())
