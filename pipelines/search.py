"""Top-k reference patches per query patch, restricted to a frame's pool: FAISS and a numpy reference.

Vectors are L2-normalised, so inner product is cosine similarity. `PoolSearcher` keeps one FAISS
`IndexFlatIP` over a chapter's reference vectors (a pool is always inside one chapter) and restricts each
frame's search to its pool's rows with an ID selector. The result is exact and deterministic: FAISS selects
candidates (every row within `SCORE_MARGIN` of the k-th score, so near-ties are never cut), then the
candidates are rescored in float64 from the stored vectors and ordered by (score desc, ref page id, patch
index). `brute_force_topk` does the same ranking over all allowed rows in numpy; tests and the benchmark
compare the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCORE_MARGIN = 1e-3  # float32 inner products of unit vectors err by ~1e-6; candidates within this are rescored


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


def exact_scores(queries: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Scores (q, n) in float64 from the stored vectors: the one scoring both search paths rank by.

    Each score is a float64 sum of exact fp16 products over one row, so it depends only on the two vectors,
    never on which other rows are scored with it (unlike a BLAS matmul): equal vectors tie exactly everywhere.
    """
    refs64 = np.asarray(refs, dtype=np.float64)
    return np.stack([(refs64 * query).sum(axis=1) for query in np.asarray(queries, dtype=np.float64)])


def _rank(scores: np.ndarray, rows: np.ndarray, tie_rank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each query among `rows` by (score desc, tie rank asc): (rows (q, k), scores (q, k))."""
    out_rows = np.empty((scores.shape[0], k), dtype=np.int64)
    out_scores = np.empty((scores.shape[0], k), dtype=np.float64)
    for q in range(scores.shape[0]):
        order = np.lexsort((tie_rank[rows], -scores[q]))[:k]
        out_rows[q], out_scores[q] = rows[order], scores[q, order]
    return out_rows, out_scores


def brute_force_topk(
    queries: np.ndarray, refs: np.ndarray, allowed_rows: np.ndarray, tie_rank: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reference implementation: score every allowed row exactly, sort fully."""
    allowed_rows = np.asarray(allowed_rows, dtype=np.int64)
    if k > len(allowed_rows):
        raise ValueError(f"k={k} exceeds the {len(allowed_rows)} allowed reference rows")
    return _rank(exact_scores(queries, refs[allowed_rows]), allowed_rows, tie_rank, k)


class PoolSearcher:
    """FAISS inner-product search over one chapter's reference vectors, restricted per call to a pool's rows."""

    def __init__(self, refs: np.ndarray, tie_rank: np.ndarray, threads: int = 1) -> None:
        import faiss

        faiss.omp_set_num_threads(max(1, int(threads)))  # one worker per core: no OpenMP oversubscription
        self._faiss = faiss
        self.refs = refs
        self.tie_rank = tie_rank
        self.index = faiss.IndexFlatIP(refs.shape[1])
        self.index.add(np.ascontiguousarray(refs, dtype=np.float32))

    def search(self, queries: np.ndarray, allowed_rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows and exact scores per query among `allowed_rows`, ordered (score desc, page id, patch)."""
        allowed_rows = np.asarray(allowed_rows, dtype=np.int64)
        n_allowed = len(allowed_rows)
        if k > n_allowed:
            raise ValueError(f"k={k} exceeds the {n_allowed} allowed reference rows")
        params = self._faiss.SearchParameters(sel=self._faiss.IDSelectorBatch(allowed_rows))
        x = np.ascontiguousarray(queries, dtype=np.float32)
        k_req = min(n_allowed, 2 * k)
        while True:
            scores, rows = self.index.search(x, k_req, params=params)
            if k_req == n_allowed or np.all(scores[:, -1] < scores[:, k - 1] - SCORE_MARGIN):
                break
            k_req = min(n_allowed, 2 * k_req)
        candidates = np.unique(rows[rows >= 0])
        return _rank(exact_scores(queries, self.refs[candidates]), candidates, self.tie_rank, k)
