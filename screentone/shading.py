"""The released app's "Sketch_Shading" input: line art with the page's dark areas filled in, in two flat levels.

The rules (app.py, on the greyscale g of the page and its line art, both uint8 0-255 at the same size):

- g < 0.3 * 255 (76.5): solid black, 0;
- line > 125 (paper side of the line art) and 76.5 < g < 145: flat mid-grey, 125.

The two regions are disjoint (g below or above 76.5), so the order of the rules does not matter. Everything else
keeps its line-art value.
"""

from __future__ import annotations

import numpy as np

BLACK_BELOW = 0.3 * 255  # g below this: solid black
GREY_ABOVE = 0.3 * 255  # ... g strictly between these two (and paper in the line art): flat grey
GREY_BELOW = 145
LINE_PAPER_ABOVE = 125  # line-art values above this count as paper
FLAT_GREY = 125


def shade_lines(lines: np.ndarray, grey: np.ndarray) -> np.ndarray:
    """Line art (uint8 H x W, 255 = paper) shaded by the grey page (uint8 H x W): a new uint8 H x W array."""
    lines, grey = np.asarray(lines), np.asarray(grey)
    if lines.dtype != np.uint8 or grey.dtype != np.uint8 or lines.ndim != 2 or lines.shape != grey.shape:
        raise ValueError(
            f"shade_lines expects two uint8 H x W arrays of one size, got lines {lines.dtype} {lines.shape} and "
            f"grey {grey.dtype} {grey.shape}"
        )
    shaded = lines.copy()
    shaded[grey < BLACK_BELOW] = 0
    shaded[(lines > LINE_PAPER_ABOVE) & (grey > GREY_ABOVE) & (grey < GREY_BELOW)] = FLAT_GREY
    return shaded
