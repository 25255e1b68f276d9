"""The page input styles of colorize: how a B&W page becomes the ICP frame (W x H) and the GSRP guide (the GSRP
size), the released app's way.

The app (its "Preprocess" step, then `colorize_image`) fits the page at 1.5x the frame size with its
`process_image` rule (PIL bicubic), turns that into the style's image, gives it to GSRP as is and to ICP resized
to W x H (bicubic). Styles, one vocabulary with `--benchmark`'s folders:

- ``grey``: the 1.5x page in greyscale (ITU-R 601 luma);
- ``screenstyle``: the app's "GrayImage(ScreenStyle)": the ScreenStyle rendering of the 1.5x page (our
  `screentone.render.ScreenStyleRenderer` on the local ScreenStyle weights, seeded per page) blended 50/50 with
  its greyscale (PIL `Image.blend`, as the app);
- ``halftone``: the same blend with the weight-free halftone renderer in place of ScreenStyle;
- ``sketch``: the app's "Sketch": the line art of the 1.5x page's grey (`model.line_extractor.LineExtractor`: the
  release's network on `LE/erika.pth`, or XDoG without it; `pipelines.core.page_styles.pages_line_art`, which the
  screentone stage uses for the samples' line art too);
- ``shading``: the app's "Sketch_Shading": that line art shaded by the grey (`screentone.shading`); GSRP gets the
  plain line art, as the app gives it.

sketch and shading are the line-art (PixArt) family's styles, the others the SD1.5 family's.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from inference.sources import ColorizeInputError
from pipelines.core.page_styles import pages_line_art, tone_frames

PAGE_STYLES = ("grey", "screenstyle", "halftone", "sketch", "shading")
LINE_ART_STYLES = ("sketch", "shading")  # the styles of the line-art (PixArt) family
RELEASED_SCREENSTYLE_FOLDER = "ScreenStyle"  # inside the released ColorFlow weights folder


def check_screenstyle_weights(folder: str | None) -> str:
    """The ScreenStyle weights folder, checked now: ColorizeInputError in one line when the files are missing."""
    from screentone.loader import find_screenstyle_files

    if folder is None:
        raise ColorizeInputError(
            "--style screenstyle needs the ScreenStyle weights: give --screenstyle-weights DIR (or --style grey)"
        )
    try:
        find_screenstyle_files(folder)
    except FileNotFoundError as exc:
        hint = "give --screenstyle-weights DIR or --style grey"
        raise ColorizeInputError(f"--style screenstyle: {exc}; {hint}") from None
    return str(Path(folder).absolute())


class PageStyler:
    """Turns a B&W page into (ICP frame W x H, GSRP guide at `sr_size`), both RGB, in one style."""

    def __init__(
        self,
        style: str,
        screenstyle_weights: str | None = None,
        device: str | None = None,
        line_extractor_weights: str | None = None,
    ) -> None:
        if style not in PAGE_STYLES:
            raise ColorizeInputError(f"--style {style!r}: choose one of {PAGE_STYLES}")
        self.style = style
        self._renderer = None
        self._lines = None
        if style in LINE_ART_STYLES:
            from model.line_extractor import LineExtractor

            self._lines = LineExtractor(line_extractor_weights, device)
        elif style == "screenstyle":
            from screentone.render import renderer_for

            self._renderer = renderer_for(f"screenstyle:{screenstyle_weights}", device)
        elif style == "halftone":
            from screentone.render import HalftoneRenderer

            self._renderer = HalftoneRenderer()

    def frames(
        self, page: Image.Image, size: tuple[int, int], sr_size: tuple[int, int], seed: int
    ) -> tuple[Image.Image, Image.Image]:
        """(the ICP frame, the GSRP guide): the page fitted at `sr_size`, styled, then resized to `size`."""
        if self._lines is not None:
            (line_art,) = pages_line_art([page], size, sr_size, self._lines.many)
            frame = line_art.shading if self.style == "shading" else line_art.sketch
            return frame.convert("RGB"), line_art.hires_lines.convert("RGB")
        return tone_frames(page, size, sr_size, self._renderer, seed)
