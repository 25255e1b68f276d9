"""Pages/s of `jobs.evaluate` at the benchmark size (768x1200), per metric set, against a baseline from the same run.

Baseline: PSNR + SSIM in float32 (the least a run computes); then SSIM in float64 (the default), FID with
torch-fidelity's Inception-v3 (random weights of the real layout: speed does not depend on the values), CLIP-IS
with an encoder spec (default ``weightfree``; pass ``--clip-encoder open_clip:ViT-L-14:<checkpoint>`` to time a
real one), and all of them with an aesthetic head. Rates are per-page scoring (decoding, metrics, features) with
the networks loaded and after one warm-up page. Two one-off costs are timed apart: one FID distance at 2048-d
(the eigenvalues of a 2048 x 2048 product, once per FID row) and the whole job end to end (loading, scoring,
tables, grids, the overall FID). The device is CUDA when available.
Run: ``.venv/bin/python bench/bench_evaluate.py [--pages N]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from evaluation.metrics import frechet_distance
from evaluation.scoring import EvaluateOptions, collect_pairs, load_scorers, run_evaluate, score_page
from pipelines.core.encoders import resolve_encoder
from screentone.synthetic import synthetic_color_page


def write_pages(root: Path, count: int, width: int, height: int) -> tuple[Path, Path]:
    """truth/<page>.png (synthetic colour pages) and pred/<page>.png (blurred, noisy copies)."""
    truth, pred = root / "truth", root / "pred"
    truth.mkdir(parents=True)
    pred.mkdir(parents=True)
    for seed in range(count):
        page = Image.fromarray(synthetic_color_page(height, width, seed))
        page.save(truth / f"page{seed:03d}.png")
        blurred = np.asarray(page.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64)
        noisy = blurred + np.random.default_rng(seed).normal(0, 6, blurred.shape)
        Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8)).save(pred / f"page{seed:03d}.png")
    return truth, pred


def random_inception_weights(path: Path) -> Path:
    """A weights file of torch-fidelity's Inception-v3 layout with its random initialisation."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ARG002
            return None

    empty = path.with_name("empty.pth")
    torch.save({}, empty)
    torch.manual_seed(0)
    torch.save(Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)).state_dict(), path)
    return path


def aesthetic_head(path: Path, dim: int) -> Path:
    """A LAION-shaped head (dim -> 1024 -> 128 -> 64 -> 16 -> 1) with random weights."""
    torch.manual_seed(0)
    sizes = [dim, 1024, 128, 64, 16, 1]
    layers = [torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False)]
    state = {f"layers.{2 * i}.{k}": v for i, layer in enumerate(layers) for k, v in layer.state_dict().items()}
    torch.save(state, path)
    return path


def pages_per_second(pairs: list, options: EvaluateOptions, device: str) -> float:
    """Scoring rate of one metric set, its networks already loaded (loading is a one-off, timed apart)."""
    scorers = load_scorers(options, device)
    score_page(pairs[0], scorers, None)  # warm-up: kernel selection, lazy tables
    start = time.perf_counter()
    for pair in pairs:
        assert score_page(pair, scorers, None).status == "ok"
    return len(pairs) / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=4, help="pages scored per configuration")
    parser.add_argument("--size", default="768x1200", help="page size WxH (default: the benchmark's)")
    parser.add_argument("--clip-encoder", default="weightfree", help="encoder spec for CLIP-IS and the head")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        truth, pred = write_pages(root, args.pages, width, height)
        pairs = collect_pairs(pred, truth, root / "out").pairs
        weights = random_inception_weights(root / "inception.pth")
        head = aesthetic_head(root / "head.pth", resolve_encoder(args.clip_encoder).dim)
        fast = {"ssim_precision": "float32"}
        networks = {
            "inception_weights": str(weights),
            "clip_encoder": args.clip_encoder,
            "aesthetic_predictor": str(head),
        }
        configurations = {
            "baseline PSNR+SSIM(float32)": EvaluateOptions(**fast),
            "PSNR+SSIM(float64, default)": EvaluateOptions(),
            "+ FID features (Inception-v3)": EvaluateOptions(inception_weights=str(weights), **fast),
            f"+ CLIP-IS ({args.clip_encoder})": EvaluateOptions(clip_encoder=args.clip_encoder, **fast),
            "all five metrics, SSIM float32": EvaluateOptions(**networks, **fast),
            "all five metrics, SSIM float64": EvaluateOptions(**networks),
        }
        print(f"{args.pages} pages of {width}x{height}, device {device}, torch threads {torch.get_num_threads()}")
        baseline = None
        for name, options in configurations.items():
            rate = pages_per_second(pairs, options, device)
            baseline = baseline or rate
            print(f"{name:34s} {rate:7.3f} pages/s   x{rate / baseline:.2f} of baseline", flush=True)

        features = np.random.default_rng(0).normal(size=(2, 50, 2048))
        start = time.perf_counter()
        frechet_distance(features[0], features[1], device)
        seconds = time.perf_counter() - start
        label = "one FID distance, 2048-d, 50 pages"
        print(f"{label:34s} {seconds:7.1f} s         = {seconds * baseline:.0f} baseline pages")

        start = time.perf_counter()
        run_evaluate(pred, truth, EvaluateOptions(output=str(root / "job"), **networks))
        seconds = time.perf_counter() - start
        rate = args.pages / seconds
        print(f"{'whole job, all five metrics':34s} {rate:7.3f} pages/s   x{rate / baseline:.2f} of baseline")


if __name__ == "__main__":
    main()
