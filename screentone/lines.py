"""Weight-free line extraction (XDoG) and line-map helpers.

Line maps use the ScreenStyle convention: uint8 H x W, 255 = paper, 0 = ink. ScreenStyle's colour-to-tone path
wants a line map beside the colour page; its original uses a line-extraction network, ColorFlow feeds the
greyscale page instead, and this module gives a deterministic, weight-free alternative.

XDoG (Winnemoeller et al. 2012): the difference of two Gaussians ``G_sigma - tau * G_{k sigma}`` is slightly
positive on flat or slowly varying areas and clearly negative on the dark side of strokes and of steps between
regions; a soft threshold ``1 + tanh(phi * (D - epsilon))`` turns it into near-binary ink.

The Gaussians and the erosion are `scipy.ndimage`'s (compiled, several times faster than numpy loops on a page):
edge replication (`mode="nearest"`) and a kernel radius of ceil(3 sigma), the taps `screentone.filters` uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from screentone.augment import to_grey

XDOG = "xdog"  # the id of this extractor wherever data records what made its line art


@dataclass(frozen=True)
class XDoGConfig:
    """XDoG settings in pixel units of the page they are applied to.

    sigma: scale of the fine Gaussian (about half the stroke width kept); k: ratio of the coarse one.
    tau: weight of the coarse Gaussian (< 1 keeps flat areas white). epsilon: threshold on the DoG response
    (more negative = fewer, stronger lines). phi: steepness of the soft threshold.
    """

    sigma: float = 0.9
    k: float = 1.6
    tau: float = 0.98
    epsilon: float = -0.03
    phi: float = 60.0

    def __post_init__(self) -> None:
        if self.sigma <= 0 or self.k <= 1 or not 0 < self.tau <= 1 or self.phi <= 0:
            raise ValueError(f"invalid XDoG parameters {self}: need sigma > 0, k > 1, 0 < tau <= 1, phi > 0")


def xdog(grey: np.ndarray, params: XDoGConfig = XDoGConfig()) -> np.ndarray:
    """Soft XDoG line response of a uint8 grey page: float32 H x W in [0, 1], 1 = paper, 0 = ink."""
    image = np.asarray(grey)
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"xdog expects a uint8 H x W grey page, got {image.dtype} {image.shape}")
    luma = image.astype(np.float32) / 255.0
    fine = _gaussian(luma, params.sigma)
    coarse = _gaussian(luma, params.sigma * params.k)
    response = fine - params.tau * coarse
    soft = 1.0 + np.tanh(params.phi * (response - params.epsilon))
    return np.where(response >= params.epsilon, 1.0, soft).astype(np.float32)


def _gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over +-ceil(3 sigma) taps (at least 1), edges replicated; float32."""
    radius = max(1, math.ceil(3.0 * sigma))
    return ndimage.gaussian_filter(image, sigma, mode="nearest", radius=radius).astype(np.float32, copy=False)


def extract_lines(page: np.ndarray, params: XDoGConfig = XDoGConfig(), solid_black: int = 50) -> np.ndarray:
    """Binary line map (uint8, 0 = ink, 255 = paper) of an RGB or grey uint8 page.

    XDoG only marks strokes and region borders; pixels darker than ``solid_black`` (luma 0-255) are ink too,
    so solid black fills (hair, shadows) stay black as in inked line art.
    """
    grey = to_grey(page)
    ink = (xdog(grey, params) < 0.5) | (grey < solid_black)
    return np.where(ink, 0, 255).astype(np.uint8)


def erode_lines(line_map: np.ndarray, size: int = 3) -> np.ndarray:
    """Thicken dark strokes with a size x size grey-level erosion (ScreenStyle erodes its line map 3x3)."""
    line_map = np.asarray(line_map)
    if line_map.dtype != np.uint8 or line_map.ndim != 2:
        raise ValueError(f"erode_lines expects a uint8 H x W line map, got {line_map.dtype} {line_map.shape}")
    if size < 1 or size % 2 == 0:
        raise ValueError(f"erode_lines size must be a positive odd number, got {size}")
    return ndimage.minimum_filter(line_map, size=size, mode="nearest")
