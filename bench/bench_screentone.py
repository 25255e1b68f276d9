"""Pages/s of the screentone renderers, and of ScreenStyle by batch size and dtype, on the device it runs on.

Part 1 (CPU): the weight-free halftone and ScreenStyle one page at a time against a baseline of Pillow greyscale
plus a PNG encode of the same colour page (the least any screentone stage does per page).
Part 2 (CUDA when present, else CPU): ScreenStyle's ``render_batch`` by batch size and dtype against the
per-page float32 rate measured in the same run, with the largest difference (grey levels) to the per-page
float32 tones and the hours 300k frames take at that rate. Random weights in eval mode: speed does not depend
on the weight values. Run: ``.venv/bin/python bench/bench_screentone.py [--sizes 512x800,768x1200] [--pages N]``.
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from screentone.color2manga import ColorToScreenMapGenerator
from screentone.loader import ScreenStyleModels
from screentone.render import HalftoneRenderer, ScreenStyleRenderer
from screentone.screenvae import ScreenVAEDecoder
from screentone.synthetic import synthetic_color_page

FRAMES = 300_000  # frames of a training corpus, for the hours column


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


def batched_rate(
    renderer: ScreenStyleRenderer, pages: list[np.ndarray], batch_size: int
) -> tuple[float, list[np.ndarray]]:
    seeds = list(range(len(pages)))
    renderer.render_batch(pages[:batch_size], seeds[:batch_size], batch_size)  # warm-up (cuDNN autotune, caches)
    start = time.perf_counter()
    tones = renderer.render_batch(pages, seeds, batch_size)  # returns host arrays: the device has finished
    return len(pages) / (time.perf_counter() - start), tones


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def main(argv: Sequence[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512x800", help="comma-separated W x H page sizes")
    parser.add_argument("--pages", type=int, default=32 if cuda else 4, help="timed pages per configuration")
    parser.add_argument("--batch-sizes", default="1,8,16" if cuda else "1,2,4")
    parser.add_argument("--dtypes", default="float32,bfloat16" if cuda else "float32")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--skip-cpu-renderers", action="store_true", help="only part 2")
    args = parser.parse_args(argv)
    sizes = [_size(s) for s in args.sizes.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    dtypes = args.dtypes.split(",")

    torch.manual_seed(0)
    models = ScreenStyleModels(ColorToScreenMapGenerator(), ScreenVAEDecoder())
    if not args.skip_cpu_renderers:
        per_page = ScreenStyleRenderer(models, device="cpu", max_pixels=None)
        renderers = {"baseline grey+png": _grey_png, "halftone": HalftoneRenderer().render, "screenstyle": None}
        print(f"part 1: renderers on CPU, torch threads {torch.get_num_threads()}, {args.pages} pages each")
        print(f"{'size':>10}  {'renderer':<20} {'pages/s':>9} {'s/page':>8} {'vs baseline':>12}")
        for width, height in sizes:
            pages = [synthetic_color_page(height, width, seed=s) for s in range(args.pages)]
            baseline = None
            for name, work in renderers.items():
                rate = pages_per_second(work or per_page.render, pages)
                baseline = baseline or rate
                print(f"{f'{width}x{height}':>10}  {name:<20} {rate:9.3f} {1 / rate:8.3f} {rate / baseline:11.4f}x")

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"\npart 2: ScreenStyle render_batch on {name}, {args.pages} pages per configuration (random weights)")
    print(
        f"{'size':>10} {'dtype':>9} {'batch':>5} {'pages/s':>9} {'vs per-page fp32':>17} {'max diff':>9} "
        f"{'>2 levels':>10} {f'h/{FRAMES // 1000}k':>8}"
    )
    for width, height in sizes:
        pages = [synthetic_color_page(height, width, seed=s) for s in range(args.pages)]
        reference_rate, reference = None, None
        for dtype in dtypes:
            renderer = ScreenStyleRenderer(models, device=device, dtype=dtype, max_pixels=None)
            for batch_size in batch_sizes:
                rate, tones = batched_rate(renderer, pages, batch_size)
                if reference is None:  # the first configuration (float32, batch 1) is the per-page baseline
                    reference_rate, reference = rate, tones
                diffs = [np.abs(a.astype(int) - b.astype(int)) for a, b in zip(tones, reference, strict=True)]
                worst = max(int(d.max()) for d in diffs)
                over = 100 * float(np.mean([(d > 2).mean() for d in diffs]))
                hours = FRAMES / rate / 3600
                ratio = rate / reference_rate
                print(
                    f"{f'{width}x{height}':>10} {dtype:>9} {batch_size:>5} {rate:9.3f} {ratio:16.2f}x "
                    f"{worst:9d} {over:9.3f}% {hours:8.1f}"
                )
            del renderer
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
