"""The screenstyle augmentation: greyscale conversion and grey/screentone interpolation.

The paper trains on inputs interpolated between the greyscale page and its screentone rendering (its Fig. 4
shows tone weights 0.33 and 0.66); the released preprocessing blends 50/50. Here ``alpha`` is the weight of the
tone: 0 gives the greyscale page, 1 the pure screentone. Training draws alpha per sample and epoch (`sample_alpha`);
evaluation uses the fixed `EVAL_ALPHAS`.

`to_grey` is the project's single greyscale conversion (ITU-R 601 luma, bit-identical to Pillow's
``convert("L")``), so every stage (ingestion, retrieval, augmentation, evaluation) sees the same grey values.
"""

from __future__ import annotations

import hashlib

import numpy as np

EVAL_ALPHAS: tuple[float, ...] = (0.33, 0.5, 0.66)

# Pillow's fixed-point ITU-R 601 weights (299/587/114 per mille scaled by 2**16) and its rounding.
_LUMA_R, _LUMA_G, _LUMA_B, _LUMA_ROUND = 19595, 38470, 7471, 0x8000


def to_grey(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an H x W x 3 uint8 RGB image as H x W uint8; an H x W input is returned as a copy."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"to_grey expects uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        return image.copy()
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"to_grey expects an H x W x 3 RGB or H x W grey image, got shape {image.shape}")
    rgb = image.astype(np.uint32)
    luma = rgb[..., 0] * _LUMA_R + rgb[..., 1] * _LUMA_G + rgb[..., 2] * _LUMA_B + _LUMA_ROUND
    return (luma >> 16).astype(np.uint8)


def blend(grey: np.ndarray, tone: np.ndarray, alpha: float) -> np.ndarray:
    """Linear interpolation ``(1 - alpha) * grey + alpha * tone``, rounded to uint8 (alpha = tone weight)."""
    grey = np.asarray(grey)
    tone = np.asarray(tone)
    if grey.shape != tone.shape:
        raise ValueError(
            f"blend needs the grey page and its screentone at the same resolution, got {grey.shape} and "
            f"{tone.shape} (screentone is rendered at the size it is used at, never resampled)"
        )
    if grey.dtype != np.uint8 or tone.dtype != np.uint8:
        raise TypeError(f"blend expects uint8 images, got {grey.dtype} and {tone.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"blend alpha must lie in [0, 1], got {alpha}")
    mixed = (1.0 - alpha) * grey.astype(np.float32) + alpha * tone.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def sample_alpha(seed: int, epoch: int, key: str, low: float = 0.0, high: float = 1.0) -> float:
    """The project's one training alpha: uniform in [low, high], fixed by (seed, epoch, sample key).

    Every consumer (shard reports, the ICP and GSRP data streams) calls this, so a sample gets a new alpha each
    epoch, the same one on a rerun or a resumed run, whatever worker or rank reads it.
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"alpha range must satisfy 0 <= low <= high <= 1, got [{low}, {high}]")
    digest = hashlib.sha256(f"alpha\x1f{seed}\x1f{epoch}\x1f{key}".encode()).digest()
    unit = (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)
    return low + (high - low) * unit
