"""How a B&W page becomes the ICP frame and the GSRP guide in a page style, the released app's way: one
implementation for colorize (`inference.styles.PageStyler`), the trainer's benchmark validation and, for the line
art, the screentone stage that writes it into the samples.

The page is fitted at the GSRP size with the app's `process_image` rule (PIL bicubic) and turned to greyscale.

- Tone styles (grey, halftone, ScreenStyle): a screentone renderer's tones of it are blended 50/50 with that grey
  (PIL `Image.blend`, as the app). That is the GSRP guide; the ICP frame is the guide fitted to W x H (bicubic).
- Line-art styles (sketch, shading): a line extractor turns that grey into line art, the GSRP guide of both; the
  sketch frame is the line art fitted to W x H (bicubic), the shading frame the line art shaded by the grey
  (`screentone.shading`) and fitted the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from pipelines.core.geometry import RESAMPLE_BICUBIC, fit_image
from pipelines.core.storage import sha256_file
from screentone.lines import XDOG

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


def line_extractor_id(weights: str | None) -> str:
    """What makes the line art, as data records it: ``xdog``, or ``<file stem>-<first 12 hex of its sha256>``
    (the contents, so a copied or renamed file keeps its renderings)."""
    if weights is None:
        return XDOG
    return f"{Path(weights).stem}-{sha256_file(weights)[:12]}"


@dataclass(frozen=True)
class LineArtFrames:
    """One page's line-art inputs, all mode L: the two ICP frames at W x H and the GSRP guide at the GSRP size."""

    sketch: Image.Image
    shading: Image.Image
    hires_lines: Image.Image


def line_art_grey(page: Image.Image, sr_size: tuple[int, int]) -> np.ndarray:
    """The grey the line extractor reads: the page fitted at the GSRP size (bicubic, the app's rule), uint8 H x W."""
    return np.asarray(fit_image(page.convert("RGB"), *sr_size, resample=RESAMPLE_BICUBIC).convert("L"))


def line_art_frames(lines: np.ndarray, grey: np.ndarray, size: tuple[int, int]) -> LineArtFrames:
    """The sketch and shading frames at `size` and the GSRP guide, from a page's line art and its grey (both at
    the GSRP size, from `line_art_grey`)."""
    from screentone.shading import shade_lines

    def frame(image: np.ndarray) -> Image.Image:
        return fit_image(Image.fromarray(image, mode="L"), *size, resample=RESAMPLE_BICUBIC)

    return LineArtFrames(frame(lines), frame(shade_lines(lines, grey)), Image.fromarray(lines, mode="L"))


def pages_line_art(
    pages: Sequence[Image.Image],
    size: tuple[int, int],
    sr_size: tuple[int, int],
    extract: Callable[[Sequence[np.ndarray]], list[np.ndarray]],
) -> list[LineArtFrames]:
    """`line_art_frames` of several pages, their line art extracted in one call (`extract`: greys -> line art, e.g.
    `model.line_extractor.LineExtractor.many`, which batches the network)."""
    greys = [line_art_grey(page, sr_size) for page in pages]
    return [line_art_frames(lines, grey, size) for lines, grey in zip(extract(greys), greys, strict=True)]
