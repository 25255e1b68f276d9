"""ColorFlow's colour-to-manga path, step by step, with values worked out by hand.

A "constant decoder" (last conv weight 0, bias 0.5) outputs 0.5 everywhere whatever the ScreenMap and noise, so
the line multiplications and the uint8 conversion after it can be checked against hand arithmetic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from screentone.color2manga import ColorToScreenMapGenerator
from screentone.layers import padded_size
from screentone.loader import ScreenStyleModels
from screentone.render import (
    HALVE_ABOVE,
    ScreenStyleRenderer,
    colorflow_network_input,
    double_tone,
    halve_page,
    to_uint8_truncated,
)
from screentone.screenvae import (
    ScreenVAEDecoder,
    decode_tone,
    decode_tone_binarised,
    decoder_input_size,
    multiply_lines,
)
from screentone.synthetic import synthetic_color_page

# Page pixel (10, 200, 255): PIL grey = (10 * 19595 + 200 * 38470 + 255 * 7471 + 32768) >> 16 = 149.
PIXEL, PIXEL_GREY = (10, 200, 255), 149


@pytest.fixture(scope="module")
def generator() -> ColorToScreenMapGenerator:
    torch.manual_seed(10)
    return ColorToScreenMapGenerator(width=16).eval()


@pytest.fixture(scope="module")
def decoder() -> ScreenVAEDecoder:
    torch.manual_seed(11)
    return ScreenVAEDecoder(width=16).eval()


@pytest.fixture(scope="module")
def constant_decoder() -> ScreenVAEDecoder:
    decoder = ScreenVAEDecoder(width=16).eval()
    with torch.no_grad():
        decoder.model.model[-1].weight.zero_()
        decoder.model.model[-1].bias.fill_(0.5)
    return decoder


def _unit(value: float) -> float:
    """A uint8 value in [-1, 1] the way ToTensor + Normalize(0.5, 0.5) computes it."""
    return (value / 255 - 0.5) / 0.5


def test_pad_sizes_for_sides_that_are_and_are_not_multiples():
    # G input: rounded up to a multiple of 256, exact multiples unchanged.
    assert [padded_size(s, 256) for s in (200, 256, 257, 300, 512, 800)] == [256, 256, 512, 512, 512, 1024]
    # Decoder input (ColorFlow's npad): h // 128 * 128 + 128, a full extra block on exact multiples.
    assert decoder_input_size(256, 512) == (384, 640)
    assert decoder_input_size(200, 300) == (256, 384)
    assert decoder_input_size(127, 128) == (128, 256)
    assert decoder_input_size(1024, 768) == (1152, 896)
    # The first version padded the decoder input only up to the next multiple of 128.
    assert [padded_size(s, 128) for s in (200, 256, 384)] == [256, 256, 384]


def test_fill_of_each_input_white_line_and_red_page():
    page = np.zeros((3, 2, 3), dtype=np.uint8)
    page[:] = PIXEL
    lines = np.asarray(Image.fromarray(page).convert("L"))
    assert lines[0, 0] == PIXEL_GREY
    x = colorflow_network_input(page, lines)
    assert x.shape == (1, 4, 256, 256) and x.dtype == torch.float32
    # Inside the page: line first, then R, G, B.
    expected = [_unit(PIXEL_GREY), _unit(10), _unit(200), 1.0]
    assert x[0, :, 2, 1].tolist() == pytest.approx(expected, abs=1e-7)
    assert expected[1] == pytest.approx(-0.9215686, abs=1e-7) and expected[2] == pytest.approx(0.5686275, abs=1e-7)
    # Padding: white (+1) on the line map, pure red (1, -1, -1) on the page, below and to the right.
    for row, col in ((3, 0), (0, 2), (255, 255)):
        assert x[0, :, row, col].tolist() == [1.0, 1.0, -1.0, -1.0]


def test_renderer_inputs_grey_line_not_eroded_and_legacy_replicate(generator, decoder):
    page = np.full((20, 30, 3), 90, dtype=np.uint8)
    page[5] = 0  # a one-pixel black line
    models = ScreenStyleModels(generator, decoder)
    x = ScreenStyleRenderer(models, device="cpu").network_input(page)
    assert x.shape == (1, 4, 256, 256)
    assert x[0, 0, 4:7, 0].tolist() == pytest.approx([_unit(90), -1.0, _unit(90)])  # grey, not eroded
    assert x[0, :, 20, 0].tolist() == [1.0, 1.0, -1.0, -1.0]
    legacy = ScreenStyleRenderer(models, device="cpu", path="eroded-binarised").network_input(page)
    assert legacy[0, 0, 4:7, 0].tolist() == [-1.0, -1.0, -1.0]  # eroded 3x3: the line is 3 px wide
    assert torch.equal(legacy[0, :, 255, 255], legacy[0, :, 19, 29])  # replicate padding


def test_raw_line_multiplication_on_known_values(constant_decoder):
    tone = torch.tensor([0.5, 1.0, -0.2, 0.5])
    lines = torch.tensor([0.0, -1.0, 0.6, -0.5])
    # (t + 1)(l + 1) / 2 - 1: 1.5 * 1 / 2 - 1, 2 * 0 / 2 - 1, 0.8 * 1.6 / 2 - 1, 1.5 * 0.5 / 2 - 1.
    assert multiply_lines(tone, lines).tolist() == pytest.approx([-0.25, -1.0, -0.36, -0.625])
    assert multiply_lines(torch.tensor([1.0]), torch.tensor([1.0])).tolist() == [1.0]  # clamped to [-1, 1]

    screenmap = torch.zeros(1, 4, 1, 4)
    line = torch.tensor([-0.5, 0.0, 0.6, 1.0]).view(1, 1, 1, 4)
    with torch.inference_mode():
        raw = decode_tone(constant_decoder, screenmap, line)
        binarised = decode_tone_binarised(constant_decoder, screenmap, line)
    # Decoder output 0.5 everywhere: raw line 1.5 * (l + 1) / 2 - 1; the first version used sign(l) = -1, 0, 1, 1.
    assert raw.flatten().tolist() == pytest.approx([-0.625, -0.25, 0.2, 0.5])
    assert binarised.flatten().tolist() == pytest.approx([-1.0, -0.25, 0.5, 0.5])


def test_decoder_gets_the_uncropped_screenmap_replicate_padded(generator, decoder):
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        generator.register_forward_hook(lambda m, args, out: seen.update(g_in=args[0], g_out=out)),
        decoder.register_forward_pre_hook(lambda m, args: seen.update(d_in=args[0])),
    ]
    try:
        ScreenStyleRenderer(ScreenStyleModels(generator, decoder), device="cpu").render(
            synthetic_color_page(200, 300, seed=1), seed=0
        )
    finally:
        for hook in hooks:
            hook.remove()
    assert seen["g_in"].shape == (1, 4, 256, 512)  # 200 x 300 padded to multiples of 256
    assert seen["d_in"].shape == (1, 4, 384, 640)  # the whole 256 x 512 map, then a full extra block of 128
    assert torch.equal(seen["d_in"][..., :256, :512], seen["g_out"])  # not cropped to the page first
    assert torch.equal(seen["d_in"][..., 256:, :512], seen["g_out"][..., 255:256, :].expand(-1, -1, 128, -1))
    assert torch.equal(seen["d_in"][..., :256, 512:], seen["g_out"][..., :, 511:512].expand(-1, -1, -1, 128))


def test_second_multiplication_grey_lines_and_truncation(generator, constant_decoder):
    page = np.full((16, 12, 3), 90, dtype=np.uint8)
    page[5] = 0  # a one-pixel black line
    page[10:13] = 30
    page[14] = 255
    models = ScreenStyleModels(generator, constant_decoder)
    twice = ScreenStyleRenderer(models, device="cpu").render(page, seed=0)
    once = ScreenStyleRenderer(models, device="cpu", line_passes=1).render(page, seed=0)
    # Decoder 0.5 -> after the raw line: 0.75 * g / 255 in [0, 1]; after the second pass: 0.75 * (g / 255)^2.
    # g = 90: 67.5 -> 67 and 23.82 -> 23; g = 30: 22.5 -> 22 and 2.65 -> 2; g = 255: 191.25 -> 191; g = 0: 0.
    assert once[:, 0].tolist() == [67] * 5 + [0] + [67] * 4 + [22] * 3 + [67, 191, 67]
    assert twice[:, 0].tolist() == [23] * 5 + [0] + [23] * 4 + [2] * 3 + [23, 191, 23]
    assert np.all(twice == twice[:, :1])  # rows are uniform: no erosion spreads the line sideways or down
    assert to_uint8_truncated(torch.tensor([-1.0, 0.9999, 1.0, 2 * 67.5 / 255 - 1])).tolist() == [0, 254, 255, 67]


def test_tall_pages_are_halved_and_doubled_back(generator, constant_decoder):
    assert HALVE_ABOVE == 2500
    assert double_tone(np.array([[1, 2], [3, 4]], dtype=np.uint8), 5, 3).tolist() == [
        [1, 1, 2],
        [1, 1, 2],
        [3, 3, 4],
        [3, 3, 4],
        [3, 3, 4],
    ]
    page = np.full((70, 40, 3), 90, dtype=np.uint8)
    page[:, 20:] = 200
    assert halve_page(page).shape == (35, 20, 3)
    models = ScreenStyleModels(generator, constant_decoder)
    halving = ScreenStyleRenderer(models, device="cpu", halve_above=64)
    plain = ScreenStyleRenderer(models, device="cpu")
    tone = halving.render(page, seed=3)
    assert tone.shape == (70, 40)
    assert np.array_equal(tone, double_tone(plain.render(halve_page(page), seed=3), 70, 40))
    assert halving.network_input(page[:64]).shape == plain.network_input(page[:64]).shape  # 64 rows: not halved
    assert halving.id.endswith("-halve64") and "halve" not in plain.id


def test_ids_change_with_the_path_and_its_options(generator, decoder):
    models = ScreenStyleModels(generator, decoder)
    ids = {
        ScreenStyleRenderer(models, device="cpu").id,
        ScreenStyleRenderer(models, device="cpu", path="eroded-binarised").id,
        ScreenStyleRenderer(models, device="cpu", dtype="bfloat16").id,
        ScreenStyleRenderer(models, device="cpu", line_passes=1).id,
    }
    assert len(ids) == 4
    bf16 = ScreenStyleRenderer(models, device="cpu", dtype="bfloat16")
    assert bf16.id.endswith("-colorflow-grey-x2-bfloat16")
    assert bf16.generator.model.model[1].weight.dtype == torch.bfloat16
    assert generator.model.model[1].weight.dtype == torch.float32  # the caller's modules are left in float32
    assert bf16.weights_digest() == ScreenStyleRenderer(models, device="cpu").weights_digest()  # of float32 weights
    with pytest.raises(ValueError, match="path must be one of"):
        ScreenStyleRenderer(models, path="screenvae")
    with pytest.raises(ValueError, match="dtype must be one of"):
        ScreenStyleRenderer(models, dtype="int8")
