"""Batched ScreenStyle rendering equals page-by-page rendering exactly on CPU in float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from screentone.color2manga import ColorToScreenMapGenerator
from screentone.layers import BatchInvariantConv2d, draw_noise
from screentone.loader import ScreenStyleModels
from screentone.render import ScreenStyleRenderer
from screentone.screenvae import ScreenVAEDecoder
from screentone.synthetic import synthetic_color_page


@pytest.fixture(scope="module")
def models() -> ScreenStyleModels:
    torch.manual_seed(20)  # narrow nets (fast); noise weights stay random, so each page needs its own noise
    return ScreenStyleModels(ColorToScreenMapGenerator(width=16).eval(), ScreenVAEDecoder(width=16).eval())


def test_noise_from_one_generator_per_page_equals_single_page_draws():
    batch = draw_noise((3, 2, 4, 5), [torch.Generator().manual_seed(s) for s in (7, 8, 7)], torch.device("cpu"))
    single = [torch.randn((1, 2, 4, 5), generator=torch.Generator().manual_seed(s)) for s in (7, 8, 7)]
    assert torch.equal(batch, torch.cat(single))
    assert torch.equal(batch[0], batch[2]) and not torch.equal(batch[0], batch[1])
    with pytest.raises(ValueError, match="2 noise generators for a batch of 3 pages"):
        draw_noise((3, 1, 2, 2), [torch.Generator(), torch.Generator()], torch.device("cpu"))


def test_small_convs_give_each_page_what_it_gets_alone():
    torch.manual_seed(0)
    conv = BatchInvariantConv2d(384, 384, 3, stride=2)  # a deep level: few pixels, where CPU kernels differ
    x = torch.randn(3, 384, 6, 10)
    with torch.inference_mode():
        assert torch.equal(conv(x), torch.cat([conv(x[i : i + 1]) for i in range(3)]))


@pytest.mark.parametrize("path", ["colorflow", "eroded-binarised"])
def test_render_batch_equals_per_page_renders(models, path):
    renderer = ScreenStyleRenderer(models, device="cpu", path=path)
    pages = [synthetic_color_page(72, 64, seed=s) for s in range(2)] + [synthetic_color_page(64, 88, seed=3)]
    pages.insert(1, pages[0])  # the same page twice in one batch, with another seed
    seeds = [5, 6, 7, 8]
    single = [renderer.render(page, seed) for page, seed in zip(pages, seeds, strict=True)]
    batched = renderer.render_batch(pages, seeds, batch_size=2)  # 72 x 64 pages in batches of 2 and 1, 64 x 88 alone
    assert all(np.array_equal(a, b) for a, b in zip(batched, single, strict=True))
    assert [tone.shape for tone in single] == [(72, 64)] * 3 + [(64, 88)]
    assert not np.array_equal(single[0], single[1])  # same page, other seed: other noise
    with pytest.raises(ValueError, match="2 pages but 1 seeds"):
        renderer.render_batch(pages[:2], seeds[:1])
