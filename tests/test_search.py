"""FAISS pool search equals the numpy brute force, ties included, in the documented order, one frame or a whole
chapter per call."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.core.search import PoolSearcher, RefKeys, brute_force_topk, exact_scores, padded_rows


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


def _tied_chapter(rng: np.random.Generator, n_pages: int, dim: int) -> np.ndarray:
    """Reference vectors where many rows are exact copies of a few vectors, on different pages and patches."""
    base = _unit(rng.normal(size=(n_pages * 5, dim)))
    for i in range(0, len(base), 7):
        base[i] = base[3]
    for i in range(1, len(base), 11):
        base[i] = base[5]
    return base


def _frame_queries(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """4 queries: equal to tied vectors (tie at rank 0), near one of them, and random."""
    dim = base.shape[1]
    near = _unit(base[3:4] + 0.01 * rng.normal(size=(1, dim)))[0]
    return np.stack([base[3], base[5], near, _unit(rng.normal(size=(1, dim)))[0]])


def test_faiss_equals_brute_force_with_many_exact_ties() -> None:
    rng = np.random.default_rng(0)
    n_pages = 60
    base = _tied_chapter(rng, n_pages, 48)
    keys = _keys(n_pages)
    searcher = PoolSearcher(base, keys.tie_rank, threads=1)
    for frame in range(40):
        pool_pages = rng.choice(n_pages, size=20, replace=False)
        allowed = np.concatenate([np.arange(5) + 5 * p for p in pool_pages])
        queries = _frame_queries(rng, base)
        for k in (1, 3, 7):
            rows, scores = searcher.search(queries, allowed, k)
            ref_rows, ref_scores = brute_force_topk(queries, base, allowed, keys.tie_rank, k)
            np.testing.assert_array_equal(rows, ref_rows, err_msg=f"frame {frame}, k={k}")
            np.testing.assert_array_equal(scores, ref_scores)
            np.testing.assert_array_equal(rows, _naive_topk(queries, base, allowed, keys, k))
            assert set(rows.ravel()) <= set(allowed)
            assert (np.diff(scores, axis=1) <= 0).all()


def test_one_call_per_chapter_equals_brute_force_per_frame() -> None:
    """All frames of a chapter in one search, pools of different sizes (padded), as the retrieval job calls it."""
    rng = np.random.default_rng(1)
    n_pages = 50
    base = _tied_chapter(rng, n_pages, 64)
    keys = _keys(n_pages, shuffle_seed=2)
    pools = [
        np.concatenate([np.arange(5) + 5 * p for p in rng.choice(n_pages, size=rng.integers(2, 25), replace=False)])
        for _ in range(30)
    ]
    queries = [_frame_queries(rng, base) for _ in pools]
    searcher = PoolSearcher(base, keys.tie_rank)
    for k in (1, 3, 10):
        rows, scores = searcher.search(np.concatenate(queries), padded_rows(pools, repeats=4), k)
        assert rows.shape == scores.shape == (4 * len(pools), k)
        for frame, (frame_queries, allowed) in enumerate(zip(queries, pools, strict=True)):
            ref_rows, ref_scores = brute_force_topk(frame_queries, base, allowed, keys.tie_rank, k)
            np.testing.assert_array_equal(rows[4 * frame : 4 * frame + 4], ref_rows, err_msg=f"frame {frame}, k={k}")
            np.testing.assert_array_equal(scores[4 * frame : 4 * frame + 4], ref_scores)


def test_padded_rows_layout() -> None:
    layout = padded_rows([np.array([4, 2]), np.array([7]), np.array([1, 0, 3])], repeats=2)
    assert layout.dtype == np.int64
    assert layout.tolist() == [[4, 2, -1], [4, 2, -1], [7, -1, -1], [7, -1, -1], [1, 0, 3], [1, 0, 3]]


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


def _float32_blind_refs(rng: np.random.Generator, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A constant query and `n` permutations of one vector: equal exact scores, which float32 gets wrong.

    The vector mixes large and tiny components, so its sum needs more bits than float32 holds: float32 rounds it
    differently in each summation order, by more than the exact differences the tests then add.
    """
    large = rng.uniform(0.5, 1.5, dim)
    tiny = rng.uniform(1e-4, 1e-3, dim) * rng.choice([-1, 1], dim)
    vector = _unit(np.where(rng.random(dim) < 0.5, large, tiny)[None])[0]
    query = _unit(np.ones((1, dim)))
    refs = np.stack([rng.permutation(vector) for _ in range(n)])
    assert len(np.unique((query.astype(np.float32) * refs.astype(np.float32)).sum(axis=1))) > 1
    return query, refs


def test_ties_that_float32_search_cannot_see_are_broken_by_page_id() -> None:
    query, refs = _float32_blind_refs(np.random.default_rng(0), 40, 1024)
    keys = _keys(8, shuffle_seed=4)
    allowed = np.arange(40)
    exact = exact_scores(query, refs)[0]
    assert np.all(exact == exact[0])  # true ties
    rows, scores = PoolSearcher(refs, keys.tie_rank).search(query, allowed, 5)
    np.testing.assert_array_equal(rows, brute_force_topk(query, refs, allowed, keys.tie_rank, 5)[0])
    np.testing.assert_array_equal(rows, _naive_topk(query, refs, allowed, keys, 5))
    assert np.all(scores == exact[0])


def test_differences_below_float32_resolution_are_ranked_exactly() -> None:
    rng = np.random.default_rng(0)
    query, refs = _float32_blind_refs(rng, 40, 1024)
    for row in refs:  # one tiny component one fp16 step up or down: exact scores differ by ~4e-9
        j = rng.choice(np.flatnonzero(np.abs(row) < 1e-2))
        row[j] = np.nextafter(row[j], np.float16(rng.choice([-1, 1])) * np.float16(np.inf))
    keys = _keys(8, shuffle_seed=4)
    allowed = np.arange(40)
    exact = exact_scores(query, refs)[0]
    assert 0 < np.ptp(exact) < 1e-8
    rows, scores = PoolSearcher(refs, keys.tie_rank).search(query, allowed, 5)
    ref_rows, ref_scores = brute_force_topk(query, refs, allowed, keys.tie_rank, 5)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_array_equal(scores, ref_scores)
    np.testing.assert_array_equal(rows, _naive_topk(query, refs, allowed, keys, 5))


def test_k_larger_than_the_pool_is_refused() -> None:
    vectors = _unit(np.random.default_rng(1).normal(size=(10, 4)))
    keys = _keys(2)
    with pytest.raises(ValueError, match="exceeds"):
        PoolSearcher(vectors, keys.tie_rank).search(vectors[:1], np.arange(3), 4)
    with pytest.raises(ValueError, match="exceeds"):  # one short pool among others
        PoolSearcher(vectors, keys.tie_rank).search(vectors[:2], padded_rows([np.arange(5), np.arange(2)]), 3)
    with pytest.raises(ValueError, match="exceeds"):
        brute_force_topk(vectors[:1], vectors, np.arange(3), keys.tie_rank, 4)


@pytest.mark.parametrize(
    ("queries", "allowed", "message"),
    [
        (np.zeros((1, 4), dtype=np.float32), np.arange(3), "float16"),
        (np.full((1, 4), np.nan, dtype=np.float16), np.arange(3), "NaN"),
        (np.ones((1, 5), dtype=np.float16), np.arange(3), "dimensions"),
        (None, np.array([0, 1, 10]), "in 0..9"),
        (None, np.array([0, 1, -2]), "in 0..9"),
        (None, np.array([2, 1, 2]), "distinct"),
        (None, np.arange(6).reshape(2, 3), "do not match"),
    ],
)
def test_bad_input_is_refused(queries, allowed, message: str) -> None:
    vectors = _unit(np.random.default_rng(1).normal(size=(10, 4)))
    searcher = PoolSearcher(vectors, _keys(2).tie_rank)
    with pytest.raises(ValueError, match=message):
        searcher.search(vectors[:1] if queries is None else queries, allowed, 1)


def _naive_capped(queries, refs, allowed_per_frame, keys: RefKeys, k, cap):
    """Plain-Python definition of the diversity cap: per frame (4 queries), walk all (query, row) candidates in
    order of score desc, rank within the query, query index; keep one while its query needs rows and its page has
    given fewer than `cap` of the frame's patches."""
    scores = exact_scores(queries, refs)
    out = np.full((len(queries), k), -1)
    for first, allowed in zip(range(0, len(queries), 4), allowed_per_frame, strict=True):
        ranked = {
            q: sorted(allowed, key=lambda r, q=q: (-scores[q, r], keys.page_ids[r], keys.patches[r]))
            for q in range(first, first + 4)
        }
        candidates = sorted(
            ((q, rank, row) for q, rows in ranked.items() for rank, row in enumerate(rows)),
            key=lambda c: (-scores[c[0], c[2]], c[1], c[0]),
        )
        taken = {q: [] for q in ranked}
        per_page: dict[str, int] = {}
        for q, _, row in candidates:
            page = keys.page_ids[row]
            if len(taken[q]) < k and per_page.get(page, 0) < cap:
                taken[q].append(row)
                per_page[page] = per_page.get(page, 0) + 1
        for q, rows in taken.items():
            out[q] = rows
    return out


def test_max_per_page_caps_a_frames_patches_per_reference_page() -> None:
    rng = np.random.default_rng(3)
    n_pages = 30
    base = _unit(rng.normal(size=(n_pages * 5, 24)))
    keys = _keys(n_pages)
    # a frame whose 4 query patches all resemble one page: uncapped, that page supplies most of its 12 patches
    favourite = np.arange(5) + 5 * 7
    queries = _unit(base[favourite[[0, 1, 2, 3]]].astype(np.float32) + 0.05 * rng.normal(size=(4, 24)))
    queries = np.concatenate([queries, _unit(rng.normal(size=(4, 24)))])  # and a second, random frame
    others = np.array([p for p in range(n_pages) if p != 7])
    pools = [np.append(rng.choice(others, size=11, replace=False), 7), rng.choice(n_pages, size=12, replace=False)]
    allowed_sets = [np.concatenate([np.arange(5) + 5 * p for p in pool]) for pool in pools]
    allowed = padded_rows(allowed_sets, repeats=4)
    searcher = PoolSearcher(base, keys.tie_rank)
    free_rows, free_scores = searcher.search(queries, allowed, 3)
    assert max(np.unique(keys.page_ids[free_rows[:4]], return_counts=True)[1]) >= 4  # one page dominates
    # a cap no frame reaches is the paper's independent top-k, scores and all
    same_rows, same_scores = searcher.search(
        queries, allowed, 3, max_per_page=12, ref_pages=keys.page_ids, queries_per_frame=4
    )
    np.testing.assert_array_equal(same_rows, free_rows)
    np.testing.assert_allclose(same_scores, free_scores)
    for cap in (1, 2, 3):
        rows, scores = searcher.search(
            queries, allowed, 3, max_per_page=cap, ref_pages=keys.page_ids, queries_per_frame=4
        )
        np.testing.assert_array_equal(rows, _naive_capped(queries, base, allowed_sets, keys, 3, cap))
        for frame in (rows[:4], rows[4:]):
            assert max(np.unique(keys.page_ids[frame], return_counts=True)[1]) <= cap
        assert (np.diff(scores, axis=1) <= 0).all()  # each query's rows stay best first
        np.testing.assert_allclose(scores, exact_scores(queries, base)[np.arange(8)[:, None], rows])


def test_an_unfillable_cap_and_missing_pages_are_refused() -> None:
    keys = _keys(2)
    vectors = _unit(np.random.default_rng(0).normal(size=(10, 8)))
    searcher = PoolSearcher(vectors, keys.tie_rank)
    with pytest.raises(ValueError, match="max_per_page=1.*too few reference pages"):
        searcher.search(vectors[:4], np.arange(10), 3, max_per_page=1, ref_pages=keys.page_ids, queries_per_frame=4)
    with pytest.raises(ValueError, match="needs ref_pages"):
        searcher.search(vectors[:4], np.arange(10), 3, max_per_page=2)
