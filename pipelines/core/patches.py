"""How a page becomes the 9 patches the retrieval cache embeds: fitted to the frame size, 4 greyscale query crops
and 5 colour reference crops. Shared by the retrieval stage, the leakage check and colorize, so every one of them
cuts the same pixels."""

from __future__ import annotations

from typing import Any

from PIL import Image

from pipelines.core.encoders import grey_version
from pipelines.core.geometry import ASPECT_TOLERANCE, RESAMPLE_LANCZOS, fit_image, quadrant_boxes, reference_boxes


def patch_geometry(width: int, height: int, resample: str = RESAMPLE_LANCZOS) -> dict[str, Any]:
    """How patches are cut: part of the embeddings' fingerprint (another size or filter gives other vectors).

    The filter is named only when it is not the original Lanczos, so caches built before it was an option keep
    their fingerprints."""
    geometry = {
        "page_size": f"{width}x{height}",
        # The text names the pre-1.0 module path on purpose: it is part of stored fingerprints.
        "fit": f"pipelines.geometry.fit_image (resize; centre crop first if aspect is off by > {ASPECT_TOLERANCE})",
        "query": "greyscale (screentone.augment.to_grey) of the fitted page: 4 crops of 3/4 size, TL TR BL BR",
        "ref": "fitted colour page: the same 4 crops, then the whole page",
    }
    if resample != RESAMPLE_LANCZOS:
        geometry["fit_resample"] = resample
    return geometry


def page_patches(page: Image.Image, width: int, height: int, resample: str = RESAMPLE_LANCZOS) -> list[Image.Image]:
    """The 9 patches of a page: 4 query crops of its greyscale version, then 5 reference crops of the colour page."""
    fitted = fitted_page(page, width, height, resample)
    grey = grey_version(fitted)
    return [grey.crop(box) for box in quadrant_boxes(width, height)] + [
        fitted.crop(box) for box in reference_boxes(width, height)
    ]


def fitted_page(page: Image.Image, width: int, height: int, resample: str = RESAMPLE_LANCZOS) -> Image.Image:
    """A colour page fitted to the frame size, as every patch is cut from it."""
    return fit_image(page.convert("RGB"), width, height, resample=resample)
