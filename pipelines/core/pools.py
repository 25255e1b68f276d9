"""Reference pools: for each frame, other colour pages of its chapter, never its near-duplicates.

A pool is a seeded sample that depends only on (seed, frame id, the candidate set): every candidate gets a
priority hashed from (seed, frame_id, page_id) and the pool is the `refs` candidates of lowest priority. So a
frame gets the same pool in every run and on every worker, whatever the iteration order, and adding a page
to a chapter changes a pool only if the new page wins a place (a uniform sample without replacement).

Near-duplicates (the same art re-saved, re-released with other levels, or a double-page spread split twice)
would let the model copy the answer, so they never enter a frame's pool. The detector is an edge hash of the
page's content box (margins trimmed, so re-releases with other margins agree): a 16x16 grid of the greyscale
page, one bit per neighbour pair and direction that has a clear step (`edge_hash`). Brightness, contrast and
JPEG changes keep the same steps; different art has different steps. Two pages are compared by the Jaccard
distance of their step sets (on the sample corpus: re-released copies <= 0.03, distinct pages >= 0.6). A wide
page (a spread kept whole) also gets the hashes of its two halves, so it matches each half stored as its own
page, while the two halves of one spread (different art) do not match each other, and the same spread split
twice gives matching halves. The whole-page embedding adds a second rule: a very high cosine together with a
moderately close hash (catches heavier crops into the art, which move the content box).

Rule for short chapters: a frame with fewer candidates than `refs` (after removing near-duplicates) uses all
of them and is marked `short` if it has at least `min_refs`; below that it gets status `excluded` with the
reason and no retrievals. Never silent: both cases are counted in the run summary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.core.encoders import grey_version
from pipelines.core.schemas import STATUS_ERROR, STATUS_EXCLUDED, STATUS_OK

HASH_GRID = 16
HASH_BYTES = 2 * 2 * HASH_GRID * HASH_GRID // 8  # 2 directions x 2 signs per grid cell
STEP = 6.0 / 255.0  # a luminance step between neighbouring cells that counts as an edge
CONTENT_CONTRAST = 96  # grey levels away from the margin colour that count as drawn content
WIDE_ASPECT = 1.2  # width / height above which a page is treated as a spread and its halves hashed too


@dataclass(frozen=True)
class NearDuplicateRule:
    """When two pages count as the same art. Distances are Jaccard distances of edge-hash step sets."""

    max_hash_distance: float = 0.25  # at or below: near-duplicate, whatever the embeddings say
    loose_hash_distance: float = 0.45  # at or below AND whole-page cosine >= min_cosine: near-duplicate
    min_cosine: float = 0.97

    def as_dict(self) -> dict[str, float]:
        return {
            "max_hash_distance": self.max_hash_distance,
            "loose_hash_distance": self.loose_hash_distance,
            "min_cosine": self.min_cosine,
        }


def edge_hash(image: Image.Image) -> bytes:
    """A 1024-bit edge hash: for a 16x16 area-averaged greyscale grid, which neighbours step up or down clearly.

    Unlike a plain dHash (sign of every difference), flat areas give no bits, so paper noise and JPEG ringing in
    white areas cannot flip them.
    """
    grey = grey_version(image).resize((HASH_GRID + 1, HASH_GRID + 1), Image.Resampling.BOX)
    cells = np.asarray(grey, dtype=np.float32) / 255.0
    dx = cells[:HASH_GRID, 1:] - cells[:HASH_GRID, :-1]
    dy = cells[1:, :HASH_GRID] - cells[:-1, :HASH_GRID]
    bits = np.concatenate([(dx > STEP).ravel(), (dx < -STEP).ravel(), (dy > STEP).ravel(), (dy < -STEP).ravel()])
    return np.packbits(bits).tobytes()


def content_box(grey: Image.Image) -> tuple[int, int, int, int]:
    """The box of a page's drawn content: rows and columns where >= 1% of pixels clearly differ from the margin.

    Releases of the same page differ by trimmed or padded margins; hashing the content box makes them agree.
    The strong threshold ignores JPEG ringing beside border lines. A page without such content keeps its box.
    """
    pixels = np.asarray(grey, dtype=np.int16)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    ink = np.abs(pixels - int(np.median(border))) > CONTENT_CONTRAST
    rows, cols = np.flatnonzero(ink.mean(axis=1) > 0.01), np.flatnonzero(ink.mean(axis=0) > 0.01)
    if len(rows) < 2 or len(cols) < 2:
        return (0, 0, grey.width, grey.height)
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def _content_hash(grey: Image.Image) -> bytes:
    return edge_hash(grey.crop(content_box(grey)))


def page_hashes(image: Image.Image) -> list[bytes]:
    """Edge hash of the page's content box, plus its halves' if the page is a wide spread (see module doc)."""
    grey = grey_version(image)
    hashes = [_content_hash(grey)]
    if grey.width > WIDE_ASPECT * grey.height:
        middle = grey.width // 2
        hashes += [
            _content_hash(grey.crop((0, 0, middle, grey.height))),
            _content_hash(grey.crop((middle, 0, grey.width, grey.height))),
        ]
    return hashes


def hash_distance_matrix(hashes_a: list[bytes], hashes_b: list[bytes]) -> np.ndarray:
    """Jaccard distances between two lists of edge hashes; two empty step sets (blank pages) are at 0."""
    a = np.unpackbits(np.frombuffer(b"".join(hashes_a), np.uint8).reshape(len(hashes_a), HASH_BYTES), axis=1)
    b = np.unpackbits(np.frombuffer(b"".join(hashes_b), np.uint8).reshape(len(hashes_b), HASH_BYTES), axis=1)
    a, b = a.astype(np.float32), b.astype(np.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return np.where(union > 0, 1.0 - inter / np.maximum(union, 1.0), 0.0)


def page_distance_matrix(page_hashes_list: list[list[bytes]]) -> np.ndarray:
    """Page-to-page distance: the smallest distance between any hash of one page and any hash of the other."""
    owners = np.array([i for i, hashes in enumerate(page_hashes_list) for _ in hashes])
    flat = [h for hashes in page_hashes_list for h in hashes]
    n = len(page_hashes_list)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    distances = hash_distance_matrix(flat, flat)
    out = np.full((n, n), np.inf, dtype=np.float32)
    np.minimum.at(out, (owners[:, None], owners[None, :]), distances)
    return out


def near_duplicate_matrix(
    page_hashes_list: list[list[bytes]], whole_page_vectors: np.ndarray | None, rule: NearDuplicateRule
) -> np.ndarray:
    """Boolean n x n matrix: pages i and j are near-duplicates (the diagonal is True)."""
    distances = page_distance_matrix(page_hashes_list)
    duplicate = distances <= rule.max_hash_distance
    if whole_page_vectors is not None and len(whole_page_vectors):
        vectors = np.asarray(whole_page_vectors, dtype=np.float32)
        cosine = vectors @ vectors.T
        duplicate |= (distances <= rule.loose_hash_distance) & (cosine >= rule.min_cosine)
    np.fill_diagonal(duplicate, True)
    return duplicate


def pool_priority(seed: int, frame_id: str, page_id: str) -> bytes:
    """The candidate's sampling priority for a frame: a hash, independent of order and of the other pages."""
    return hashlib.blake2b(f"{seed}\x00{frame_id}\x00{page_id}".encode(), digest_size=16).digest()


@dataclass(frozen=True)
class Pool:
    frame_id: str
    ref_page_ids: list[str]  # sorted by page id
    n_candidates: int  # other usable colour pages of the chapter, near-duplicates included
    excluded_near_duplicates: list[str]
    short: bool
    status: str
    error: str | None

    def row(self, chapter_id: str) -> dict:
        return {
            "frame_id": self.frame_id,
            "chapter_id": chapter_id,
            "ref_page_ids": self.ref_page_ids,
            "n_candidates": self.n_candidates,
            "excluded_near_duplicates": self.excluded_near_duplicates,
            "short": self.short,
            "status": self.status,
            "error": self.error,
        }


def select_pool(
    frame_id: str, candidates: list[str], near_duplicates: set[str], *, refs: int, min_refs: int, seed: int
) -> Pool:
    """Pick a frame's pool among `candidates` (other pages of its chapter), leaving out its near-duplicates."""
    if refs < 1 or min_refs < 1 or min_refs > refs:
        raise ValueError(f"need 1 <= min_refs <= refs, got refs={refs}, min_refs={min_refs}")
    others = sorted(set(candidates) - {frame_id})
    excluded = sorted(p for p in others if p in near_duplicates)
    eligible = [p for p in others if p not in near_duplicates]
    chosen = sorted(sorted(eligible, key=lambda p: pool_priority(seed, frame_id, p))[:refs])
    short = len(eligible) < refs
    if len(eligible) < min_refs:
        reason = (
            f"only {len(eligible)} usable reference pages in the chapter ({len(others)} other pages, "
            f"{len(excluded)} near-duplicates of the frame); at least {min_refs} required (--min-refs)"
        )
        return Pool(frame_id, [], len(others), excluded, short, STATUS_EXCLUDED, reason)
    return Pool(frame_id, chosen, len(others), excluded, short, STATUS_OK, None)


def chapter_pools(
    page_ids: list[str],
    page_hashes_list: list[list[bytes]],
    whole_page_vectors: np.ndarray | None,
    *,
    refs: int,
    min_refs: int,
    seed: int,
    rule: NearDuplicateRule,
) -> list[Pool]:
    """Pools of every page of a chapter (each page is a frame; its candidates are the other pages)."""
    if len(set(page_ids)) != len(page_ids):
        raise ValueError("page ids of a chapter must be unique")
    duplicate = near_duplicate_matrix(page_hashes_list, whole_page_vectors, rule)
    pools = []
    for i, frame_id in enumerate(page_ids):
        near = {page_ids[j] for j in np.flatnonzero(duplicate[i]) if j != i}
        pools.append(select_pool(frame_id, page_ids, near, refs=refs, min_refs=min_refs, seed=seed))
    return pools


def error_pool(frame_id: str, reason: str) -> Pool:
    """The pool row of a frame that could not be used at all (undecodable, chapter failed upstream)."""
    return Pool(frame_id, [], 0, [], False, STATUS_ERROR, reason)
