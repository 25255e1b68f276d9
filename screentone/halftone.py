"""Weight-free screentone: a colour page rendered as clustered-dot and line screens, like printed manga.

Why not a plain threshold or dither: manga tone is a physical screen of dots (or lines) on a fixed grid and
angle, pasted per region, so a flat region carries one regular texture and the page is bitonal. The renderer:

1. smooths the page slightly (JPEG noise must not flip tones) and computes luma, chroma and hue;
2. quantises luma into ``tone_levels`` steps between ``white_point`` and ``black_point``; luma above the white
   point stays paper white (pale but clearly coloured pixels get the lightest tone), luma below the black point
   becomes solid black; a mode filter removes speckle and thin transition bands at region borders;
3. fills each tone step with a screen whose ink coverage is ``1 - luma`` of the step, so the mean grey of the
   tone matches the greyscale page (which the augmentation interpolates with);
4. picks the screen per hue sector (dots of another size, dots on another grid angle, line screens), so
   colours of equal luma but different hue stay distinguishable, and neutral greys use the page's base dots;
5. draws XDoG lines (strokes and region borders) in black on top.

Per page the seed draws the dot pitch (``cell_px``), the base angle (``angles_deg``), the screen phase and which
hue sector gets which screen. Output is uint8 H x W with values 0 and 255 only, at the input resolution.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from screentone.filters import gaussian_blur, mode_filter
from screentone.lines import XDoGConfig, extract_lines

Pattern = Literal["dot", "line"]


@dataclass(frozen=True)
class Screen:
    """One screentone sheet: a spot pattern on a grid turned by ``angle_offset_deg`` from the page's base angle,
    with a pitch of ``cell_scale`` times the page's dot pitch."""

    pattern: Pattern
    angle_offset_deg: float = 0.0
    cell_scale: float = 1.0


NEUTRAL_SCREEN = Screen("dot")
HUE_SCREENS: tuple[Screen, ...] = (
    Screen("dot", 0.0, 0.7),  # fine dots
    Screen("dot", 45.0, 1.0),  # dots on a grid turned by 45 degrees
    Screen("dot", 0.0, 1.45),  # coarse dots
    Screen("dot", 22.5, 1.2),  # mid-size dots on a grid turned by 22.5 degrees
    Screen("line", 0.0, 0.8),  # lines along the base angle
    Screen("line", 90.0, 1.1),  # wider lines across the base angle
)


@dataclass(frozen=True)
class HalftoneConfig:
    """Settings of the weight-free renderer (pixel sizes refer to the page as rendered, never resampled).

    cell_px: range of the dot pitch drawn per page. angles_deg: base screen angles, one drawn per page.
    tone_levels: grey steps between white and black. white_point / black_point: luma (0-255) above which a
    neutral pixel stays white and below which any pixel is solid black. chroma_threshold: RGB max-min (0-1)
    above which the hue picks the screen. smooth_sigma: pre-blur before quantising (0 = none).
    label_radius: radius of the mode filter on tone steps and hue sectors. keep_lines: draw XDoG lines.
    min_coverage / max_coverage: ink coverage of the lightest / darkest step stays in this range so the
    lightest tone is visible and the darkest still shows white dots.
    """

    cell_px: tuple[float, float] = (5.0, 10.0)
    angles_deg: tuple[float, ...] = (45.0, 45.0, 30.0, 60.0, 15.0, 75.0, 0.0)
    tone_levels: int = 5
    white_point: int = 232
    black_point: int = 40
    chroma_threshold: float = 0.12
    hue_screens: bool = True
    smooth_sigma: float = 1.0
    label_radius: int = 2
    keep_lines: bool = True
    min_coverage: float = 0.1
    max_coverage: float = 0.82
    xdog: XDoGConfig = field(default_factory=XDoGConfig)

    def __post_init__(self) -> None:
        low, high = self.cell_px
        if not 2.0 <= low <= high:
            raise ValueError(f"cell_px must be a range (low, high) with 2 <= low <= high, got {self.cell_px}")
        if not self.angles_deg:
            raise ValueError("angles_deg must hold at least one angle")
        if self.tone_levels < 1:
            raise ValueError(f"tone_levels must be >= 1, got {self.tone_levels}")
        if not 0 <= self.black_point < self.white_point <= 255:
            raise ValueError(f"need 0 <= black_point < white_point <= 255, got {self.black_point}, {self.white_point}")
        if not 0.0 < self.min_coverage <= self.max_coverage < 1.0:
            raise ValueError(f"need 0 < min_coverage <= max_coverage < 1, got {self.min_coverage}, {self.max_coverage}")

    def fingerprint(self) -> str:
        """Short stable hash of every setting: renderings with equal fingerprints are interchangeable."""
        payload = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:10]


@dataclass(frozen=True)
class PageScreens:
    """The per-page random choices, drawn from the seed."""

    cell_px: float
    angle_deg: float
    phase: tuple[float, float]
    hue_order: tuple[int, ...]

    @classmethod
    def draw(cls, config: HalftoneConfig, seed: int) -> PageScreens:
        rng = np.random.default_rng(seed)
        cell = float(rng.uniform(*config.cell_px))
        angle = float(config.angles_deg[int(rng.integers(len(config.angles_deg)))])
        phase = (float(rng.uniform(0, cell)), float(rng.uniform(0, cell)))
        order = tuple(int(i) for i in rng.permutation(len(HUE_SCREENS)))
        return cls(cell, angle, phase, order)


def _dot_thresholds(samples: int = 512, steps: int = 1024) -> np.ndarray:
    """Threshold of the dot spot function for ink coverage c = i / steps: the (1 - c) quantile over one cell."""
    t = (np.arange(samples) + 0.5) / samples
    spot = np.cos(2 * np.pi * t)[:, None] + np.cos(2 * np.pi * t)[None, :]
    return np.quantile(spot.ravel(), 1.0 - np.linspace(0.0, 1.0, steps + 1)).astype(np.float32)


_DOT_THRESHOLDS = _dot_thresholds()


def screen_ink(ys: np.ndarray, xs: np.ndarray, coverage: np.ndarray, screen: Screen, page: PageScreens) -> np.ndarray:
    """Boolean ink of a screen at pixel coordinates for the requested coverage (fraction of inked area).

    Dots use the spot function cos(2 pi u) + cos(2 pi v): ink grows from the cell corners as round dots, meets
    at 50% in a checkerboard and leaves shrinking white dots above it (normal and inverted dots). Lines use
    cos(2 pi u). The threshold is the spot function's quantile, so the inked area equals the coverage.
    """
    angle = math.radians(page.angle_deg + screen.angle_offset_deg)
    cell = page.cell_px * screen.cell_scale
    x = xs.astype(np.float32) + page.phase[0]
    y = ys.astype(np.float32) + page.phase[1]
    u = (x * math.cos(angle) + y * math.sin(angle)) * (2 * math.pi / cell)
    if screen.pattern == "line":
        return np.cos(u) > np.cos(np.pi * coverage)
    v = (y * math.cos(angle) - x * math.sin(angle)) * (2 * math.pi / cell)
    threshold = _DOT_THRESHOLDS[np.rint(coverage * (len(_DOT_THRESHOLDS) - 1)).astype(np.int64)]
    return np.cos(u) + np.cos(v) > threshold


def _as_rgb01(page: np.ndarray) -> np.ndarray:
    page = np.asarray(page)
    if page.dtype != np.uint8:
        raise TypeError(f"halftone expects uint8 pixels, got {page.dtype}")
    if page.ndim == 2:
        page = np.repeat(page[..., None], 3, axis=2)
    if page.ndim != 3 or page.shape[2] != 3:
        raise ValueError(f"halftone expects an H x W x 3 RGB or H x W grey page, got shape {page.shape}")
    if min(page.shape[:2]) < 1:
        raise ValueError(f"halftone got an empty page of shape {page.shape}")
    return page.astype(np.float32) / 255.0


def tone_labels(page: np.ndarray, config: HalftoneConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel tone step (0 white, 1..K tones, K+1 solid black) and hue sector (0 neutral, 1..6 hues)."""
    rgb = _as_rgb01(page)
    if config.smooth_sigma > 0:
        rgb = np.stack([gaussian_blur(rgb[..., c], config.smooth_sigma) for c in range(3)], axis=2)
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    chroma = high - low
    chromatic = chroma >= config.chroma_threshold

    white, black = config.white_point / 255.0, config.black_point / 255.0
    step = np.floor((white - luma) / (white - black) * config.tone_levels).astype(np.int64)
    levels = np.clip(step, 0, config.tone_levels - 1) + 1
    levels[(luma >= white) & ~chromatic] = 0
    levels[luma < black] = config.tone_levels + 1

    hue_sector = np.zeros(luma.shape, dtype=np.int64)
    if config.hue_screens:
        hue_sector = np.where(chromatic, _hue_sector(rgb, high, chroma) + 1, 0)
    if config.label_radius > 0:
        levels = mode_filter(levels, config.label_radius)
        hue_sector = mode_filter(hue_sector, config.label_radius)
    return levels, hue_sector


def _hue_sector(rgb: np.ndarray, high: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """HSV hue in six 60-degree sectors centred on red, yellow, green, cyan, blue, magenta (0..5)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(chroma, 1e-6)
    hue = np.where(high == r, ((g - b) / safe) % 6, np.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return (np.floor(hue + 0.5).astype(np.int64)) % 6


def render_halftone(page: np.ndarray, seed: int, config: HalftoneConfig = HalftoneConfig()) -> np.ndarray:
    """Screentone of an RGB or grey uint8 page: uint8 H x W, values 0 (ink) and 255 (paper) only."""
    levels, hue_sector = tone_labels(page, config)
    screens = PageScreens.draw(config, seed)
    out = np.full(levels.shape, 255, dtype=np.uint8)

    white, black = config.white_point / 255.0, config.black_point / 255.0
    step_luma = white - (np.arange(config.tone_levels) + 0.5) * (white - black) / config.tone_levels
    step_coverage = np.clip(1.0 - step_luma, config.min_coverage, config.max_coverage).astype(np.float32)

    toned = (levels >= 1) & (levels <= config.tone_levels)
    for sector in np.unique(hue_sector[toned]):
        ys, xs = np.nonzero(toned & (hue_sector == sector))
        screen = NEUTRAL_SCREEN if sector == 0 else HUE_SCREENS[screens.hue_order[sector - 1]]
        coverage = step_coverage[levels[ys, xs] - 1]
        ink = screen_ink(ys, xs, coverage, screen, screens)
        out[ys[ink], xs[ink]] = 0
    out[levels == config.tone_levels + 1] = 0
    if config.keep_lines:
        out[extract_lines(page, config.xdog) == 0] = 0
    return out
