"""PSNR, SSIM and CLIP image similarity of a prediction against its ground truth: the benchmark's per-page metrics.

One implementation for `jobs.evaluate` (`evaluation.scoring`) and the trainer's benchmark validation, so a value
logged while training is the value the evaluator gives for the same images.

- PSNR and SSIM: torchmetrics' functional metrics on RGB images as tensors in [0, 255] with ``data_range=255``
  (SSIM: Gaussian window 11, sigma 1.5, averaged over channels), in float64 (SSIM: float32 on request, see
  `ssim`). Identical images have an infinite PSNR (``float("inf")``; tables and JSON write it as ``"inf"``).
- CLIP image similarity (CLIP-IS): cosine between the embeddings of prediction and ground truth by an encoder of
  `pipelines.core.encoders` (the spec strings of ``jobs.retrieval --encoder``).

torch is imported inside the functions: `pipelines.core` loads without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipelines.core.encoders import load_encoder, resolve_encoder

if TYPE_CHECKING:
    import torch

DATA_RANGE = 255.0
SSIM_PRECISIONS = ("float32", "float64")  # torch dtype names


def _as_batch(image: np.ndarray, dtype: str = "float64", device: str = "cpu") -> torch.Tensor:
    """An H x W x 3 uint8 array -> (1, 3, H, W) tensor in [0, 255]."""
    import torch

    tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).to(device).permute(2, 0, 1)[None]
    return tensor.to(getattr(torch, dtype))


def psnr(prediction: np.ndarray, truth: np.ndarray) -> float:
    """PSNR in dB of two H x W x 3 uint8 images of one size, in float64; ``inf`` when they are identical."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(_as_batch(prediction), _as_batch(truth), data_range=DATA_RANGE))


def ssim(prediction: np.ndarray, truth: np.ndarray, precision: str = "float64", device: str = "cpu") -> float:
    """SSIM of two H x W x 3 uint8 images of one size (1.0 when identical in float64).

    float64 by default: SSIM's variances are differences of large means (E[x^2] - E[x]^2), and in float32 two
    identical pages with flat areas score 0.9998 and others are off by ~2e-4. float32 is ~30x faster on a CPU
    (PyTorch has no fast float64 convolution there); on CUDA float64 is cheap.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    if precision not in SSIM_PRECISIONS:
        raise ValueError(f"ssim precision {precision!r}: expected one of {list(SSIM_PRECISIONS)}")
    pair = (_as_batch(prediction, precision, device), _as_batch(truth, precision, device))
    return float(structural_similarity_index_measure(*pair, data_range=DATA_RANGE))


class ImageEmbedder:
    """L2-normalised image embeddings by an encoder spec of `pipelines.core.encoders` (the spec is kept for tables)."""

    def __init__(self, spec: str, device: str = "cpu") -> None:
        self.info = resolve_encoder(spec)
        self.spec = self.info.spec
        self.prepare = self.info.preparer()
        self.encoder = load_encoder(self.info, device)

    @property
    def dim(self) -> int:
        return self.info.dim

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        vectors = self.encoder.embed(np.stack([self.prepare(image) for image in images])).astype(np.float64)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two vectors."""
    return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def clip_image_similarity(embedder: ImageEmbedder, prediction: Image.Image, truth: Image.Image) -> float:
    """CLIP-IS of one page: the cosine of the embeddings of its ground truth and its prediction."""
    embeddings = embedder.embed([truth, prediction])
    return cosine(embeddings[0], embeddings[1])
