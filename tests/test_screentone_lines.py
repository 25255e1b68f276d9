"""The XDoG line extractor on scipy.ndimage computes what the numpy filters computed; the shading rules by region."""

from __future__ import annotations

import numpy as np
import pytest

from screentone.augment import to_grey
from screentone.filters import gaussian_blur, min_filter
from screentone.lines import XDoGConfig, erode_lines, extract_lines, xdog
from screentone.shading import FLAT_GREY, shade_lines
from screentone.synthetic import synthetic_color_page


def _numpy_xdog(grey: np.ndarray, params: XDoGConfig) -> np.ndarray:
    """The XDoG response as lines.py computed it before scipy (screentone.filters' numpy Gaussian)."""
    luma = grey.astype(np.float32) / 255.0
    response = gaussian_blur(luma, params.sigma) - params.tau * gaussian_blur(luma, params.sigma * params.k)
    soft = 1.0 + np.tanh(params.phi * (response - params.epsilon))
    return np.where(response >= params.epsilon, 1.0, soft).astype(np.float32)


@pytest.mark.parametrize("params", [XDoGConfig(), XDoGConfig(sigma=0.3), XDoGConfig(sigma=2.2, k=1.9)])
def test_scipy_xdog_matches_the_numpy_filters_up_to_float_rounding(params):
    grey = to_grey(synthetic_color_page(300, 208, seed=7))
    new, old = xdog(grey, params), _numpy_xdog(grey, params)
    assert new.dtype == np.float32 and new.shape == grey.shape
    # measured: at most 1.4e-5 on this page (float sums in another order), no pixel flips across the threshold
    assert float(np.abs(new - old).max()) < 1e-3
    old_lines = np.where((old < 0.5) | (grey < 50), 0, 255)
    changed = float(np.mean(extract_lines(grey, params) != old_lines))
    assert changed < 1e-3  # only pixels sitting on the 0.5 threshold may flip


def test_scipy_erosion_is_exactly_the_numpy_min_filter():
    lines = extract_lines(synthetic_color_page(200, 144, seed=3))
    for size in (1, 3, 5):
        np.testing.assert_array_equal(erode_lines(lines, size), min_filter(lines, size))
    with pytest.raises(ValueError, match="odd"):
        erode_lines(lines, 2)


def test_shading_rules_region_by_region():
    """A 4 x 5 grid of constant cells: grey levels across, line-art values down; each cell's value is checked."""
    greys = [20, 76, 77, 144, 145]  # solid black below 76.5; flat grey strictly between 76.5 and 145
    line_values = [0, 125, 126, 255]  # paper above 125
    cell = 4
    grey = np.repeat(np.repeat(np.array([greys] * len(line_values), np.uint8), cell, 0), cell, 1)
    lines = np.repeat(np.repeat(np.array([[v] * len(greys) for v in line_values], np.uint8), cell, 0), cell, 1)
    before = lines.copy()
    shaded = shade_lines(lines, grey)
    np.testing.assert_array_equal(lines, before)  # the line art itself is not changed
    assert shaded.dtype == np.uint8 and shaded.shape == lines.shape
    for row, line in enumerate(line_values):
        for col, g in enumerate(greys):
            expected = 0 if g < 76.5 else (FLAT_GREY if line > 125 and 76.5 < g < 145 else line)
            values = np.unique(shaded[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell])
            assert values.tolist() == [expected], (line, g)
    assert shaded[0, 0] == 0 and shaded[2 * cell, 2 * cell] == FLAT_GREY and shaded[3 * cell, 4 * cell] == 255
    with pytest.raises(ValueError, match="one size"):
        shade_lines(lines, grey[:-1])
