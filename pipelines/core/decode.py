"""Safe page decoding: bounded memory, upright RGB out, one clear error per bad file.

Every raw page goes through here. The pixel count declared in the header is checked before any pixel is
decoded, so a decompression bomb costs a header read, not gigabytes. Two entry points serve the two needs of
ingestion: `decode_for_analysis` decodes small (JPEG DCT scaling via `draft`, box `reduce` otherwise) for the
colour classifier, and `decode_upright` decodes at full quality, only for pages that are kept.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # ~ a 6400 x 10000 scan; a real manga page is 1-10 Mpx
DEFAULT_ANALYSIS_SIDE = 200  # longest side the classifier looks at (within a factor 1.5 either way)
ORIENTATION_TAG = 0x0112
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 degrees
_REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "I", "F", "YCbCr"})  # modes Image.reduce takes
PAPER_WHITE = (255, 255, 255)  # what transparent areas become: pages are printed on white
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class DecodeError(Exception):
    """A page cannot be decoded; the message names the page and the cause."""


@dataclass(frozen=True)
class ImageInfo:
    """What the header and the decoder say about a page (sizes after EXIF orientation)."""

    format: str
    mode: str  # as stored, before normalisation
    width: int
    height: int
    orientation: int  # EXIF orientation tag, 1 when absent


def _open(data: bytes, name: str, max_pixels: int) -> tuple[Image.Image, ImageInfo]:
    """Open (header only) and check the declared size against the pixel limit.

    Pillow itself refuses images above twice `Image.MAX_IMAGE_PIXELS` (~179 Mpx) at open; that caps any larger
    `max_pixels` and is reported the same way.
    """
    if not data:
        raise DecodeError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError(
            f"{name}: not an image: no decoder recognises its {len(data)} bytes (starts with {data[:16]!r})"
        ) from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(_bomb_message(name, exc, max_pixels)) from None
    except Exception as exc:  # noqa: BLE001 - a malformed header is this page's error
        raise DecodeError(f"{name}: corrupt image header: {type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise DecodeError(f"{name}: corrupt image header: declared size {width}x{height}")
    if width * height > max_pixels:
        raise DecodeError(
            f"{name}: decompression bomb refused: {image.format} declares {width}x{height} = {width * height} "
            f"pixels, above the limit of {max_pixels}"
        )
    orientation = _orientation(image)
    if orientation in _SWAPS_AXES:
        width, height = height, width
    return image, ImageInfo(image.format or "unknown", image.mode, width, height, orientation)


def _bomb_message(name: str, exc: Image.DecompressionBombError, max_pixels: int) -> str:
    """Pillow refused the image before our own check: report it against the configured limit, not Pillow's."""
    match = re.search(r"\((\d+) pixels\)", str(exc))
    declared = f"{int(match.group(1))} pixels" if match else "more pixels than Pillow opens"
    return f"{name}: decompression bomb refused: the image declares {declared}, above the limit of {max_pixels}"


def _orientation(image: Image.Image) -> int:
    try:
        value = int(image.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF means no orientation, not a broken page
        return 1
    return value if 1 <= value <= 8 else 1


def _load(image: Image.Image, name: str, max_pixels: int) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Image.DecompressionBombError as exc:
        raise DecodeError(_bomb_message(name, exc, max_pixels)) from None
    except OSError as exc:
        text = str(exc)
        cause = "truncated file" if "truncated" in text else "corrupt image data"
        raise DecodeError(f"{name}: {cause}: {image.format} decoder: {text}") from None
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on bad data
        raise DecodeError(f"{name}: corrupt image data: {image.format} decoder: {type(exc).__name__}: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: alpha composited on white, 16-bit/float rescaled, CMYK/palette converted."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;"):
        return Image.fromarray(_wide_to_uint8(np.asarray(image), mode), "L").convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, PAPER_WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _wide_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit integer and float pixels -> 0..255.

    `I;16*` is 16-bit by definition; `I` (32-bit, what some decoders give 16-bit files) is read as 16-bit when a
    value exceeds 255, else as 8-bit; `F` is read as 0..1 when no value exceeds 1, else as 0..255.
    """
    values = np.nan_to_num(values.astype(np.float32))
    peak = float(values.max()) if values.size else 0.0
    if mode.startswith("I;16") or (mode == "I" and peak > 255.0):
        values = values / 257.0
    elif mode == "F" and peak <= 1.0:
        values = values * 255.0
    return np.clip(values, 0, 255).round().astype(np.uint8)


def decode_for_analysis(
    data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, side: int = DEFAULT_ANALYSIS_SIDE
) -> tuple[np.ndarray, ImageInfo]:
    """A small upright RGB uint8 array (longest side within a factor 1.5 of `side`, unless the page is smaller).

    JPEG pages are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (`draft`), which is what makes the
    classifier cheaper than one full decode; other formats are decoded fully, then box-reduced.
    """
    image, info = _open(data, name, max_pixels)
    if image.format == "JPEG":
        scale = _dct_scale(max(image.size), side)
        if scale > 1:
            image.draft(None, (max(1, image.width // scale), max(1, image.height // scale)))
    _load(image, name, max_pixels)
    factor = round(max(image.size) / side)
    if factor >= 2 and image.mode in _REDUCIBLE_MODES:
        image = image.reduce(factor)  # in the stored mode: converting 1/factor^2 of the pixels is cheaper
        factor = 1
    rgb = to_rgb(image)
    if factor >= 2:
        rgb = rgb.reduce(factor)
    return np.asarray(upright(rgb, info.orientation)), info


def _dct_scale(longest: int, side: int) -> int:
    """The largest JPEG DCT scale (1/1, 1/2, 1/4, 1/8) whose result stays within a factor 1.5 below `side`."""
    for scale in (8, 4, 2):
        if longest / scale >= side / 1.5:
            return scale
    return 1


def upright(image: Image.Image, orientation: int) -> Image.Image:
    """Apply an EXIF orientation (1..8) to decoded pixels; 1 or unknown leaves the image as it is."""
    method = _TRANSPOSE.get(orientation)
    return image.transpose(method) if method is not None else image


def decode_upright(
    data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, longest_side: int | None = None
) -> tuple[Image.Image, ImageInfo]:
    """The page as upright RGB, downscaled (Lanczos) so its longest side is at most `longest_side`, never upscaled.

    JPEG pages bigger than twice the target are first decoded at a reduced DCT scale that stays at or above the
    target, so the final resize still has full detail to work with.
    """
    image, info = _open(data, name, max_pixels)
    stored_w, stored_h = image.size
    if longest_side and image.format == "JPEG" and max(stored_w, stored_h) >= 2 * longest_side:
        factor = max(stored_w, stored_h) / longest_side
        image.draft(None, (max(1, int(stored_w / factor)), max(1, int(stored_h / factor))))
    _load(image, name, max_pixels)
    rgb = to_rgb(image)
    rgb = upright(rgb, info.orientation)
    if longest_side and max(rgb.size) > longest_side:
        scale = longest_side / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return rgb, info
