"""Top-k reference patches per query patch, restricted to a frame's pool: FAISS and a numpy reference.

Vectors are L2-normalised, so inner product is cosine similarity. `PoolSearcher` holds one chapter's reference
vectors (a pool is always inside one chapter) and searches every query of the chapter in one FAISS call
(`knn_inner_products_by_idx`), each query among its own pool's rows only: no per-frame call, and no scan of rows
outside the pool. The result is exact and deterministic: FAISS selects candidates (every row within
`SCORE_MARGIN` of the k-th score, so near-ties are never cut; queries whose candidate list is too short for that
are searched again with a longer one), then the candidates are rescored in float64 from the stored vectors and
ordered by (score desc, ref page id, patch index). `brute_force_topk` does the same ranking over all allowed rows
in numpy; tests and the benchmark compare the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCORE_MARGIN = 1e-3  # float32 inner products of unit vectors err by ~1e-6; candidates within this are rescored
RESCORE_BLOCK = 1 << 22  # float64 products held at once while rescoring (32 MB)


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

    Each score is a float64 sum of exact fp16 products over one row, so it depends only on the two vectors,
    never on which other rows are scored with it (unlike a BLAS matmul): equal vectors tie exactly everywhere.
    """
    return (np.asarray(queries, dtype=np.float64) * np.asarray(refs, dtype=np.float64)).sum(axis=-1)


def exact_scores(queries: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Scores (q, n) of every query with every ref, by `paired_exact_scores`."""
    return paired_exact_scores(np.asarray(queries)[:, None, :], np.asarray(refs)[None, :, :])


def _top_k(scores: np.ndarray, rows: np.ndarray, tie_rank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each query's rows by (score desc, tie rank asc): (rows (q, k), scores (q, k)). Rows < 0 are unused."""
    valid = rows >= 0
    ranks = np.where(valid, tie_rank[np.where(valid, rows, 0)], len(tie_rank))
    order = np.lexsort((ranks, -np.where(valid, scores, -np.inf)), axis=1)[:, :k]
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)


def brute_force_topk(
    queries: np.ndarray, refs: np.ndarray, allowed_rows: np.ndarray, tie_rank: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reference implementation: score every allowed row exactly, sort fully."""
    allowed_rows = np.asarray(allowed_rows, dtype=np.int64)
    if k > len(allowed_rows):
        raise ValueError(f"k={k} exceeds the {len(allowed_rows)} allowed reference rows")
    scores = exact_scores(queries, refs[allowed_rows])
    return _top_k(scores, np.broadcast_to(allowed_rows, scores.shape), tie_rank, k)


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


class PoolSearcher:
    """FAISS inner-product search over one chapter's reference vectors, each query restricted to its pool's rows."""

    def __init__(self, refs: np.ndarray, tie_rank: np.ndarray, threads: int = 1) -> None:
        import faiss

        faiss.omp_set_num_threads(max(1, int(threads)))  # one worker per core: no OpenMP oversubscription
        self._faiss = faiss
        self.refs = refs
        self.refs32 = np.ascontiguousarray(refs, dtype=np.float32)
        if not np.isfinite(self.refs32).all():
            raise ValueError("reference vectors contain NaN or infinite values")
        self.tie_rank = tie_rank

    def search(self, queries: np.ndarray, allowed_rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows and exact scores per query among its allowed rows, ordered (score desc, page id, patch).

        `allowed_rows` is one row set for every query (m,), or one per query (q, m), distinct rows first and -1
        padding after (see `padded_rows`). Returns (rows (q, k), scores (q, k) float64).
        """
        queries = np.asarray(queries)
        queries32 = np.ascontiguousarray(queries, dtype=np.float32)
        allowed = self._checked_rows(allowed_rows, len(queries32))
        n_allowed = (allowed >= 0).sum(axis=1)
        if len(queries32) and k > n_allowed.min():
            query = int(np.argmin(n_allowed))
            raise ValueError(f"k={k} exceeds the {n_allowed[query]} allowed reference rows of query {query}")
        if not np.isfinite(queries32).all():
            raise ValueError("query vectors contain NaN or infinite values")
        out_rows = np.empty((len(queries32), k), dtype=np.int64)
        out_scores = np.empty((len(queries32), k), dtype=np.float64)
        pending = np.arange(len(queries32))
        k_req = min(allowed.shape[1], 2 * k)
        while len(pending):
            scores32, rows = self._faiss_topk(queries32[pending], allowed[pending], k_req)
            done = (n_allowed[pending] <= k_req) | (scores32[:, -1] < scores32[:, k - 1] - SCORE_MARGIN)
            final = pending[done]
            out_rows[final], out_scores[final] = self._rescore(queries[final], scores32[done], rows[done], k)
            pending = pending[~done]
            k_req = min(allowed.shape[1], 2 * k_req)
        return out_rows, out_scores

    def _checked_rows(self, allowed_rows: np.ndarray, n_queries: int) -> np.ndarray:
        """(q, m) int64 rows: FAISS stops at a query's first -1 and silently at an out-of-range row, so refuse both."""
        allowed = np.asarray(allowed_rows, dtype=np.int64)
        if allowed.ndim == 1:
            allowed = np.broadcast_to(allowed, (n_queries, len(allowed)))
        if allowed.ndim != 2 or len(allowed) != n_queries:
            raise ValueError(f"allowed rows of shape {allowed.shape} do not match {n_queries} queries")
        if (allowed >= len(self.refs32)).any() or (allowed < -1).any():
            raise ValueError(f"allowed rows must be in 0..{len(self.refs32) - 1} (or -1 padding)")
        if ((allowed[:, 1:] >= 0) & (allowed[:, :-1] < 0)).any():
            raise ValueError("allowed rows must put their -1 padding after the rows")
        ordered = np.sort(allowed, axis=1)
        if ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any():
            raise ValueError("allowed rows of a query must be distinct")
        return allowed

    def _faiss_topk(self, queries32: np.ndarray, allowed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS float32 top-k of each query among its allowed rows: (scores (q, k), rows (q, k), -1 past the pool)."""
        faiss, ptr = self._faiss, self._faiss.swig_ptr
        queries32, allowed = np.ascontiguousarray(queries32), np.ascontiguousarray(allowed)
        scores = np.empty((len(queries32), k), dtype=np.float32)
        rows = np.empty((len(queries32), k), dtype=np.int64)
        n_refs, dim = self.refs32.shape
        faiss.knn_inner_products_by_idx(
            ptr(queries32), ptr(self.refs32), ptr(allowed), dim, len(queries32), n_refs, allowed.shape[1], k,
            ptr(scores), ptr(rows), allowed.shape[1],
        )  # fmt: skip
        return scores, rows

    def _rescore(
        self, queries: np.ndarray, scores32: np.ndarray, rows: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of each query among its FAISS candidates (rows (q, c), -1 = none).

        Only candidates within `SCORE_MARGIN` of the query's k-th float32 score can be in its exact top k (k rows
        score more than any other one, exactly), so only those (query, row) pairs are rescored: about k per query.
        """
        keep = (rows >= 0) & (scores32 >= scores32[:, k - 1 : k] - SCORE_MARGIN)
        query_of, slot_of = np.nonzero(keep)
        row_of = rows[query_of, slot_of]
        exact = np.full(rows.shape, -np.inf)
        block = max(1, RESCORE_BLOCK // self.refs.shape[1])
        for start in range(0, len(row_of), block):
            pairs = slice(start, start + block)
            exact[query_of[pairs], slot_of[pairs]] = paired_exact_scores(
                queries[query_of[pairs]], self.refs[row_of[pairs]]
            )
        return _top_k(exact, np.where(keep, rows, -1), self.tie_rank, k)
