"""Patch geometry and the composite layout of ColorFlow, as plain functions.

Shared by the retrieval job, the shard writer, training and inference, so every stage crops and places
patches identically. Boxes are (left, top, right, bottom) in pixels, right/bottom exclusive (PIL's convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]

QUERY_PATCH_NAMES = ("TL", "TR", "BL", "BR")
WHOLE_PAGE_PATCH = 4
ASPECT_TOLERANCE = 0.15  # a page within 15% of the target aspect is resized directly, else centre-cropped first

# Composite ring cells, as (row, col) of the 4x4 grid, per query patch and rank (best first): the best match
# sits beside the target, the third in the corner.
RING_CELLS: dict[int, tuple[tuple[int, int], ...]] = {
    0: ((1, 0), (0, 1), (0, 0)),
    1: ((1, 3), (0, 2), (0, 3)),
    2: ((2, 0), (3, 1), (3, 0)),
    3: ((2, 3), (3, 2), (3, 3)),
}
RANKS_PER_PATCH = 3

# How pages and patches are resampled. "bicubic" is the released app's way (`process_image` and its resizes: PIL
# bicubic, the crop box truncated, cropped before resizing); "lanczos" is the project's first choice, kept where
# stored bytes must not change (retrieval embeddings, screentone renders, shard frames, benchmark truth pages).
RESAMPLE_BICUBIC = "bicubic"
RESAMPLE_LANCZOS = "lanczos"
RESAMPLERS = (RESAMPLE_BICUBIC, RESAMPLE_LANCZOS)
_PIL_FILTERS = {RESAMPLE_BICUBIC: Image.Resampling.BICUBIC, RESAMPLE_LANCZOS: Image.Resampling.LANCZOS}


def pil_filter(resample: str) -> Image.Resampling:
    """The PIL filter of a resampler name; ValueError names the choices."""
    if resample not in _PIL_FILTERS:
        raise ValueError(f"resample {resample!r} is not one of {RESAMPLERS}")
    return _PIL_FILTERS[resample]


def quadrant_boxes(width: int, height: int) -> list[Box]:
    """The four 3/4-size crops with stride 1/4, in the order TL, TR, BL, BR.

    For sizes not divisible by 4 the crop is floor(3/4 size) and the right/bottom crops end exactly at the
    border, so the four boxes always cover the whole image.
    """
    if width < 4 or height < 4:
        raise ValueError(f"image {width}x{height} is too small for 3/4 crops (needs at least 4x4)")
    crop_w, crop_h = (3 * width) // 4, (3 * height) // 4
    right, bottom = width - crop_w, height - crop_h
    return [
        (0, 0, crop_w, crop_h),
        (right, 0, width, crop_h),
        (0, bottom, crop_w, height),
        (right, bottom, width, height),
    ]


def reference_boxes(width: int, height: int) -> list[Box]:
    """The five reference patches: the four quadrant crops, then the whole page (index 4)."""
    return [*quadrant_boxes(width, height), (0, 0, width, height)]


def fit_box(
    src_w: int, src_h: int, dst_w: int, dst_h: int, tolerance: float = ASPECT_TOLERANCE, *, truncate: bool = False
) -> Box:
    """The region of a src_w x src_h page to resize to dst_w x dst_h.

    The whole page if its aspect ratio is within `tolerance` of the target's (a mild stretch), else the largest
    centred crop with the target's aspect ratio. `truncate` is the released app's rule: the crop side truncated
    instead of rounded, and a page exactly `tolerance` off is cropped.
    """
    if min(src_w, src_h, dst_w, dst_h) <= 0:
        raise ValueError(f"sizes must be positive: source {src_w}x{src_h}, target {dst_w}x{dst_h}")
    src_aspect, dst_aspect = src_w / src_h, dst_w / dst_h
    error = abs(src_aspect / dst_aspect - 1.0)
    if error < tolerance or (error == tolerance and not truncate):
        return (0, 0, src_w, src_h)
    side = int if truncate else round
    if src_aspect > dst_aspect:  # too wide: crop the sides
        crop_w = max(1, side(src_h * dst_aspect))
        left = (src_w - crop_w) // 2
        return (left, 0, left + crop_w, src_h)
    crop_h = max(1, side(src_w / dst_aspect))
    top = (src_h - crop_h) // 2
    return (0, top, src_w, top + crop_h)


def fit_image(
    image: Image.Image,
    width: int,
    height: int,
    tolerance: float = ASPECT_TOLERANCE,
    *,
    resample: str = RESAMPLE_LANCZOS,
) -> Image.Image:
    """Fit a page to the target size as the paper does: resize, centre-cropping first if the aspect is far off.

    "bicubic" follows the released app's `process_image` exactly (truncated box, crop, then PIL bicubic); "lanczos"
    resizes the rounded box in one step (the project's first fit, kept where stored bytes must not change).
    """
    release = resample == RESAMPLE_BICUBIC
    box = fit_box(image.width, image.height, width, height, tolerance, truncate=release)
    if box == (0, 0, image.width, image.height) and image.size == (width, height):
        return image.copy()
    if release:
        return image.crop(box).resize((width, height), pil_filter(resample))
    return image.resize((width, height), pil_filter(resample), box=box)


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The GSRP size: `scale` times the training size, rounded to multiples of 8 (the VAE's factor)."""
    if scale <= 0:
        raise ValueError(f"hires scale must be positive, got {scale}")
    return max(8, 8 * round(width * scale / 8)), max(8, 8 * round(height * scale / 8))


@dataclass(frozen=True)
class CompositeLayout:
    """The 2W x 2H canvas: a 4x4 grid of W/2 x H/2 cells, the frame in the centre 2x2, references on the ring."""

    width: int  # target frame width W
    height: int  # target frame height H

    def __post_init__(self) -> None:
        if self.width % 16 or self.height % 16 or self.width <= 0 or self.height <= 0:
            raise ValueError(
                f"frame size {self.width}x{self.height} must be positive multiples of 16, so that every ring "
                "cell lands on whole latent pixels (VAE factor 8, cells of W/2 x H/2)"
            )

    @property
    def canvas_size(self) -> tuple[int, int]:
        return 2 * self.width, 2 * self.height

    @property
    def cell_size(self) -> tuple[int, int]:
        return self.width // 2, self.height // 2

    @property
    def patch_size(self) -> tuple[int, int]:
        """A retrieved patch is resized to the cell minus a 1-px white margin on each side."""
        cw, ch = self.cell_size
        return cw - 2, ch - 2

    @property
    def centre_box(self) -> Box:
        return (self.width // 2, self.height // 2, self.width // 2 + self.width, self.height // 2 + self.height)

    def cell_box(self, row: int, col: int) -> Box:
        cw, ch = self.cell_size
        return (col * cw, row * ch, (col + 1) * cw, (row + 1) * ch)

    def ring_box(self, query_patch: int, rank: int) -> Box:
        """Where the rank-th retrieval of a query patch goes (the inner box, inside the 1-px margin)."""
        left, top, right, bottom = self.cell_box(*RING_CELLS[query_patch][rank])
        return (left + 1, top + 1, right - 1, bottom - 1)

    def mask(self) -> np.ndarray:
        """Float32 2H x 2W mask: 1 on the reference ring (known), 0 on the centre (to generate)."""
        mask = np.ones((2 * self.height, 2 * self.width), dtype=np.float32)
        left, top, right, bottom = self.centre_box
        mask[top:bottom, left:right] = 0.0
        return mask

    def ring_canvas(self, patches: dict[tuple[int, int], Image.Image], resample: str = RESAMPLE_BICUBIC) -> Image.Image:
        """White RGB canvas with each (query_patch, rank) patch resized into its ring cell; centre left white.

        Bicubic by default, as the released app resizes its ring patches (sample format 1 used Lanczos)."""
        canvas = Image.new("RGB", self.canvas_size, (255, 255, 255))
        pw, ph = self.patch_size
        for (query_patch, rank), patch in sorted(patches.items()):
            left, top, _, _ = self.ring_box(query_patch, rank)
            canvas.paste(patch.convert("RGB").resize((pw, ph), pil_filter(resample)), (left, top))
        return canvas

    def compose(self, ring: Image.Image, centre: Image.Image | None) -> Image.Image:
        """Paste a W x H frame (any B&W variant or the colour frame) into the centre of a ring canvas.

        `centre=None` paints the centre black: the guider's references-only input.
        """
        if ring.size != self.canvas_size:
            raise ValueError(f"ring canvas is {ring.size}, expected {self.canvas_size}")
        out = ring.convert("RGB").copy()
        left, top, right, bottom = self.centre_box
        if centre is None:
            out.paste((0, 0, 0), (left, top, right, bottom))
        else:
            if centre.size != (self.width, self.height):
                raise ValueError(f"centre frame is {centre.size}, expected {(self.width, self.height)}")
            out.paste(centre.convert("RGB"), (left, top))
        return out

    def centre_only(self, centre: Image.Image) -> Image.Image:
        """Black canvas holding only the frame in the centre: the guider's frame-only input."""
        canvas = Image.new("RGB", self.canvas_size, (0, 0, 0))
        canvas.paste(centre.convert("RGB"), (self.width // 2, self.height // 2))
        return canvas

    def crop_centre(self, canvas: Image.Image) -> Image.Image:
        return canvas.crop(self.centre_box)
