"""Small separable image filters in numpy, so the weight-free halftone renderer needs no torch.

All filters take float or integer 2-D arrays (H x W) and keep the shape; borders are handled by edge replication,
which keeps flat regions flat up to the page edge (zero padding would draw a dark frame).
"""

from __future__ import annotations

import math

import numpy as np


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps covering +-3 sigma."""
    if sigma <= 0:
        raise ValueError(f"gaussian sigma must be > 0, got {sigma}")
    radius = max(1, math.ceil(3.0 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _shifted(padded: np.ndarray, axis: int, offset: int, length: int) -> np.ndarray:
    """The window [offset, offset + length) of a padded 2-D array along one axis (a view, no copy)."""
    return padded[offset : offset + length] if axis == 0 else padded[:, offset : offset + length]


def _pad_axis(image: np.ndarray, axis: int, radius: int) -> np.ndarray:
    return np.pad(image, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="edge")


def _correlate_axis(image: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    radius = len(taps) // 2
    padded = _pad_axis(image, axis, radius)
    length = image.shape[axis]
    out = np.zeros(image.shape, dtype=np.float32)
    for offset, weight in enumerate(taps):
        out += weight * _shifted(padded, axis, offset, length)
    return out


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an H x W array; returns float32."""
    taps = gaussian_kernel(sigma)
    image = _as_2d(image).astype(np.float32, copy=False)
    return _correlate_axis(_correlate_axis(image, taps, 0), taps, 1)


def min_filter(image: np.ndarray, size: int = 3) -> np.ndarray:
    """Grey-level erosion with a size x size square: dark strokes on a light page grow by (size-1)/2 px."""
    return _rank_filter(image, size, np.minimum)


def _rank_filter(image: np.ndarray, size: int, pick) -> np.ndarray:
    if size < 1 or size % 2 == 0:
        raise ValueError(f"filter size must be a positive odd number, got {size}")
    radius = size // 2
    out = _as_2d(image)
    for axis in (0, 1):
        padded = _pad_axis(out, axis, radius)
        length = out.shape[axis]
        result = _shifted(padded, axis, 0, length).copy()
        for offset in range(1, size):
            pick(result, _shifted(padded, axis, offset, length), out=result)
        out = result
    return out


def _as_2d(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"expected a single-channel H x W array, got shape {image.shape}")
    return image


def box_count(mask: np.ndarray, radius: int) -> np.ndarray:
    """Number of true pixels in the (2r+1) x (2r+1) window around each pixel (edge-replicated), as int32.

    Separable running sums in integers: exact, and cheaper than a 2-D summed-area table in floats.
    """
    size = 2 * radius + 1
    counts = np.pad(_as_2d(mask).astype(np.int32), radius, mode="edge")
    for axis in (0, 1):
        running = np.cumsum(counts, axis=axis, dtype=np.int32)
        zero = np.zeros_like(running[:1]) if axis == 0 else np.zeros_like(running[:, :1])
        running = np.concatenate([zero, running], axis=axis)
        length = running.shape[axis] - size
        counts = _shifted(running, axis, size, length) - _shifted(running, axis, 0, length)
    return counts


def mode_filter(labels: np.ndarray, radius: int) -> np.ndarray:
    """Replace each label by the most frequent label in its window: removes speckle and thin bands at edges.

    Ties keep the smaller label value, so the result is deterministic.
    """
    values = np.unique(labels)
    if len(values) <= 1 or radius == 0:
        return labels.copy()
    best = np.full(labels.shape, -1, dtype=np.int32)
    out = np.empty_like(labels)
    for value in values:
        counts = box_count(labels == value, radius)
        better = counts > best
        out[better] = value
        best[better] = counts[better]
    return out
