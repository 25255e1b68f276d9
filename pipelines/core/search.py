"""Top-k reference patches per query patch, restricted to a frame's pool: FAISS and a numpy reference.

Vectors are L2-normalised, so inner product is cosine similarity. `PoolSearcher` holds one chapter's reference
vectors (a pool is always inside one chapter) and searches all the chapter's queries at once: one FAISS call
(`fvec_inner_products_by_idx`) scores each query against its own pool's rows only, with no per-frame call
and no scan of rows outside the pool. The result is exact and deterministic: from these float32 scores, every
row within `SCORE_MARGIN` of the query's k-th score is a candidate (so near-ties are never cut), the candidates
are rescored in float64 from the stored vectors and ordered by (score desc, ref page id, patch index).
`brute_force_topk` does the same ranking over all allowed rows in numpy; tests and the benchmark compare the two.

Diversity (beyond the paper, off by default): ``max_per_page`` caps how many of a frame's retrieved patches
(all its query patches together) may come from one reference page. The paper takes each query patch's top k
independently, so one strong page can supply most of a frame's patches; with the cap, `cap_per_page` walks the
frame's candidates in global rank order and skips a page once it supplied ``max_per_page`` patches. It is an
option of `PoolSearcher.search`, so the retrieval cache (and so the shards) and inference call the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCORE_MARGIN = 1e-3  # float32 inner products of unit vectors err by ~1e-6; candidates within this are rescored
RESCORE_BLOCK = 1 << 17  # float64 products per rescoring step: 1 MB temporaries stay in cache


@dataclass(frozen=True)
class RefKeys:
    """Identity of each reference row: its page id and patch index, and its rank in the tie-break order."""

    page_ids: np.ndarray  # (n,) str
    patches: np.ndarray  # (n,) int

    @property
    def tie_rank(self) -> np.ndarray:
        """Position of each row in (page id, patch) order: the tie-break after the score."""
        order = np.lexsort((self.patches, self.page_ids))
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        return rank


def paired_exact_scores(queries: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Score of each query with its ref (broadcast over leading axes) in float64: the one scoring both paths rank by.

    Vectors hold fp16 values (as stored), whose products are exact in float32. Each score is the float64 sum of
    those exact products over one row, so it depends only on the two vectors, never on which other rows are
    scored with it (unlike a BLAS matmul): equal vectors tie exactly everywhere.
    """
    products = np.asarray(queries, dtype=np.float32) * np.asarray(refs, dtype=np.float32)
    return products.astype(np.float64).sum(axis=-1)


def exact_scores(queries: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Scores (q, n) of every query with every ref, by `paired_exact_scores`."""
    return paired_exact_scores(np.asarray(queries)[:, None, :], np.asarray(refs)[None, :, :])


def _top_k(
    query_of: np.ndarray, rows: np.ndarray, scores: np.ndarray, tie_rank: np.ndarray, n_queries: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows of each query among its scored (query, row) pairs, by (score desc, tie rank asc).

    Every query needs at least k pairs. Returns (rows (n_queries, k), scores (n_queries, k)).
    """
    order = np.lexsort((tie_rank[rows], -scores, query_of))
    counts = np.bincount(query_of, minlength=n_queries)
    take = order[(np.cumsum(counts) - counts)[:, None] + np.arange(k)]
    return rows[take], scores[take]


def brute_force_topk(
    queries: np.ndarray, refs: np.ndarray, allowed_rows: np.ndarray, tie_rank: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reference implementation: score every allowed row exactly, sort fully."""
    allowed_rows = np.asarray(allowed_rows, dtype=np.int64)
    if k > len(allowed_rows):
        raise ValueError(f"k={k} exceeds the {len(allowed_rows)} allowed reference rows")
    scores = exact_scores(_fp16(queries, "query"), _fp16(refs, "reference")[allowed_rows])
    query_of = np.repeat(np.arange(len(scores)), len(allowed_rows))
    return _top_k(query_of, np.tile(allowed_rows, len(scores)), scores.ravel(), tie_rank, len(scores), k)


def cap_per_page(
    ranked_rows: np.ndarray,
    ranked_scores: np.ndarray,
    ref_pages: np.ndarray,
    k: int,
    max_per_page: int,
    queries_per_frame: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k per query with at most `max_per_page` patches of one reference page per frame.

    `ranked_rows` (q, m) holds each query's candidate rows best first (-1 padding at the end) and
    `ranked_scores` their scores; consecutive blocks of `queries_per_frame` queries are one frame. Per frame,
    candidates are taken in order of (score desc, rank within the query, query index): a candidate is kept while
    its query still needs rows and its page has supplied fewer than `max_per_page` of the frame's patches.
    Returns (rows (q, k), scores (q, k)), each query's rows best first. Raises ValueError when a frame cannot be
    filled (too few pages for the cap).
    """
    ranked_rows = np.asarray(ranked_rows, dtype=np.int64)
    ranked_scores = np.asarray(ranked_scores, dtype=np.float64)
    if max_per_page < 1:
        raise ValueError(f"max_per_page={max_per_page} must be at least 1")
    n_queries, width = ranked_rows.shape
    if queries_per_frame < 1 or n_queries % queries_per_frame:
        raise ValueError(f"{n_queries} queries do not split into frames of {queries_per_frame}")
    _, page_index = np.unique(np.asarray(ref_pages), return_inverse=True)
    rows_out = np.full((n_queries, k), -1, dtype=np.int64)
    scores_out = np.full((n_queries, k), -np.inf)
    for first in range(0, n_queries, queries_per_frame):
        frame_rows = ranked_rows[first : first + queries_per_frame]
        frame_scores = np.where(frame_rows >= 0, ranked_scores[first : first + queries_per_frame], -np.inf)
        query_of, rank_of = np.divmod(np.arange(frame_rows.size), width)
        order = np.lexsort((query_of, rank_of, -frame_scores.ravel()))
        taken = np.zeros(queries_per_frame, dtype=np.int64)
        per_page: dict[int, int] = {}
        for flat in order:
            query, rank = query_of[flat], rank_of[flat]
            row = frame_rows[query, rank]
            if row < 0 or taken[query] >= k:
                continue
            page = int(page_index[row])
            if per_page.get(page, 0) >= max_per_page:
                continue
            per_page[page] = per_page.get(page, 0) + 1
            rows_out[first + query, taken[query]] = row
            scores_out[first + query, taken[query]] = frame_scores[query, rank]
            taken[query] += 1
            if (taken >= k).all():
                break
        if (taken < k).any():
            raise ValueError(
                f"max_per_page={max_per_page}: frame of queries {first}..{first + queries_per_frame - 1} has too few "
                f"reference pages to give each query {k} patches; raise the cap or the pool size"
            )
    return rows_out, scores_out


def padded_rows(row_sets: Sequence[np.ndarray], repeats: int = 1) -> np.ndarray:
    """Row sets of different sizes as one int64 matrix padded with -1, each set on `repeats` consecutive lines.

    This is the per-query `allowed_rows` layout of `PoolSearcher.search`: one pool per frame, repeated for the
    frame's query patches.
    """
    width = max((len(rows) for rows in row_sets), default=0)
    out = np.full((len(row_sets), width), -1, dtype=np.int64)
    for line, rows in zip(out, row_sets, strict=True):
        line[: len(rows)] = rows
    return np.repeat(out, repeats, axis=0)


def _fp16(vectors: np.ndarray, what: str) -> np.ndarray:
    """The vectors as stored: a 2-D float16 array (the exact scoring relies on fp16 values)."""
    vectors = np.asarray(vectors)
    if vectors.dtype != np.float16 or vectors.ndim != 2:
        raise ValueError(f"{what} vectors must be a 2-D float16 array (as stored), got {vectors.dtype} {vectors.shape}")
    return vectors


def _float32(vectors: np.ndarray, what: str) -> np.ndarray:
    """Float32 copy of fp16 vectors, checked finite: FAISS scores it, and the exact rescoring reads it too."""
    out = np.ascontiguousarray(_fp16(vectors, what), dtype=np.float32)
    if not np.isfinite(out).all():
        raise ValueError(f"{what} vectors contain NaN or infinite values")
    return out


class PoolSearcher:
    """FAISS inner-product search over one chapter's reference vectors, each query restricted to its pool's rows."""

    def __init__(self, refs: np.ndarray, tie_rank: np.ndarray, threads: int = 1) -> None:
        import faiss

        faiss.omp_set_num_threads(max(1, int(threads)))  # one worker per core: no OpenMP oversubscription
        self._faiss = faiss
        self.refs32 = _float32(refs, "reference")
        self.tie_rank = tie_rank

    def search(
        self,
        queries: np.ndarray,
        allowed_rows: np.ndarray,
        k: int,
        *,
        max_per_page: int | None = None,
        ref_pages: np.ndarray | None = None,
        queries_per_frame: int = 1,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows and exact scores per query among its allowed rows, ordered (score desc, page id, patch).

        `allowed_rows` is one row set for every query (m,), or one per query (q, m) of distinct rows, padded
        with -1 (see `padded_rows`). Returns (rows (q, k), scores (q, k) float64).

        `max_per_page` (default None: the paper's independent top-k) caps the patches one reference page may
        supply to a frame: consecutive blocks of `queries_per_frame` queries form a frame (the 4 query patches
        of a page), `ref_pages` (n,) names the page of each reference row. See `cap_per_page`.
        """
        if k < 1:
            raise ValueError(f"k={k} must be at least 1")
        if max_per_page is not None:
            return self._search_capped(queries, allowed_rows, k, max_per_page, ref_pages, queries_per_frame)
        queries32 = _float32(queries, "query")
        if queries32.shape[1] != self.refs32.shape[1]:
            raise ValueError(
                f"queries have {queries32.shape[1]} dimensions, the reference vectors {self.refs32.shape[1]}"
            )
        allowed = self._checked_rows(allowed_rows, len(queries32))
        fewest = int((allowed >= 0).sum(axis=1).min(initial=allowed.shape[1]))
        if k > fewest:
            raise ValueError(f"k={k} exceeds the {fewest} allowed reference rows of a query")
        scores32 = self._pool_scores(queries32, allowed)
        kth = -np.partition(-scores32, k - 1, axis=1)[:, k - 1 : k]
        query_of, slot_of = np.nonzero(scores32 >= kth - SCORE_MARGIN)  # padding scores -inf: never a candidate
        rows = allowed[query_of, slot_of]
        return _top_k(query_of, rows, self._exact_scores(queries32, query_of, rows), self.tie_rank, len(allowed), k)

    def _search_capped(
        self,
        queries: np.ndarray,
        allowed_rows: np.ndarray,
        k: int,
        max_per_page: int,
        ref_pages: np.ndarray | None,
        queries_per_frame: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every allowed row of each query scored exactly and ranked, then `cap_per_page` per frame (a pool holds
        tens of pages, so ranking it whole costs little beside the encoder)."""
        if ref_pages is None or len(ref_pages) != len(self.refs32):
            raise ValueError("max_per_page needs ref_pages: the page of each of the searcher's reference rows")
        queries32 = _float32(queries, "query")
        allowed = self._checked_rows(allowed_rows, len(queries32))
        query_of, slot_of = np.nonzero(allowed >= 0)
        rows = allowed[query_of, slot_of]
        exact = self._exact_scores(queries32, query_of, rows)
        order = np.lexsort((self.tie_rank[rows], -exact, query_of))
        counts = np.bincount(query_of, minlength=len(allowed))
        slot = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
        ranked_rows = np.full(allowed.shape, -1, dtype=np.int64)
        ranked_scores = np.full(allowed.shape, -np.inf)
        ranked_rows[query_of[order], slot] = rows[order]
        ranked_scores[query_of[order], slot] = exact[order]
        return cap_per_page(ranked_rows, ranked_scores, np.asarray(ref_pages), k, max_per_page, queries_per_frame)

    def _checked_rows(self, allowed_rows: np.ndarray, n_queries: int) -> np.ndarray:
        """(q, m) contiguous int64 rows, refused if out of range or repeated within a query."""
        allowed = np.asarray(allowed_rows, dtype=np.int64)
        if allowed.ndim == 1:
            allowed = np.broadcast_to(allowed, (n_queries, len(allowed)))
        if allowed.ndim != 2 or len(allowed) != n_queries:
            raise ValueError(f"allowed rows of shape {allowed.shape} do not match {n_queries} queries")
        if (allowed >= len(self.refs32)).any() or (allowed < -1).any():
            raise ValueError(f"allowed rows must be in 0..{len(self.refs32) - 1} (or -1 padding)")
        ordered = np.sort(allowed, axis=1)
        if ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any():
            raise ValueError("allowed rows of a query must be distinct")
        return np.ascontiguousarray(allowed)

    def _pool_scores(self, queries32: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """Float32 scores (q, m) of each query with each of its allowed rows, in one FAISS call; -inf at padding."""
        scores = np.full(allowed.shape, -np.inf, dtype=np.float32)
        ptr = self._faiss.swig_ptr
        self._faiss.fvec_inner_products_by_idx(
            ptr(scores), ptr(queries32), ptr(self.refs32), ptr(allowed), self.refs32.shape[1], *allowed.shape
        )
        return scores

    def _exact_scores(self, queries32: np.ndarray, query_of: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """`paired_exact_scores` of the (query, row) pairs, in cache-sized blocks (the copies hold fp16 exactly)."""
        exact = np.empty(len(rows), dtype=np.float64)
        block = max(1, RESCORE_BLOCK // self.refs32.shape[1])
        for start in range(0, len(rows), block):
            pairs = slice(start, start + block)
            exact[pairs] = paired_exact_scores(queries32[query_of[pairs]], self.refs32[rows[pairs]])
        return exact
