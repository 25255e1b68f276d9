"""Patch geometry and the composite layout: exact boxes, full coverage, the paper's fit rule, ring and mask."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.core.geometry import (
    ASPECT_TOLERANCE,
    RING_CELLS,
    CompositeLayout,
    fit_box,
    fit_image,
    quadrant_boxes,
    reference_boxes,
)


def test_quadrant_boxes_of_the_paper_size_are_exact() -> None:
    assert quadrant_boxes(512, 800) == [
        (0, 0, 384, 600),
        (128, 0, 512, 600),
        (0, 200, 384, 800),
        (128, 200, 512, 800),
    ]
    assert reference_boxes(512, 800)[:4] == quadrant_boxes(512, 800)
    assert reference_boxes(512, 800)[4] == (0, 0, 512, 800)


def test_quadrant_boxes_of_odd_sizes_are_exact() -> None:
    # floor(3/4) crops, the right and bottom crops end exactly at the border
    assert quadrant_boxes(513, 801) == [
        (0, 0, 384, 600),
        (129, 0, 513, 600),
        (0, 201, 384, 801),
        (129, 201, 513, 801),
    ]
    assert quadrant_boxes(7, 5) == [(0, 0, 5, 3), (2, 0, 7, 3), (0, 2, 5, 5), (2, 2, 7, 5)]


@pytest.mark.parametrize("width,height", [(4, 4), (5, 9), (6, 7), (255, 384), (256, 383), (641, 640), (1023, 1601)])
def test_quadrant_boxes_cover_the_image_with_equal_crops(width: int, height: int) -> None:
    boxes = quadrant_boxes(width, height)
    covered = np.zeros((height, width), dtype=int)
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert (right - left, bottom - top) == ((3 * width) // 4, (3 * height) // 4)
        covered[top:bottom, left:right] += 1
    assert covered.min() >= 1  # every pixel is in some query patch
    assert boxes[0][:2] == (0, 0) and boxes[3][2:] == (width, height)
    # stride: the right/bottom crops start a quarter (rounded up) in
    assert boxes[1][0] == width - (3 * width) // 4 and boxes[2][1] == height - (3 * height) // 4


def test_too_small_images_are_refused() -> None:
    with pytest.raises(ValueError, match="too small"):
        quadrant_boxes(3, 100)


def test_fit_box_keeps_pages_within_tolerance_whole() -> None:
    assert fit_box(512, 800, 512, 800) == (0, 0, 512, 800)
    assert fit_box(1024, 1600, 512, 800) == (0, 0, 1024, 1600)
    # aspect 0.64 * 1.15 = 0.736 is still "close": a mild stretch
    assert fit_box(736, 1000, 512, 800) == (0, 0, 736, 1000)
    assert fit_box(640, 1000, 512, 800, tolerance=0.0) == (0, 0, 640, 1000)


def test_fit_box_centre_crops_far_aspects_to_the_target_aspect() -> None:
    # a double-page spread: too wide, the sides go
    assert fit_box(1000, 800, 512, 800) == (244, 0, 756, 800)
    # a webtoon strip: too tall, top and bottom go
    assert fit_box(512, 2000, 512, 800) == (0, 600, 512, 1400)
    # just outside the tolerance
    wide = round(800 * 0.64 * (1 + ASPECT_TOLERANCE)) + 2
    left, top, right, bottom = fit_box(wide, 800, 512, 800)
    assert (right - left, bottom - top) == (512, 800) and left == (wide - 512) // 2
    with pytest.raises(ValueError, match="positive"):
        fit_box(0, 10, 512, 800)


def test_fit_image_resizes_to_the_target_and_crops_the_sides() -> None:
    page = np.zeros((400, 1000, 3), dtype=np.uint8)
    page[:, :, 2] = 255  # blue page
    page[:, :150] = (255, 0, 0)  # red margins outside the centred crop
    page[:, -150:] = (255, 0, 0)
    fitted = np.asarray(fit_image(Image.fromarray(page), 64, 100))
    assert fitted.shape == (100, 64, 3)
    assert fitted[..., 0].max() < 40 and fitted[..., 2].min() > 200  # no red left


def test_ring_cells_surround_the_centre_best_first() -> None:
    cells = [cell for q in range(4) for cell in RING_CELLS[q]]
    assert len(set(cells)) == 12
    assert not any(row in (1, 2) and col in (1, 2) for row, col in cells)
    for q in range(4):
        best, _, third = RING_CELLS[q]
        # the best match shares an edge with the centre 2x2 block, the third sits in a corner
        assert (best[0] in (1, 2)) != (best[1] in (1, 2))
        assert third in {(0, 0), (0, 3), (3, 0), (3, 3)}


def test_composite_layout_boxes_and_mask() -> None:
    layout = CompositeLayout(512, 800)
    assert layout.canvas_size == (1024, 1600)
    assert layout.cell_size == (256, 400) and layout.patch_size == (254, 398)
    assert layout.centre_box == (256, 400, 768, 1200)
    assert layout.ring_box(0, 0) == (1, 401, 255, 799)  # TL best: row 1, col 0, inside a 1-px margin
    mask = layout.mask()
    assert mask.shape == (1600, 1024) and mask.dtype == np.float32
    assert mask[400:1200, 256:768].max() == 0.0
    assert mask.sum() == 3 * 512 * 800  # everything but the centre is known
    for q in range(4):
        for rank in range(3):
            left, top, right, bottom = layout.ring_box(q, rank)
            assert mask[top:bottom, left:right].min() == 1.0


def test_ring_canvas_and_compose_place_patches_and_frame() -> None:
    layout = CompositeLayout(64, 96)
    red = Image.new("RGB", (10, 10), (255, 0, 0))
    ring = layout.ring_canvas({(1, 0): red})
    pixels = np.asarray(ring)
    left, top, right, bottom = layout.ring_box(1, 0)
    assert (pixels[top:bottom, left:right] == (255, 0, 0)).all()
    assert (pixels[top - 1, left:right] == 255).all()  # the white margin
    frame = Image.new("RGB", (64, 96), (0, 0, 255))
    composed = np.asarray(layout.compose(ring, frame))
    cl, ct, cr, cb = layout.centre_box
    assert (composed[ct:cb, cl:cr] == (0, 0, 255)).all()
    assert (np.asarray(layout.compose(ring, None))[ct:cb, cl:cr] == 0).all()
    assert layout.crop_centre(Image.fromarray(composed)).size == (64, 96)
    with pytest.raises(ValueError, match="multiples of 16"):
        CompositeLayout(500, 800)


# The reference table (colorflow-notes.md, "Composite and mask"), stated here independently of pipelines.core.geometry:
# per query patch TL, TR, BL, BR, the (row, col) of the 4x4 grid for rank 1, 2, 3.
REFERENCE_RING_TABLE = {
    0: ((1, 0), (0, 1), (0, 0)),  # TL
    1: ((1, 3), (0, 2), (0, 3)),  # TR
    2: ((2, 0), (3, 1), (3, 0)),  # BL
    3: ((2, 3), (3, 2), (3, 3)),  # BR
}


def test_ring_cells_match_the_reference_table_cell_by_cell_on_the_canvas() -> None:
    assert RING_CELLS == REFERENCE_RING_TABLE
    # and on pixels: each (query patch, rank) patch lands in the reference cell, whatever the table in the code says
    layout = CompositeLayout(64, 96)
    colors = {(q, rank): (40 * q + 10, 60 * rank + 20, 200) for q in range(4) for rank in range(3)}
    ring = np.asarray(layout.ring_canvas({key: Image.new("RGB", (8, 8), c) for key, c in colors.items()}))
    cell_w, cell_h = 32, 48  # W/2 x H/2
    for (q, rank), color in colors.items():
        row, col = REFERENCE_RING_TABLE[q][rank]
        centre = ring[row * cell_h + cell_h // 2, col * cell_w + cell_w // 2]
        assert tuple(centre) == color, f"query patch {q} rank {rank + 1} is not in cell {(row, col)}"
