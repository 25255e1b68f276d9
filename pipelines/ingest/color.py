"""Colour page or black-and-white page? Pure functions on a small RGB array (numpy only, no Ray).

The recipe (see the README and colorflow-notes): work in CIE Lab on a reduced decode; white-balance on the
paper (the median colour of the brightest pixels), so a uniformly yellowed or sepia scan becomes grey; ignore
very dark pixels (no reliable hue); keep only solid chromatic areas (a binary erosion removes the one- or two-pixel
colour fringes that JPEG 4:2:0 subsampling and scanner misregistration paint along black lines, and isolated
chroma noise); then call a page colour only if enough of it is solidly chromatic AND either a second hue family
is present or a large area is vivid (a single tint, such as sepia, duotone or a tinted scan, is not a colour page).

`page_features` measures; `classify_features` decides from the measurements alone, so a new threshold can be
applied to the stored feature columns of the pages table without decoding a single page again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.core.schemas import COLOR_FEATURE_FIELDS

FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in COLOR_FEATURE_FIELDS)
HUE_BINS = 12  # 30-degree hue sectors for `hue_bins`
HUE_BIN_SHARE = 0.05  # a sector counts when it holds this share of the chromatic pixels
FINE_HUE_BINS = 72  # 5-degree bins for finding the dominant hue arc
DOMINANT_ARC_DEGREES = 60.0  # a single tint spreads less than this; two colours are farther apart
CHROMA_HISTOGRAM_BINS = 512  # 0.5-unit chroma bins up to 256 (Lab chroma of sRGB stays below ~134)


@dataclass(frozen=True)
class FeatureConfig:
    """How features are measured. Changing these needs a new decode; they are recorded in the run summary."""

    dark_l: float = 22.0  # L* below which a pixel is too dark to carry a hue
    chroma_min: float = 10.0  # paper-corrected chroma (Lab units) of a clearly chromatic pixel
    erosion: int = 2  # a chromatic pixel counts only if its neighbours this many steps away are chromatic too
    hue_erosion: int = 1  # lighter erosion for the hue measures, so small second colours (a face, a sleeve) count
    vivid_chroma: float = 30.0  # chroma no paper tint reaches: a large vivid area is colour even in one hue family
    paper_quantile: float = 0.9  # pixels at least this bright (by luminance rank) define the paper colour
    max_paper_chroma: float = 30.0  # a brighter tint is content (a coloured backdrop), not paper: kept as is


@dataclass(frozen=True)
class ColorThresholds:
    """The decision, re-cuttable from stored features: colour iff color_score >= threshold.

    color_score = min(chromatic_fraction / min_chromatic_fraction,
                      max(secondary_hue_share / min_secondary_hue_share, vivid_fraction / min_vivid_fraction)):
    enough solid colour AND (a second hue family OR a large vivid area no paper tint could produce). A score of
    1 meets the requirements exactly.
    """

    min_chromatic_fraction: float = 0.0005
    min_secondary_hue_share: float = 0.01
    min_vivid_fraction: float = 0.05
    threshold: float = 1.0


# sRGB -> linear light, per 8-bit code value.
_codes = np.arange(256, dtype=np.float64) / 255.0
_SRGB_TO_LINEAR = np.where(_codes <= 0.04045, _codes / 12.92, ((_codes + 0.055) / 1.055) ** 2.4).astype(np.float32)
# Linear sRGB -> XYZ (D65), each row divided by the white point so that white maps to (1, 1, 1).
_RGB_TO_XYZ_D65 = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_RGB_TO_XYZ_N = (_RGB_TO_XYZ_D65 / _WHITE_D65[:, None]).astype(np.float32)
_LUMINANCE = _RGB_TO_XYZ_D65[1].astype(np.float32)
_DELTA = 6.0 / 29.0


def _lab_f(t: np.ndarray) -> np.ndarray:
    out = np.cbrt(t)
    small = t <= _DELTA**3  # the linear toe: only near-black values, so fix them up in place
    if small.any():
        out[small] = t[small] / (3 * _DELTA**2) + 4.0 / 29.0
    return out


def _lab_from_linear_channels(red: np.ndarray, green: np.ndarray, blue: np.ndarray) -> tuple[np.ndarray, ...]:
    """Linear sRGB channel planes in [0, 1] -> (L*, a*, b*) planes (D65). Planes, not (N, 3): far faster."""
    m = _RGB_TO_XYZ_N
    fx = _lab_f(m[0, 0] * red + m[0, 1] * green + m[0, 2] * blue)
    fy = _lab_f(m[1, 0] * red + m[1, 1] * green + m[1, 2] * blue)
    fz = _lab_f(m[2, 0] * red + m[2, 1] * green + m[2, 2] * blue)
    return 116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 sRGB -> (..., 3) float32 CIE Lab (D65)."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    planes = [_SRGB_TO_LINEAR[rgb[..., c]].astype(np.float32) for c in range(3)]
    return np.stack(_lab_from_linear_channels(*planes), axis=-1).astype(np.float32)


def erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary erosion with a 4-neighbour cross, `steps` times: removes regions thinner than 2*steps+1 pixels.

    Chroma fringes along black lines (JPEG 4:2:0, scanner misregistration) and isolated chroma noise are one or
    two pixels wide at analysis scale; real colour areas (hair, clothes, skies) are much wider.
    """
    out = mask
    for _ in range(steps):
        source = out
        out = source.copy()
        out[1:, :] &= source[:-1, :]
        out[:-1, :] &= source[1:, :]
        out[:, 1:] &= source[:, :-1]
        out[:, :-1] &= source[:, 1:]
        out[0, :] = out[-1, :] = False
        out[:, 0] = out[:, -1] = False
    return out


def _hue_measures(a: np.ndarray, b: np.ndarray, chroma: np.ndarray) -> tuple[float, float, int]:
    """(circular hue spread, share of pixels outside the dominant hue arc, 30-degree sectors in use).

    The dominant arc is the DOMINANT_ARC_DEGREES-wide arc holding the most chromatic pixels: one tint (sepia, a
    duotone print, a tinted scan) fits inside it whatever its exact hue; a second colour lands outside.
    """
    resultant = np.hypot(float(np.mean(a / chroma)), float(np.mean(b / chroma)))
    hue_fraction = (np.arctan2(b, a) + np.pi) / (2 * np.pi)  # 0..1 around the circle
    fine = np.bincount((hue_fraction * FINE_HUE_BINS).astype(np.int64) % FINE_HUE_BINS, minlength=FINE_HUE_BINS)
    arc_bins = round(DOMINANT_ARC_DEGREES / (360.0 / FINE_HUE_BINS))
    cumulative = np.concatenate([[0], np.cumsum(np.concatenate([fine, fine[: arc_bins - 1]]))])
    in_best_arc = int((cumulative[arc_bins:][:FINE_HUE_BINS] - cumulative[:FINE_HUE_BINS]).max())
    sectors = fine.reshape(HUE_BINS, -1).sum(axis=1)
    n = hue_fraction.size
    return max(0.0, 1.0 - resultant), max(0.0, 1.0 - in_best_arc / n), int((sectors >= HUE_BIN_SHARE * n).sum())


def page_features(rgb: np.ndarray, params: FeatureConfig = FeatureConfig()) -> dict[str, float | int]:
    """The classifier's measurements of one page, from an (H, W, 3) uint8 RGB array (a reduced decode)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or rgb.size == 0:
        raise ValueError(f"expected a non-empty (H, W, 3) uint8 RGB array, got shape {rgb.shape} dtype {rgb.dtype}")
    height, width, _ = rgb.shape
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        return _grey_features(rgb[..., 1], params)
    red, green, blue = (np.take(_SRGB_TO_LINEAR, plane) for plane in np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    luminance = _LUMINANCE[0] * red + _LUMINANCE[1] * green + _LUMINANCE[2] * blue
    flat = luminance.ravel()
    rank = min(flat.size - 1, int(params.paper_quantile * flat.size))
    bright = luminance >= np.partition(flat, rank)[rank]
    paper = np.array([np.median(red[bright]), np.median(green[bright]), np.median(blue[bright])], dtype=np.float32)
    _, tint_a, tint_b = (float(v[0]) for v in _lab_from_linear_channels(*paper[:, None]))
    if np.hypot(tint_a, tint_b) <= params.max_paper_chroma and float(paper.min()) > 0.0:
        # Von Kries white balance on the paper: a multiplicative tint (yellowed paper, warm scan) becomes grey.
        gains = float(paper @ _LUMINANCE) / paper
        red, green, blue = (
            np.minimum(plane * gain, 1.0) for plane, gain in zip((red, green, blue), gains, strict=True)
        )
    lightness, a, b = _lab_from_linear_channels(red, green, blue)
    lit = lightness >= params.dark_l
    n_lit = int(lit.sum())
    chroma = np.hypot(a, b)
    raw_chromatic = lit & (chroma >= params.chroma_min)
    hued = erode(raw_chromatic, params.hue_erosion)
    if params.erosion >= params.hue_erosion:  # erosions compose: reuse the lighter one
        chromatic = erode(hued, params.erosion - params.hue_erosion)
    else:
        chromatic = erode(raw_chromatic, params.erosion)
    n_chromatic = int(chromatic.sum())
    hue_spread, secondary, sectors = _hue_measures(a[hued], b[hued], chroma[hued]) if hued.any() else (0.0, 0.0, 0)
    p90, p99 = _chroma_quantiles(chroma, lit, (0.9, 0.99))
    return {
        "chromatic_fraction": n_chromatic / n_lit if n_lit else 0.0,
        "raw_chromatic_fraction": int(raw_chromatic.sum()) / n_lit if n_lit else 0.0,
        "vivid_fraction": int((chromatic & (chroma >= params.vivid_chroma)).sum()) / n_lit if n_lit else 0.0,
        "chroma_p99": float(p99),
        "chroma_p90": float(p90),
        "hue_spread": float(hue_spread),
        "secondary_hue_share": secondary,
        "hue_bins": sectors,
        "tint_a": tint_a,
        "tint_b": tint_b,
        "dark_fraction": 1.0 - n_lit / (height * width),
        "analysed_pixels": height * width,
    }


def _grey_features(grey: np.ndarray, params: FeatureConfig) -> dict[str, float | int]:
    """Features of a page whose three channels are equal (greyscale saved as RGB, or a grey decode): no chroma."""
    lightness = 116.0 * _lab_f(_SRGB_TO_LINEAR[grey]) - 16.0
    features: dict[str, float | int] = dict.fromkeys(FEATURE_NAMES, 0.0)
    features.update(hue_bins=0, dark_fraction=float(np.mean(lightness < params.dark_l)), analysed_pixels=grey.size)
    return features


def _chroma_quantiles(chroma: np.ndarray, lit: np.ndarray, qs: tuple[float, ...]) -> tuple[float, ...]:
    """Quantiles of the chroma of lit pixels from a 0.5-unit histogram: diagnostics, no sort needed."""
    bins = np.minimum((chroma * 2.0).astype(np.int32), CHROMA_HISTOGRAM_BINS - 1)
    counts = np.bincount(bins[lit], minlength=CHROMA_HISTOGRAM_BINS)
    total = int(counts.sum())
    if total == 0:
        return tuple(0.0 for _ in qs)
    cumulative = np.cumsum(counts)
    return tuple(float(np.searchsorted(cumulative, q * total)) / 2.0 for q in qs)


def color_score(features: Mapping[str, Any], thresholds: ColorThresholds = ColorThresholds()) -> float:
    """The score of one page's features (see ColourThresholds)."""
    return float(
        _score(
            float(features["chromatic_fraction"]),
            float(features["secondary_hue_share"]),
            float(features["vivid_fraction"]),
            thresholds,
        )
    )


def _score(fraction: Any, secondary: Any, vivid: Any, thresholds: ColorThresholds) -> Any:
    """Works on floats and on numpy arrays alike, so the per-page and the vectorised paths cannot disagree."""
    hue_evidence = np.maximum(secondary / thresholds.min_secondary_hue_share, vivid / thresholds.min_vivid_fraction)
    return np.minimum(fraction / thresholds.min_chromatic_fraction, hue_evidence)


def classify(features: Mapping[str, Any], thresholds: ColorThresholds = ColorThresholds()) -> tuple[float, bool]:
    """(color_score, is_color) of one page's features."""
    score = color_score(features, thresholds)
    return score, score >= thresholds.threshold


def classify_features(
    features: Mapping[str, Any], thresholds: ColorThresholds = ColorThresholds()
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised re-cut over stored columns (a pyarrow table such as pages.parquet, a pandas frame, a dict).

    Returns (color_score, is_color) arrays; rows whose features are null (error pages) get NaN and False.
    """
    score = _score(
        _column(features, "chromatic_fraction"),
        _column(features, "secondary_hue_share"),
        _column(features, "vivid_fraction"),
        thresholds,
    )
    is_color = np.where(np.isnan(score), False, score >= thresholds.threshold)
    return score.astype(np.float32), is_color.astype(bool)


def _column(features: Any, name: str) -> np.ndarray:
    """A feature column as float64 with nulls as NaN (pyarrow tables and arrays, pandas, lists with None)."""
    return np.asarray(features[name], dtype=np.float64)
