"""What the screentone stage's line-art variants (sketch, shading, hires_sketch; sample format 3) cost per frame,
against the tone it already renders (train + hires halftone), in one run.

Pages of the generated "small" corpus at 1.5x scale (576 x 816). The baseline is the stage before format 3:
`pipelines.screentone.stage.render_frames` without a line extractor (decode, fit, halftone at both sizes, PNG). The
line art is what the stage adds per frame, timed on its own: decode, `pipelines.core.page_styles.pages_line_art`
with the weight-free XDoG extractor, `pipelines.core.samples.encode_line_art`. Timed in CPU seconds of this one
process on one thread (core-seconds per frame, which a busy shared machine distorts less than wall clock); the
ratio is line art / tone. Also prints the PNG bytes per line-art member.

Run: ``.venv/bin/python bench/bench_line_art.py [--size 512x800] [--frames 24] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from jobs.common import parse_size
from model.line_extractor import LineExtractor
from pipelines.core.page_styles import pages_line_art
from pipelines.core.pagestore import decode_page
from pipelines.core.samples import LINE_ART_VARIANTS, encode_line_art
from pipelines.sample_corpus.generate import generate_corpus
from pipelines.screentone.stage import ScreentoneOptions, render_frames
from screentone.render import HalftoneRenderer


def _decodes(data: bytes) -> bool:
    """The corpus holds deliberately broken pages: time the ones the stage renders."""
    try:
        decode_page(data)
    except Exception:  # noqa: BLE001 - any decoder failure means the stage would make an error row
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=(512, 800))
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        generate_corpus(Path(work) / "corpus", preset="small", seed=0, scale=1.5)
        files = sorted(p for p in Path(work, "corpus").rglob("*") if p.suffix in (".png", ".jpg"))
        pages = {f"f{i:03d}": path.read_bytes() for i, path in enumerate(files) if _decodes(path.read_bytes())}
        pages = dict(list(pages.items())[: args.frames])
    options = ScreentoneOptions(width=args.size[0], height=args.size[1])
    renderer, lines = HalftoneRenderer(), LineExtractor()
    made, _ = render_frames(dict(list(pages.items())[:8]), options, renderer, lines)  # also the warm-up

    def tone_per_frame() -> float:
        started = time.process_time()
        render_frames(pages, options, renderer)
        return (time.process_time() - started) / len(pages)

    def line_art_per_frame() -> float:
        started = time.process_time()
        decoded = [decode_page(data) for data in pages.values()]
        for frames in pages_line_art(decoded, *options.sizes.values(), lines.many):
            encode_line_art(frames)
        return (time.process_time() - started) / len(pages)

    tone, line_art = [], []
    for _ in range(args.repeat):  # interleaved, so a busy spell hits both
        tone.append(tone_per_frame())
        line_art.append(line_art_per_frame())
    tone_s, line_s = statistics.median(tone), statistics.median(line_art)
    sizes = {v: statistics.mean(len(m[v]) for m in made.values()) / 1e3 for v in LINE_ART_VARIANTS.values()}
    size, hires = options.sizes.values()
    print(f"{len(pages)} frames at {size[0]}x{size[1]} (GSRP {hires[0]}x{hires[1]}), CPU seconds per frame")
    print(f"tone (train + hires halftone): {tone_s:.3f} core-s/frame (baseline)")
    print(f"line art (XDoG; sketch, shading, hires_sketch): {line_s:.3f} core-s/frame, ratio {line_s / tone_s:.2f}")
    print("line-art PNG kB per frame: " + ", ".join(f"{v} {kb:.1f}" for v, kb in sizes.items()))


if __name__ == "__main__":
    main()
