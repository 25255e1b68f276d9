"""Weight-free screentone, line extraction, the augmentation maths and the contact sheet."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from screentone.augment import EVAL_ALPHAS, blend, sample_alpha, to_grey
from screentone.contact_sheet import SheetRow, build_contact_sheet, render_contact_sheet
from screentone.filters import box_count, gaussian_blur, min_filter, mode_filter
from screentone.halftone import HalftoneConfig, PageScreens, render_halftone, tone_labels
from screentone.lines import erode_lines, extract_lines
from screentone.render import HalftoneRenderer, ScreentoneRenderer, make_renderer
from screentone.synthetic import synthetic_color_page


def _flat(color: tuple[int, int, int], size: tuple[int, int] = (160, 160)) -> np.ndarray:
    return np.broadcast_to(np.array(color, dtype=np.uint8), (*size, 3)).copy()


def _near_bitonal_fraction(tone: np.ndarray) -> float:
    return float(np.mean((tone <= 10) | (tone >= 245)))


@pytest.fixture(scope="module")
def page() -> np.ndarray:
    return synthetic_color_page(400, 256, seed=4)


def test_to_grey_is_pillow_luma_bit_for_bit():
    rgb = np.random.default_rng(0).integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
    assert np.array_equal(to_grey(rgb), np.asarray(Image.fromarray(rgb).convert("L")))
    with pytest.raises(ValueError, match="H x W x 3"):
        to_grey(np.zeros((4, 4, 4), dtype=np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        to_grey(np.zeros((4, 4, 3), dtype=np.float32))


def test_blend_interpolates_with_alpha_as_tone_weight():
    grey = np.full((4, 5), 200, dtype=np.uint8)
    tone = np.tile(np.array([0, 255, 0, 255, 0], dtype=np.uint8), (4, 1))
    assert np.array_equal(blend(grey, tone, 0.0), grey)
    assert np.array_equal(blend(grey, tone, 1.0), tone)
    assert blend(grey, tone, 0.5)[0].tolist() == [100, 228, 100, 228, 100]  # 0.5*200 + 0.5*255 = 227.5 -> 228
    assert blend(grey, tone, 0.33)[0, 0] == round(0.67 * 200)
    with pytest.raises(ValueError, match="same resolution"):
        blend(grey, tone[:, :4], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        blend(grey, tone, 1.5)


def test_sample_alpha_is_a_function_of_seed_epoch_and_key():
    assert sample_alpha(9, 0, "frame-a", 0.2, 0.8) == sample_alpha(9, 0, "frame-a", 0.2, 0.8)  # rerun: same draw
    assert sample_alpha(9, 0, "frame-a") != sample_alpha(9, 1, "frame-a")  # next epoch: a new draw
    assert sample_alpha(9, 0, "frame-a") != sample_alpha(9, 0, "frame-b")
    assert sample_alpha(9, 0, "frame-a") != sample_alpha(10, 0, "frame-a")
    draws = [sample_alpha(0, epoch, f"k{i}", 0.2, 0.8) for epoch in range(4) for i in range(50)]
    assert min(draws) >= 0.2 and max(draws) <= 0.8 and np.std(draws) > 0.1
    uniform = [sample_alpha(1, 0, f"k{i}") for i in range(2000)]
    assert abs(np.mean(uniform) - 0.5) < 0.03 and abs(np.quantile(uniform, 0.1) - 0.1) < 0.03
    assert EVAL_ALPHAS == (0.33, 0.5, 0.66)
    with pytest.raises(ValueError, match="low <= high"):
        sample_alpha(0, 0, "k", 0.9, 0.1)


def test_filters_match_direct_computation():
    image = np.random.default_rng(1).random((20, 30)).astype(np.float32)
    mask = image > 0.5
    padded = np.pad(mask, 2, mode="edge")
    direct = np.array([[padded[y : y + 5, x : x + 5].sum() for x in range(30)] for y in range(20)])
    np.testing.assert_array_equal(box_count(mask, 2), direct)
    direct_min = np.array(
        [[np.pad(image, 1, mode="edge")[y : y + 3, x : x + 3].min() for x in range(30)] for y in range(20)]
    )
    np.testing.assert_array_equal(min_filter(image, 3), direct_min)
    assert abs(float(gaussian_blur(image, 1.5).mean()) - float(image.mean())) < 0.01
    labels = np.zeros((9, 9), dtype=np.int64)
    labels[4, 4] = 3  # a single speckle disappears under a 3x3 mode filter
    assert not mode_filter(labels, 1).any()


def test_xdog_marks_strokes_and_solid_black_but_not_flat_areas():
    image = Image.new("RGB", (120, 120), (230, 180, 120))
    draw = ImageDraw.Draw(image)
    draw.line((10, 60, 110, 60), fill=(0, 0, 0), width=2)
    draw.rectangle((80, 80, 110, 110), fill=(0, 0, 0))
    lines = extract_lines(np.asarray(image))
    assert set(np.unique(lines)) <= {0, 255}
    assert np.all(lines[60, 20:100] == 0)  # the stroke
    assert np.all(lines[85:105, 85:105] == 0)  # the solid black fill
    assert np.all(lines[10:40, 10:110] == 255)  # the flat colour
    thick = erode_lines(lines)
    assert np.all(thick <= lines) and (thick == 0).sum() > (lines == 0).sum()


def test_halftone_is_near_bitonal_and_keeps_lines_and_paper(page):
    tone = render_halftone(page, seed=1)
    assert tone.shape == page.shape[:2] and tone.dtype == np.uint8
    assert _near_bitonal_fraction(tone) >= 0.9
    assert set(np.unique(tone)) <= {0, 255}
    grey = to_grey(page)
    assert np.all(tone[grey < 20] == 0)  # black ink (outlines, borders, solid fills) stays black
    paper = min_filter(grey, 9) == 255  # white paper away from any stroke
    assert paper.sum() > 1000 and np.all(tone[paper] == 255)
    toned = (grey > 60) & (grey < 200)
    assert 0.1 < (tone[toned] == 0).mean() < 0.9  # mid greys become a mixture of ink and paper


def test_white_and_black_pages_stay_white_and_black():
    assert np.all(render_halftone(_flat((255, 255, 255)), seed=0) == 255)
    assert np.all(render_halftone(_flat((0, 0, 0)), seed=0) == 0)
    assert np.all(render_halftone(np.full((50, 70), 255, dtype=np.uint8), seed=3) == 255)


def test_flat_region_gets_one_consistent_tone_with_matching_mean_grey():
    config = HalftoneConfig()
    flat = _flat((150, 150, 150), (240, 240))
    tone = render_halftone(flat, seed=5, config=config)
    levels, sectors = tone_labels(flat, config)
    assert len(np.unique(levels)) == 1 and len(np.unique(sectors)) == 1
    cell = int(np.ceil(PageScreens.draw(config, 5).cell_px)) * 4
    ink = [
        (tone[y : y + cell, x : x + cell] == 0).mean()
        for y in range(0, 240 - cell, cell)
        for x in range(0, 240 - cell, cell)
    ]
    assert np.std(ink) < 0.03  # the same screen everywhere
    assert abs(np.mean(tone) / 255 - 150 / 255) < 0.1  # the tone's mean grey follows the luma


def test_darker_greys_get_more_ink():
    inks = [(render_halftone(_flat((v, v, v)), seed=2) == 0).mean() for v in (210, 160, 110, 70)]
    assert inks == sorted(inks) and inks[-1] - inks[0] > 0.3


def test_equal_luma_colors_of_different_hue_get_different_screens():
    red, green = _flat((200, 60, 60)), _flat((40, 145, 40))
    assert abs(int(to_grey(red)[0, 0]) - int(to_grey(green)[0, 0])) <= 1
    tone_red, tone_green = render_halftone(red, seed=8), render_halftone(green, seed=8)
    assert (tone_red != tone_green).mean() > 0.2
    assert np.array_equal(render_halftone(red, seed=8), tone_red)


def test_seed_changes_the_screen_and_config_is_validated(page):
    assert not np.array_equal(render_halftone(page, seed=1), render_halftone(page, seed=2))
    with pytest.raises(ValueError, match="cell_px"):
        HalftoneConfig(cell_px=(9.0, 4.0))
    with pytest.raises(ValueError, match="black_point"):
        HalftoneConfig(black_point=240, white_point=200)


def test_halftone_renderer_interface_and_id(page):
    renderer = make_renderer()
    assert isinstance(renderer, HalftoneRenderer) and isinstance(renderer, ScreentoneRenderer)
    assert renderer.id == HalftoneRenderer().id and renderer.id.startswith("halftone-v1-")
    assert HalftoneRenderer(HalftoneConfig(cell_px=(6.0, 6.0))).id != renderer.id
    assert np.array_equal(renderer.render(page, 3), render_halftone(page, 3))
    assert renderer.render(to_grey(page), 3).shape == page.shape[:2]
    with pytest.raises(ValueError, match="non-negative integer"):
        renderer.render(page, -1)
    with pytest.raises(ValueError, match="H x W x 3"):
        renderer.render(np.zeros((8, 8, 4), dtype=np.uint8), 0)
    with pytest.raises(TypeError, match="uint8"):
        renderer.render(page.astype(np.float32), 0)


def test_contact_sheet_holds_every_panel_at_native_resolution(page, tmp_path):
    path = render_contact_sheet([page, page[:300, :200]], make_renderer(), tmp_path / "sheet.png", seed=4)
    sheet = np.asarray(Image.open(path).convert("L"))
    h, w = page.shape[:2]
    columns = 3 + len(EVAL_ALPHAS)
    assert sheet.shape[1] == columns * w + (columns + 1) * 8
    tone = make_renderer().render(page, 4)
    x0, y0 = 8 + 2 * (w + 8), 8 + 18  # third column of the first row, below its caption
    assert np.array_equal(sheet[y0 : y0 + h, x0 : x0 + w], tone)
    x_blend = 8 + 4 * (w + 8)  # blend at the middle evaluation alpha (0.5)
    assert np.array_equal(sheet[y0 : y0 + h, x_blend : x_blend + w], blend(to_grey(page), tone, EVAL_ALPHAS[1]))
    with pytest.raises(ValueError, match="does not match the page"):
        build_contact_sheet([SheetRow(page, tone[:10])])
