"""Driver-side cost per chapter of a whole-pipeline rerun, at two or more chapter counts, in one run.

    python bench/bench_driver.py [--chapters 1000 3000] [--size 64x96] [--repeats 3] [--ray] [--work DIR [--keep]]

Per N it builds a tree of N chapters of tiny pages (`<series>/<chapter>/` folders of PNGs written directly: a few
colour pages and one black-and-white page per chapter, so every chapter is kept at `--min-color-pages`), runs the
whole pipeline once (`pipelines.runner.run_pipeline`: weight-free encoder, halftone renderer, in-process unless
`--ray`), then times, in `--repeats` interleaved rounds, (a) a no-op rerun, (b) a rerun with one chapter added (a
new series) and (c) the rerun with that chapter removed again (a take-down), all wall clock of `run_pipeline`. (b)
includes the added chapter's own work, measured in each round as the wall time of the same pipeline over a fresh
tree of that one chapter (after a run that loads every stage's imports, so both are timed warm; it includes each
run's fixed costs) and printed beside the first run's wall time per chapter. It prints each figure's median and
range, in milliseconds per chapter of the tree too, the median seconds each stage took in (b), and the ratio of the
per-chapter cost at the largest N to the smallest (the baseline, measured in the same run): 1.0 means the driver's
cost per chapter is flat, above 1.0 that it grows faster than the chapter count. The issue's goals are checked
against the medians: a no-op rerun over 10k chapters within 60 s, and at every N one added chapter within twice the
no-op time plus its own work.

`--keep` keeps each N's tree and data folder in `--work` (and the first run's wall time in `first.json` beside
them): a later run with the same `--work` reuses them, brings them current (after a code change that may redo a
stage) and measures the reruns again, so the 10k tree (a first run of ~25 minutes here) is built once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.core.cli import parse_size
from pipelines.retrieval.stage import RetrievalOptions
from pipelines.runner import STAGES, PipelineOptions, run_pipeline
from pipelines.shards.stage import ShardOptions

CHAPTERS_PER_SERIES = 10
NOOP_GOAL_SECONDS_AT_10K = 60.0


def write_chapter(folder: Path, seed: int, color_pages: int, size: tuple[int, int]) -> None:
    """A chapter folder of tiny PNG pages: `color_pages` colour blocks, then one grey page."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    for index in range(color_pages):
        blocks = rng.integers(0, 256, size=(6, 4, 3), dtype=np.uint8)
        page = np.kron(blocks, np.ones((height // 6 + 1, width // 4 + 1, 1), dtype=np.uint8))[:height, :width]
        Image.fromarray(page, "RGB").save(folder / f"{index + 1:03d}.png")
    grey = rng.integers(0, 256, size=(height, width), dtype=np.uint8)
    Image.fromarray(grey, "L").save(folder / f"{color_pages + 1:03d}.png")


def chapter_folder(root: Path, index: int) -> Path:
    return root / f"series{index // CHAPTERS_PER_SERIES:05d}" / f"ch{index % CHAPTERS_PER_SERIES:03d}"


def build_tree(root: Path, chapters: int, color_pages: int, size: tuple[int, int]) -> None:
    for index in range(chapters):
        write_chapter(chapter_folder(root, index), index, color_pages, size)


def pipeline_options(size: tuple[int, int], color_pages: int) -> PipelineOptions:
    """Tiny settings every stage accepts: pools of the other colour pages of a chapter, a one-chapter benchmark."""
    shards = ShardOptions(
        size=size,
        max_samples=256,
        bench_chapters=1,
        bench_refs=2,
        bench_bw=1,
        bench_max_series_fraction=0.5,
        renderer="halftone",
    )
    refs = color_pages - 1
    retrieval = RetrievalOptions(encoder="weightfree", refs=refs, min_refs=1, k_per_patch=1)
    return PipelineOptions(shards=shards, retrieval=retrieval, min_color_pages=color_pages)


def timed_run(corpus: Path, data: Path, options: PipelineOptions, local: bool) -> tuple[float, dict]:
    started = time.perf_counter()
    record = run_pipeline(corpus, data, options, local=local)
    seconds = time.perf_counter() - started
    if record.get("complete") is not True:
        raise RuntimeError(f"pipeline run over {corpus} did not complete: {record.get('blocked') or record}")
    return seconds, record


def measure(
    chapters: int, work: Path, size: tuple[int, int], color_pages: int, local: bool, keep: bool, repeats: int
) -> dict[str, Any]:
    """First run, then `repeats` rounds of: the one chapter's own run, a no-op rerun, a rerun with one chapter added
    and one with it removed again, over a tree of `chapters` chapters (fresh, or the one `keep` left in `work`, then
    brought current and its first-run time read back). The rounds interleave the figures, so a VM that speeds up or
    slows down during the bench moves the goal's two sides together. Each figure is the list of its times."""
    corpus, data = work / f"corpus-{chapters}", work / f"data-{chapters}"
    first_record = work / f"first-{chapters}.json"
    added_folder = chapter_folder(corpus, chapters)
    shutil.rmtree(added_folder, ignore_errors=True)  # a kept tree lost its added chapter: it is added again below
    if not first_record.exists():
        shutil.rmtree(corpus, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
        build_tree(corpus, chapters, color_pages, size)
    options = pipeline_options(size, color_pages)
    first, _ = timed_run(corpus, data, options, local)
    if first_record.exists():
        first = json.loads(first_record.read_text())["first"]
    elif keep:
        first_record.write_text(json.dumps({"first": first}))
    one_chapter_runs(work, chapters, color_pages, size, options, local, 0)  # loads what the stages import lazily
    own, noop, added, removed, stages = [], [], [], [], {stage: [] for stage in STAGES}
    for _ in range(repeats):
        own += one_chapter_runs(work, chapters, color_pages, size, options, local, 1, warm=True)
        noop.append(timed_run(corpus, data, options, local)[0])
        write_chapter(added_folder, chapters, color_pages, size)
        seconds, record = timed_run(corpus, data, options, local)
        added.append(seconds)
        for stage in STAGES:
            stages[stage].append(record["stages"][stage]["seconds"])
        shutil.rmtree(added_folder)
        removed.append(timed_run(corpus, data, options, local)[0])
    if not keep:
        shutil.rmtree(corpus)
        shutil.rmtree(data)
    figures = {"first": first, "own": own, "noop": noop, "added": added, "removed": removed}
    return figures | {f"stage_{stage}": times for stage, times in stages.items()}


def spread(times: list[float]) -> str:
    """The median of a figure's times and, when there are several, their range."""
    if len(times) == 1:
        return f"{times[0]:.2f} s"
    return f"{statistics.median(times):.2f} s ({min(times):.2f}-{max(times):.2f})"


def one_chapter_runs(
    work: Path,
    index: int,
    color_pages: int,
    size: tuple[int, int],
    options: PipelineOptions,
    local: bool,
    runs: int,
    warm: bool = False,
) -> list[float]:
    """Wall times of the pipeline over a fresh tree of just the chapter the bench adds: that chapter's own work.
    Unless `warm`, one more run comes first, untimed, to load what the stages import lazily (the renderer's line
    extractor, the encoder), which a run that processed nothing (a kept tree already current) has not loaded yet."""
    corpus, data = work / "one-chapter", work / "one-chapter-data"
    times = []
    for _ in range(runs + (0 if warm else 1)):
        shutil.rmtree(corpus, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
        write_chapter(chapter_folder(corpus, index), index, color_pages, size)
        times.append(timed_run(corpus, data, options, local)[0])
    shutil.rmtree(corpus, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)
    return times if warm else times[1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chapters", type=int, nargs="+", default=[1000, 3000], help="chapter counts (10000 too)")
    parser.add_argument("--size", type=parse_size, default=(64, 96), help="page and training size WxH")
    parser.add_argument("--min-color-pages", type=int, default=3, help="colour pages per chapter (all kept)")
    parser.add_argument("--ray", action="store_true", help="run the stages on a local Ray instead of in-process")
    parser.add_argument(
        "--repeats", type=int, default=3, help="times each rerun is measured; medians are compared (default 3)"
    )
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep and reuse the trees in --work (see above)")
    args = parser.parse_args(argv)
    if args.keep and args.work is None:
        parser.error("--keep needs --work: the folder the trees are kept in")
    counts = sorted(set(args.chapters))
    work = args.work if args.keep else Path(tempfile.mkdtemp(prefix="bench-driver-", dir=args.work))
    work.mkdir(parents=True, exist_ok=True)
    mode = "local Ray" if args.ray else "in-process"
    print(f"pages {args.size[0]}x{args.size[1]}, {args.min_color_pages} colour + 1 B&W per chapter, {mode}")
    results = {}
    try:
        for chapters in counts:
            figures = measure(
                chapters, work, args.size, args.min_color_pages, not args.ray, args.keep, max(1, args.repeats)
            )
            results[chapters] = {k: v if k == "first" else statistics.median(v) for k, v in figures.items()}
            per = {key: 1000 * results[chapters][key] / chapters for key in ("first", "noop", "added", "removed")}
            stages = ", ".join(f"{s} {results[chapters][f'stage_{s}']:.2f} s" for s in STAGES)
            print(
                f"N={chapters}: first run {figures['first']:.1f} s ({per['first']:.1f} ms/chapter); one chapter's "
                f"own work {spread(figures['own'])}; no-op rerun {spread(figures['noop'])} ({per['noop']:.3f} "
                f"ms/chapter); one chapter added {spread(figures['added'])} ({per['added']:.3f} ms/chapter; "
                f"median stages: {stages}); that chapter removed again {spread(figures['removed'])} "
                f"({per['removed']:.3f} ms/chapter)",
                flush=True,
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    small, large = counts[0], counts[-1]
    for key, what in (("noop", "no-op rerun"), ("added", "one chapter added"), ("removed", "one chapter removed")):
        ratio = (results[large][key] / large) / (results[small][key] / small)
        print(f"{what}: per-chapter cost at N={large} / at N={small} (baseline) = {ratio:.2f} (flat = 1.0)")
    noop_per_chapter = results[large]["noop"] / large
    print(
        f"goal, no-op rerun over 10k chapters within {NOOP_GOAL_SECONDS_AT_10K:.0f} s: "
        f"{10_000 * noop_per_chapter:.1f} s projected linearly from N={large}"
    )
    for chapters in counts:  # medians
        figures = results[chapters]
        budget = 2 * figures["noop"] + figures["own"]
        print(
            f"goal, one added chapter within 2 x no-op + its own work at N={chapters}: {figures['added']:.2f} s "
            f"against 2 x {figures['noop']:.2f} + {figures['own']:.2f} = {budget:.2f} s: "
            f"{'met' if figures['added'] <= budget else 'MISSED'}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
