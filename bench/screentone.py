"""Pages/s of the screentone renderers on CPU at 512x800 and 1024x1600, against a baseline from the same run.

Baseline: Pillow greyscale conversion of the same colour page plus a PNG encode of the result (the least any
screentone stage does per page). The ScreenStyle renderer uses random weights in eval mode: speed does not
depend on the weight values. Run: ``.venv/bin/python bench/screentone.py [--pages N]``.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# This script shares its name with the package: take bench/ off the import path so `screentone` is the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from screentone.color2manga import ColorToScreenMapGenerator  # noqa: E402
from screentone.loader import ScreenStyleModels  # noqa: E402
from screentone.render import HalftoneRenderer, ScreenStyleRenderer  # noqa: E402
from screentone.screenvae import ScreenVAEDecoder  # noqa: E402
from screentone.synthetic import synthetic_colour_page  # noqa: E402

SIZES = ((512, 800), (1024, 1600))  # width x height


def _grey_png(page: np.ndarray, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(page).convert("L").save(buffer, format="PNG")
    return buffer.getvalue()


def pages_per_second(work: Callable[[np.ndarray, int], object], pages: Sequence[np.ndarray]) -> float:
    work(pages[0], 0)  # warm-up: allocator, oneDNN kernel selection, lazy tables
    start = time.perf_counter()
    for seed, page in enumerate(pages):
        work(page, seed)
    return len(pages) / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=3, help="timed pages per renderer and size")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    screenstyle = ScreenStyleRenderer(
        ScreenStyleModels(ColorToScreenMapGenerator(), ScreenVAEDecoder()), device="cpu", max_pixels=None
    )
    renderers: dict[str, Callable[[np.ndarray, int], object]] = {
        "baseline grey+png": _grey_png,
        "halftone": HalftoneRenderer().render,
        "screenstyle (random weights)": screenstyle.render,
    }
    print(f"screentone renderers on CPU, torch threads {torch.get_num_threads()}, {args.pages} pages each")
    print(f"{'size':>10}  {'renderer':<30} {'pages/s':>9} {'s/page':>8} {'vs baseline':>12}")
    for width, height in SIZES:
        pages = [synthetic_colour_page(height, width, seed=s) for s in range(args.pages)]
        baseline = None
        for name, work in renderers.items():
            rate = pages_per_second(work, pages)
            baseline = baseline or rate
            print(f"{f'{width}x{height}':>10}  {name:<30} {rate:9.3f} {1 / rate:8.3f} {rate / baseline:11.4f}x")


if __name__ == "__main__":
    main()
