"""FAISS pool search equals the numpy brute force, ties included, in the documented order."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.search import PoolSearcher, RefKeys, brute_force_topk, exact_scores


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)


def _keys(n_pages: int, shuffle_seed: int = 0) -> RefKeys:
    """5 patches per page; page ids deliberately not in row order, so the tie-break has work to do."""
    names = np.array([f"page{i:03d}" for i in range(n_pages)])
    np.random.default_rng(shuffle_seed).shuffle(names)
    return RefKeys(np.repeat(names, 5), np.tile(np.arange(5), n_pages))


def _naive_topk(queries, refs, allowed, keys: RefKeys, k):
    """Plain-Python definition of the order: score desc, then ref page id, then patch index."""
    scores = exact_scores(queries, refs)
    out = []
    for q in range(len(queries)):
        ranked = sorted(allowed, key=lambda r: (-scores[q, r], keys.page_ids[r], keys.patches[r]))[:k]
        out.append(ranked)
    return np.array(out)


def test_faiss_equals_brute_force_with_many_exact_ties() -> None:
    rng = np.random.default_rng(0)
    n_pages, dim = 60, 48
    base = _unit(rng.normal(size=(n_pages * 5, dim)))
    # exact ties: many reference rows are copies of a few vectors, on different pages and patches
    for i in range(0, len(base), 7):
        base[i] = base[3]
    for i in range(1, len(base), 11):
        base[i] = base[5]
    keys = _keys(n_pages)
    searcher = PoolSearcher(base, keys.tie_rank, threads=1)
    for frame in range(40):
        pool_pages = rng.choice(n_pages, size=20, replace=False)
        allowed = np.concatenate([np.arange(5) + 5 * p for p in pool_pages])
        # queries: equal to tied vectors (tie at rank 0), near them, and random
        queries = np.stack(
            [
                base[3],
                base[5],
                _unit(base[3:4] + 0.01 * rng.normal(size=(1, dim)))[0],
                _unit(rng.normal(size=(1, dim)))[0],
            ]
        )
        for k in (1, 3, 7):
            rows, scores = searcher.search(queries, allowed, k)
            ref_rows, ref_scores = brute_force_topk(queries, base, allowed, keys.tie_rank, k)
            np.testing.assert_array_equal(rows, ref_rows, err_msg=f"frame {frame}, k={k}")
            np.testing.assert_array_equal(scores, ref_scores)
            np.testing.assert_array_equal(rows, _naive_topk(queries, base, allowed, keys, k))
            assert set(rows.ravel()) <= set(allowed)
            assert (np.diff(scores, axis=1) <= 0).all()


def test_all_equal_vectors_rank_by_page_id_then_patch() -> None:
    vectors = _unit(np.ones((4 * 5, 8)))
    keys = RefKeys(np.repeat(np.array(["d", "b", "c", "a"]), 5), np.tile(np.arange(5), 4))
    allowed = np.arange(5, 20)  # pages b, c, a
    rows, scores = PoolSearcher(vectors, keys.tie_rank).search(vectors[:1], allowed, 7)
    assert [(keys.page_ids[r], int(keys.patches[r])) for r in rows[0]] == [
        ("a", 0),
        ("a", 1),
        ("a", 2),
        ("a", 3),
        ("a", 4),
        ("b", 0),
        ("b", 1),
    ]
    assert np.allclose(scores, scores[0, 0])


def test_ties_that_float32_search_cannot_see_are_broken_by_page_id() -> None:
    rng = np.random.default_rng(3)
    dim = 1024
    vector = _unit(rng.normal(size=(1, dim)))[0]
    # permutations of one vector against a constant query: equal scores, which float32 sums in different orders
    # get slightly wrong in different ways
    refs = np.stack([rng.permutation(vector) for _ in range(40)])
    query = _unit(np.ones((1, dim)))
    keys = _keys(8, shuffle_seed=4)
    allowed = np.arange(40)
    exact = exact_scores(query, refs)[0]
    assert np.all(exact == exact[0])  # true ties
    rows, scores = PoolSearcher(refs, keys.tie_rank).search(query, allowed, 5)
    np.testing.assert_array_equal(rows, brute_force_topk(query, refs, allowed, keys.tie_rank, 5)[0])
    np.testing.assert_array_equal(rows, _naive_topk(query, refs, allowed, keys, 5))
    assert np.all(scores == exact[0])


def test_k_larger_than_the_pool_is_refused() -> None:
    vectors = _unit(np.random.default_rng(1).normal(size=(10, 4)))
    keys = _keys(2)
    with pytest.raises(ValueError, match="exceeds"):
        PoolSearcher(vectors, keys.tie_rank).search(vectors[:1], np.arange(3), 4)
    with pytest.raises(ValueError, match="exceeds"):
        brute_force_topk(vectors[:1], vectors, np.arange(3), keys.tie_rank, 4)
