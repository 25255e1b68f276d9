"""What the screentone stage's line-art variants (sketch, shading, hires_sketch; sample format 3) cost per frame,
against the tone it already renders (train + hires halftone), in one run.

Pages of the generated "small" corpus at 1.5x scale (576 x 816) go through `pipelines.screentone.stage.render_frames`
twice: tone only (the baseline: the stage before format 3) and tone plus line art with the weight-free XDoG
extractor. Timed in CPU seconds of this one process (core-seconds per frame, which a busy shared machine distorts
less than wall clock); the ratio is line art / tone. Also prints the PNG bytes per line-art member.

Run: ``.venv/bin/python bench/bench_line_art.py [--size 512x800] [--frames 24] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from jobs.common import parse_size
from model.line_extractor import LineExtractor
from pipelines.core.samples import LINE_ART_VARIANTS
from pipelines.sample_corpus.generate import generate_corpus
from pipelines.screentone.stage import ScreentoneOptions, render_frames
from screentone.render import HalftoneRenderer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=(512, 800))
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        generate_corpus(Path(work) / "corpus", preset="small", seed=0, scale=1.5)
        files = sorted(Path(work, "corpus").rglob("*.png"))[: args.frames]
        pages = {f"f{i:03d}": path.read_bytes() for i, path in enumerate(files)}
    options = ScreentoneOptions(width=args.size[0], height=args.size[1])
    renderer, lines = HalftoneRenderer(), LineExtractor()
    render_frames(dict(list(pages.items())[:2]), options, renderer, lines)  # warm-up

    def per_frame(with_lines: bool) -> float:
        started = time.process_time()
        render_frames(pages, options, renderer, lines if with_lines else None)
        return (time.process_time() - started) / len(pages)

    tone, both = [], []
    for _ in range(args.repeat):  # interleaved, so a busy spell hits both
        tone.append(per_frame(False))
        both.append(per_frame(True))
    tone_s, line_s = statistics.median(tone), statistics.median(both) - statistics.median(tone)
    made, _ = render_frames(dict(list(pages.items())[:8]), options, renderer, lines)
    sizes = {v: statistics.mean(len(m[v]) for m in made.values()) / 1e3 for v in LINE_ART_VARIANTS.values()}
    print(
        f"{len(pages)} frames at {args.size[0]}x{args.size[1]} (GSRP {options.sizes['hires']}), CPU seconds per frame"
    )
    print(f"tone (train + hires halftone): {tone_s:.3f} core-s/frame (baseline)")
    print(f"line art (XDoG; sketch, shading, hires_sketch): {line_s:.3f} core-s/frame, ratio {line_s / tone_s:.2f}")
    print("line-art PNG kB per frame: " + ", ".join(f"{v} {kb:.1f}" for v, kb in sizes.items()))


if __name__ == "__main__":
    main()
