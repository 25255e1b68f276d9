"""Lanczos or bicubic for the data pipeline's page fit: what changes, measured on colour pages.

The released app fits pages with PIL bicubic (its `process_image`); colorize and the shards' composite ring do the
same since sample format 2. The data pipeline still fits with Lanczos where its stored bytes were made from that fit
(the retrieval cache's patches, the screentone renders and the frames they were rendered from, the benchmark's
truth pages); `--fit-resample` chooses per dataset. For each chapter folder of colour pages this prints, at the
training size:

- pixels: mean and max grey-level difference between the two fits and the share of pixels more than one level
  apart (RGB channels);
- detail: the standard deviation of the Laplacian of the greyscale fit (fine lines and screentone), bicubic as a
  ratio to Lanczos;
- retrieval: every page's 4 greyscale query patches searched among the 5 colour patches of the chapter's other
  pages (3 per query patch: the cache's 12 retrievals), once with each fit; the share of the 12 that agree, with
  the weight-free encoder (no CLIP weights here: a CLIP encoder's figure needs its weights, `--encoder`);
- time: milliseconds per fit, bicubic as a ratio to Lanczos measured in the same run.

Chapters are the subfolders of each `--pages` root holding images (e.g. the released demo's `assets/example_N`
folders), else a generated sample corpus.

    python bench/bench_fit_filter.py [--pages ROOT ...] [--size 512x800] [--encoder weightfree]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from pipelines.core.cli import parse_size
from pipelines.core.encoders import grey_version, load_encoder, resolve_encoder
from pipelines.core.geometry import RANKS_PER_PATCH, RESAMPLE_BICUBIC, RESAMPLE_LANCZOS
from pipelines.core.patches import fitted_page, page_patches
from pipelines.core.schemas import QUERY_PATCHES
from pipelines.core.search import exact_scores

FILTERS = (RESAMPLE_LANCZOS, RESAMPLE_BICUBIC)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def chapter_folders(roots: Sequence[Path]) -> Iterator[Path]:
    """Every folder under the roots that holds images."""
    for root in roots:
        yield from sorted({path.parent for path in root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES})


def colour_pages(folder: Path) -> list[Image.Image]:
    """The folder's decodable colour pages (mean chroma above 8 levels: a generated corpus mixes in B&W and broken
    pages)."""
    pages = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            page = Image.open(path).convert("RGB")
        except (OSError, UnidentifiedImageError):
            continue
        if np.ptp(np.asarray(page, dtype=np.int16), axis=2).mean() > 8:
            pages.append(page)
    return pages


def pixel_figures(lanczos: Image.Image, bicubic: Image.Image) -> dict[str, float]:
    a = np.asarray(lanczos, dtype=np.int16)
    b = np.asarray(bicubic, dtype=np.int16)
    diff = np.abs(a - b)
    detail = [
        float(ndimage.laplace(np.asarray(grey_version(image), dtype=np.float32)).std()) for image in (lanczos, bicubic)
    ]
    return {
        "mean": float(diff.mean()),
        "max": float(diff.max()),
        "over_one": float((diff > 1).mean()),
        "detail_ratio": detail[1] / detail[0] if detail[0] else 1.0,
    }


def retrieval_sets(vectors: list[np.ndarray]) -> list[set[tuple[int, int]]]:
    """Per page (its 9 patch vectors), its 12 retrievals as (page, patch) among the other pages' reference patches."""
    found = []
    for query_page, page_vectors in enumerate(vectors):
        refs = [(page, patch) for page in range(len(vectors)) if page != query_page for patch in range(5)]
        ref_vectors = np.stack([vectors[page][QUERY_PATCHES + patch] for page, patch in refs])
        scores = exact_scores(page_vectors[:QUERY_PATCHES], ref_vectors)
        found.append({refs[index] for row in scores for index in np.argsort(-row, kind="stable")[:RANKS_PER_PATCH]})
    return found


def measure(folders: list[Path], size: tuple[int, int], encoder_spec: str) -> None:
    info = resolve_encoder(encoder_spec)
    encoder = load_encoder(info)
    prepare = info.preparer()
    width, height = size
    pixels: list[dict[str, float]] = []
    seconds = {name: 0.0 for name in FILTERS}
    agreement: list[float] = []
    fits = chapters = 0
    for folder in folders:
        pages = colour_pages(folder)
        if len(pages) < 2:  # one page has nothing to be searched among
            continue
        vectors: dict[str, list[np.ndarray]] = {}
        for name in FILTERS:
            started = time.perf_counter()
            for page in pages:
                fitted_page(page, width, height, name)
            seconds[name] += time.perf_counter() - started
            vectors[name] = [
                encoder.embed(np.stack([prepare(patch) for patch in page_patches(page, width, height, name)]))
                for page in pages
            ]
        fits += len(pages)
        chapters += 1
        pixels.extend(pixel_figures(*(fitted_page(page, width, height, name) for name in FILTERS)) for page in pages)
        by_filter = [retrieval_sets(vectors[name]) for name in FILTERS]
        agreement.extend(len(a & b) / max(len(a), 1) for a, b in zip(*by_filter, strict=True))
    if not chapters:
        raise SystemExit("bench_fit_filter: no chapter folder holds two decodable colour pages to compare")
    print(f"{chapters} chapters, {fits} colour pages, fitted to {width}x{height}; encoder {info.encoder_id}")
    print(
        f"pixels, bicubic vs Lanczos: mean {np.mean([p['mean'] for p in pixels]):.2f} grey levels, max "
        f"{max(p['max'] for p in pixels):.0f}, {100 * np.mean([p['over_one'] for p in pixels]):.1f}% of values more "
        "than one level apart"
    )
    detail = [p["detail_ratio"] for p in pixels]
    print(f"detail (Laplacian std), bicubic / Lanczos: mean {np.mean(detail):.3f} (min {min(detail):.3f})")
    print(
        f"retrieval: {100 * np.mean(agreement):.1f}% of each page's 12 retrievals the same with either fit "
        f"(min {100 * min(agreement):.0f}%)"
    )
    lanczos_ms = 1000 * seconds[RESAMPLE_LANCZOS] / fits
    bicubic_ms = 1000 * seconds[RESAMPLE_BICUBIC] / fits
    print(
        f"time per fit: Lanczos {lanczos_ms:.2f} ms (baseline), bicubic {bicubic_ms:.2f} ms, "
        f"ratio {bicubic_ms / lanczos_ms:.2f}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=Path, nargs="+", help="roots of chapter folders of colour pages")
    parser.add_argument("--size", type=parse_size, default=(512, 800), help="training size W x H")
    parser.add_argument("--encoder", default="weightfree", help="encoder spec (default: the weight-free encoder)")
    args = parser.parse_args(argv)
    if args.pages:
        missing = [str(root) for root in args.pages if not root.is_dir()]
        if missing:
            parser.error(f"--pages {' '.join(missing)}: no such folder")
        measure(list(chapter_folders(args.pages)), args.size, args.encoder)
        return
    from pipelines.sample_corpus.generate import generate_corpus

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        generate_corpus(corpus, preset="small")
        measure(list(chapter_folders([corpus])), args.size, args.encoder)


if __name__ == "__main__":
    main()
