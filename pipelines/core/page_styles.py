"""How a B&W page becomes the ICP frame and the GSRP guide in a tone style (grey, halftone, ScreenStyle), the
released app's way: one implementation for colorize (`inference.styles.PageStyler`) and the trainer's benchmark
validation.

The page is fitted at the GSRP size with the app's `process_image` rule (PIL bicubic) and turned to greyscale; a
screentone renderer's tones of it are blended 50/50 with that grey (PIL `Image.blend`, as the app). That is the
GSRP guide; the ICP frame is the guide fitted to W x H (bicubic).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from PIL import Image

from pipelines.core.geometry import RESAMPLE_BICUBIC, fit_image

STYLE_BLEND = 0.5  # the app's Image.blend(screen, grey, 0.5)


class ToneRenderer(Protocol):
    def render(self, rgb: np.ndarray, seed: int) -> np.ndarray: ...


def tone_frames(
    page: Image.Image, size: tuple[int, int], sr_size: tuple[int, int], renderer: ToneRenderer | None, seed: int
) -> tuple[Image.Image, Image.Image]:
    """(the ICP frame at `size`, the GSRP guide at `sr_size`), both RGB; no renderer: the grey style."""
    hires = fit_image(page.convert("RGB"), *sr_size, resample=RESAMPLE_BICUBIC)
    grey = hires.convert("L").convert("RGB")
    if renderer is None:
        guide = grey
    else:
        tone = Image.fromarray(renderer.render(np.asarray(hires), seed), mode="L")
        guide = Image.blend(tone.convert("RGB"), grey, STYLE_BLEND)
    return fit_image(guide, *size, resample=RESAMPLE_BICUBIC), guide
