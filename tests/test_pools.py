"""Reference pools: never the frame or its near-duplicates, seeded and order-free, short chapters explicit."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from pipelines.core.pools import (
    NearDuplicateRule,
    chapter_pools,
    edge_hash,
    hash_distance_matrix,
    near_duplicate_matrix,
    page_hashes,
    select_pool,
)
from pipelines.core.schemas import STATUS_EXCLUDED, STATUS_OK

RULE = NearDuplicateRule()


def drawn_page(seed: int, size: tuple[int, int] = (240, 360)) -> Image.Image:
    """A manga-like page: white margin, panel borders, filled shapes with outlines."""
    rng = np.random.default_rng(seed)
    width, height = size
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    margin = width // 16
    rows = int(rng.integers(2, 4))
    for r in range(rows):
        top = margin + r * (height - 2 * margin) // rows
        bottom = margin + (r + 1) * (height - 2 * margin) // rows - 4
        cols = int(rng.integers(1, 3))
        for c in range(cols):
            left = margin + c * (width - 2 * margin) // cols
            right = margin + (c + 1) * (width - 2 * margin) // cols - 4
            draw.rectangle((left, top, right, bottom), outline=(0, 0, 0), width=2)
            for _ in range(3):
                x0 = int(rng.integers(left + 2, right - 12))
                y0 = int(rng.integers(top + 2, bottom - 12))
                x1 = min(right - 2, x0 + int(rng.integers(8, 50)))
                y1 = min(bottom - 2, y0 + int(rng.integers(8, 60)))
                fill = tuple(int(v) for v in rng.integers(0, 256, 3))
                shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
                shape((x0, y0, x1, y1), fill=fill, outline=(0, 0, 0), width=2)
    return image


def resaved(image: Image.Image, quality: int = 50) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def distance(a: Image.Image, b: Image.Image) -> float:
    return float(hash_distance_matrix(page_hashes(a), page_hashes(b)).min())


def test_re_released_copies_are_near_duplicates_and_other_pages_are_not() -> None:
    page = drawn_page(1)
    w, h = page.size
    padded = Image.new("RGB", (w + 40, h + 30), (255, 255, 255))
    padded.paste(page, (25, 10))
    copies = {
        "jpeg q50": resaved(page, 50),
        "downscaled": page.resize((w * 2 // 3, h * 2 // 3), Image.Resampling.LANCZOS),
        "brighter, lower contrast": ImageEnhance.Contrast(ImageEnhance.Brightness(page).enhance(1.1)).enhance(0.8),
        "trimmed margin": page.crop((6, 6, w - 6, h - 6)),
        "padded margin": padded,
        "greyscale edition": page.convert("L"),
    }
    for name, copy in copies.items():
        assert distance(page, copy) <= RULE.max_hash_distance, name
    others = [distance(page, drawn_page(seed)) for seed in range(2, 12)]
    assert min(others) > RULE.loose_hash_distance


def test_blank_pages_match_each_other_and_hashes_have_fixed_size() -> None:
    blank = Image.new("RGB", (200, 300), (255, 255, 255))
    assert len(edge_hash(blank)) == 128 and not any(edge_hash(blank))
    assert distance(blank, Image.new("RGB", (100, 150), (250, 250, 250))) == 0.0
    assert distance(blank, drawn_page(3)) == 1.0


def test_spreads_match_their_halves_but_the_halves_do_not_match_each_other() -> None:
    left, right = drawn_page(20), drawn_page(21)
    spread = Image.new("RGB", (2 * left.width, left.height))
    spread.paste(left, (0, 0))
    spread.paste(right, (left.width, 0))
    assert len(page_hashes(spread)) == 3 and len(page_hashes(left)) == 1
    # pages: the whole spread, its halves split once, the left half split again (re-saved), an unrelated page
    pages = [spread, left, right, resaved(left), drawn_page(22)]
    duplicate = near_duplicate_matrix([page_hashes(p) for p in pages], None, RULE)
    assert duplicate[0, 1] and duplicate[0, 2] and duplicate[0, 3]  # the spread vs each half
    assert duplicate[1, 3]  # the same spread split twice: duplicate halves
    assert not duplicate[1, 2] and not duplicate[2, 3]  # the two halves of one spread are different art
    assert not duplicate[4, :4].any()
    assert (duplicate == duplicate.T).all() and duplicate.diagonal().all()


def test_the_embedding_rule_needs_a_close_hash_and_a_high_cosine() -> None:
    hashes = [page_hashes(drawn_page(s)) for s in (30, 31, 32)]
    vectors = np.array([[1.0, 0.0], [0.99, 0.141], [1.0, 0.0]], dtype=np.float32)
    lenient = NearDuplicateRule(max_hash_distance=0.0, loose_hash_distance=1.0, min_cosine=0.98)
    strict_hash = NearDuplicateRule(max_hash_distance=0.0, loose_hash_distance=0.1, min_cosine=0.98)
    assert near_duplicate_matrix(hashes, vectors, lenient)[0, 1]  # cosine 0.99, any hash distance
    assert not near_duplicate_matrix(hashes, vectors, strict_hash)[0, 1]  # the hashes are far apart
    assert not near_duplicate_matrix(hashes, None, lenient)[0, 1]  # without embeddings, only the hash rule


def _chapter(n: int, twins: dict[int, int] | None = None) -> tuple[list[str], list[list[bytes]]]:
    """n distinct drawn pages; `twins` maps an extra page index to the page it re-saves."""
    images = [drawn_page(100 + i, (120, 180)) for i in range(n)]
    for extra, original in sorted((twins or {}).items()):
        assert extra == len(images)
        images.append(resaved(images[original], 60))
    ids = [f"p{i:03d}" for i in range(len(images))]
    return ids, [page_hashes(im) for im in images]


def test_pools_never_hold_the_frame_or_its_near_duplicates() -> None:
    ids, hashes = _chapter(26, {26: 3, 27: 3, 28: 10})
    pools = chapter_pools(ids, hashes, None, refs=20, min_refs=10, seed=0, rule=RULE)
    assert [p.frame_id for p in pools] == ids
    twins = {
        "p003": {"p026", "p027"},
        "p026": {"p003", "p027"},
        "p027": {"p003", "p026"},
        "p010": {"p028"},
        "p028": {"p010"},
    }
    for pool in pools:
        assert pool.status == STATUS_OK and not pool.short
        assert len(pool.ref_page_ids) == 20 and pool.ref_page_ids == sorted(pool.ref_page_ids)
        assert pool.frame_id not in pool.ref_page_ids
        assert set(pool.excluded_near_duplicates) == twins.get(pool.frame_id, set())
        assert not set(pool.ref_page_ids) & twins.get(pool.frame_id, set())
        assert pool.n_candidates == len(ids) - 1


def test_pools_are_seeded_and_independent_of_order() -> None:
    ids, hashes = _chapter(30)
    first = {
        p.frame_id: p.ref_page_ids for p in chapter_pools(ids, hashes, None, refs=20, min_refs=10, seed=5, rule=RULE)
    }
    order = list(range(len(ids)))
    random.Random(1).shuffle(order)
    shuffled = chapter_pools(
        [ids[i] for i in order], [hashes[i] for i in order], None, refs=20, min_refs=10, seed=5, rule=RULE
    )
    assert {p.frame_id: p.ref_page_ids for p in shuffled} == first
    other_seed = {
        p.frame_id: p.ref_page_ids for p in chapter_pools(ids, hashes, None, refs=20, min_refs=10, seed=6, rule=RULE)
    }
    assert other_seed != first
    # a new page changes a pool by at most one page: it takes a place or leaves the pool as it was
    candidates = [p for p in ids if p != "p000"]
    before = select_pool("p000", candidates, set(), refs=20, min_refs=10, seed=5).ref_page_ids
    after = select_pool("p000", [*candidates, "p999"], set(), refs=20, min_refs=10, seed=5).ref_page_ids
    assert before == first["p000"]
    assert len(set(before) - set(after)) <= 1 and set(after) - set(before) <= {"p999"}


def test_short_chapters_follow_the_documented_rule() -> None:
    ids, hashes = _chapter(12, {12: 0})
    pools = {p.frame_id: p for p in chapter_pools(ids, hashes, None, refs=20, min_refs=10, seed=0, rule=RULE)}
    usual = pools["p005"]  # 12 other pages, none a twin: all used, marked short
    assert usual.status == STATUS_OK and usual.short and len(usual.ref_page_ids) == 12
    twin = pools["p000"]  # 12 others minus its twin: 11 usable, still >= min_refs
    assert twin.status == STATUS_OK and twin.short and len(twin.ref_page_ids) == 11 and "p012" not in twin.ref_page_ids
    strict = {p.frame_id: p for p in chapter_pools(ids, hashes, None, refs=20, min_refs=12, seed=0, rule=RULE)}
    excluded = strict["p000"]
    assert excluded.status == STATUS_EXCLUDED and excluded.ref_page_ids == []
    assert "only 11 usable reference pages" in excluded.error and "at least 12" in excluded.error
    assert excluded.excluded_near_duplicates == ["p012"]
    assert strict["p005"].status == STATUS_OK and strict["p005"].short


def test_pool_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="min_refs"):
        select_pool("a", ["b"], set(), refs=5, min_refs=6, seed=0)
    with pytest.raises(ValueError, match="unique"):
        chapter_pools(["a", "a"], [[b"\0" * 128], [b"\0" * 128]], None, refs=1, min_refs=1, seed=0, rule=RULE)
