"""The leakage check with and without its kept state, when one chapter is added to N.

    python bench/bench_leakage.py [--chapters 1000] [--pages 8] [--dim 64] [--val-every 10] [--work DIR]

Writes N chapters of random whole-page vectors through `EmbeddingStore` (every `--val-every`-th chapter held out
as validation, the rest training), runs `find_duplicates` once with versions (which writes the state), adds one
training chapter and then one validation chapter, and times each addition twice: from scratch (no versions: every
vector read, as before the state existed; the baseline, measured in the same run) and with the state. Prints the
seconds, the chapters read and the ratio state / from scratch.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipelines.core.embeddings import EmbeddingStore
from pipelines.core.geometry import WHOLE_PAGE_PATCH
from pipelines.core.layout import DataLayout
from pipelines.core.pools import HASH_BYTES
from pipelines.core.schemas import EMBEDDED_PAGES, EMBEDDINGS, table_from_rows
from pipelines.shards.leakage import LeakageConfig, find_duplicates
from pipelines.shards.leakage_vectors import PageRef

ENCODER = "bench-encoder"


def write_chapter(store: EmbeddingStore, chapter: str, pages: int, dim: int, rng: np.random.Generator) -> None:
    ids = [f"{chapter}-p{i}" for i in range(pages)]
    vectors = rng.standard_normal((pages, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = [{"page_id": p, "role": "ref", "patch": WHOLE_PAGE_PATCH, "row": i} for i, p in enumerate(ids)]
    hashes = [
        {"page_id": p, "chapter_id": chapter, "image_sha1": p, "hashes": [rng.bytes(HASH_BYTES)], "status": "ok"}
        for p in ids
    ]
    store.write(
        chapter,
        vectors.astype(np.float16),
        table_from_rows(rows, EMBEDDINGS),
        table_from_rows(hashes, EMBEDDED_PAGES),
        {"version": f"{chapter}-v1", "rows": pages},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chapters", type=int, default=1000)
    parser.add_argument("--pages", type=int, default=8, help="pages per chapter")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--val-every", type=int, default=10, help="every n-th chapter is held out")
    parser.add_argument("--work", type=Path, default=None, help="folder for the tree (default: a temporary one)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-leakage-", dir=args.work))
    try:
        layout = DataLayout.at(work / "out")
        store = EmbeddingStore(layout.embeddings(ENCODER))
        rng = np.random.default_rng(0)
        splits = {f"c{i:06d}": "val" if i % args.val_every == 0 else "train" for i in range(args.chapters)}
        for chapter in splits:
            write_chapter(store, chapter, args.pages, args.dim, rng)
        config = LeakageConfig(seed=0)

        def check(with_state: bool) -> tuple[float, dict]:
            held = [PageRef(f"{c}-p{i}", c, c, s) for c, s in splits.items() if s != "train" for i in range(args.pages)]
            train = [
                PageRef(f"{c}-p{i}", c, c, s) for c, s in splits.items() if s == "train" for i in range(args.pages)
            ]
            versions = {c: f"{c}-v1" for c in splits} if with_state else None
            started = time.perf_counter()
            _, summary = find_duplicates(layout, ENCODER, held, train, config, versions=versions)
            return time.perf_counter() - started, summary

        seconds, _ = check(True)
        print(f"N={args.chapters} chapters x {args.pages} pages, dim {args.dim}: first run with state {seconds:.2f} s")
        for added, split in (("added-train", "train"), ("added-val", "val")):
            splits[added] = split
            write_chapter(store, added, args.pages, args.dim, rng)
            full, _ = check(False)
            kept, summary = check(True)
            print(
                f"one {split} chapter added: from scratch {full:.3f} s, with state {kept:.3f} s "
                f"(chapters read {summary['state']['chapters_read']}), ratio {kept / full:.2f}"
            )
        noop, summary = check(True)
        print(f"nothing added, with state: {noop:.3f} s (chapters read {summary['state']['chapters_read']})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
