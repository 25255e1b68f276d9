"""Safe decoding: orientation, mode normalisation, reduced-scale decode, and one clear error per bad file."""

from __future__ import annotations

import io
import resource
import struct
import zlib

import numpy as np
import pytest
from PIL import ExifTags, Image

from pipelines.core.decode import DecodeError, decode_for_analysis, decode_upright, to_rgb


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def _marked_page(width: int = 60, height: int = 90) -> Image.Image:
    """White page with a red block in the top-left corner: shows which way is up."""
    page = Image.new("RGB", (width, height), (255, 255, 255))
    page.paste((255, 0, 0), (0, 0, width // 3, height // 4))
    return page


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG declaring width x height: a few KB on disk."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows = zlib.compress(bytes(1 + (width + 7) // 8) * height, 9)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "orientation, stored_rotation", [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)]
)
def test_exif_orientation_is_applied(orientation: int, stored_rotation: Image.Transpose) -> None:
    upright = _marked_page()
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    data = _encode(upright.transpose(stored_rotation), "JPEG", quality=95, exif=exif)
    image, info = decode_upright(data, "s/c/1.jpg")
    assert info.orientation == orientation
    assert (info.width, info.height) == image.size == upright.size
    pixels = np.asarray(image).astype(int)
    assert pixels[5, 5, 0] > 200 and pixels[5, 5, 1] < 60  # red block back in the top-left corner
    assert pixels[-5, -5].min() > 200
    small, small_info = decode_for_analysis(data, "s/c/1.jpg", side=16)
    assert small_info == info and small.shape[0] > small.shape[1]  # upright: taller than wide, like the page
    assert small[1, 1, 0] > 200 and small[1, 1, 1] < 80 and small[-2, -2].min() > 200


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),  # fully transparent black -> paper white
        (Image.new("RGBA", (4, 4), (0, 0, 255, 255)), (0, 0, 255)),
        (Image.new("RGBA", (4, 4), (0, 0, 0, 128)), (127, 127, 127)),
        (Image.new("I;16", (4, 4), 65535), (255, 255, 255)),
        (Image.new("I;16", (4, 4), 32896), (128, 128, 128)),
        (Image.new("I;16", (4, 4), 200), (1, 1, 1)),  # a dark 16-bit page stays dark
        (Image.new("I", (4, 4), 1000), (4, 4, 4)),
        (Image.new("F", (4, 4), 0.5), (128, 128, 128)),
        (Image.new("1", (4, 4), 1), (255, 255, 255)),
        (Image.new("L", (4, 4), 77), (77, 77, 77)),
    ],
    ids=lambda v: getattr(v, "mode", str(v)),
)
def test_modes_are_normalised_to_rgb(image: Image.Image, expected: tuple[int, int, int]) -> None:
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert np.abs(np.asarray(rgb)[0, 0].astype(int) - expected).max() <= 1


def test_palette_with_transparency_and_16_bit_png_files() -> None:
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    data = _encode(palette, "PNG", transparency=1)  # index 1 (red) is transparent -> white
    small, info = decode_for_analysis(data, "p.png")
    assert info.mode == "P" and small.dtype == np.uint8 and tuple(small[0, 0]) == (255, 255, 255)
    wide = Image.fromarray(np.full((4, 4), 257 * 200, np.uint16))
    small, info = decode_for_analysis(_encode(wide, "PNG"), "w.png")
    assert info.mode.startswith("I") and tuple(small[0, 0]) == (200, 200, 200)


def test_jpeg_is_decoded_at_reduced_scale_and_others_box_reduced() -> None:
    page = Image.new("RGB", (1200, 1800), (200, 30, 30))
    small, info = decode_for_analysis(_encode(page, "JPEG", quality=90), "big.jpg", side=200)
    assert (info.width, info.height) == (1200, 1800)
    assert 200 <= max(small.shape[:2]) < 400 and small.shape[2] == 3
    small, _ = decode_for_analysis(_encode(page, "PNG"), "big.png", side=200)
    assert 200 <= max(small.shape[:2]) < 400


def test_store_decode_downscales_but_never_upscales() -> None:
    big = _encode(Image.new("RGB", (1000, 1500), (10, 200, 10)), "JPEG", quality=90)
    image, _ = decode_upright(big, "b.jpg", longest_side=600)
    assert image.size == (400, 600) and image.mode == "RGB"
    image, _ = decode_upright(big, "b.jpg", longest_side=None)
    assert image.size == (1000, 1500)
    small = _encode(Image.new("RGB", (100, 150), (10, 200, 10)), "PNG")
    image, _ = decode_upright(small, "s.png", longest_side=600)
    assert image.size == (100, 150)


def test_broken_files_raise_a_reason_naming_the_file() -> None:
    jpeg = _encode(_marked_page(300, 400), "JPEG", quality=90)
    cases = {
        "s1/ch1/empty.jpg": (b"", "empty file"),
        "s1/ch1/text.jpg": (b"<html>404 Not Found</html>", "not an image"),
        "s1/ch1/cut.jpg": (jpeg[: len(jpeg) // 3], "truncated"),
        "s1/ch1/header.png": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00", "s1/ch1/header.png"),
    }
    for name, (data, cause) in cases.items():
        for decode in (decode_for_analysis, decode_upright):
            with pytest.raises(DecodeError) as caught:
                decode(data, name)
            assert name in str(caught.value) and cause in str(caught.value)


def test_decompression_bombs_are_refused_from_the_header() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Above Pillow's own limit (which refuses at open): the row still names the configured limit, not Pillow's.
    with pytest.raises(
        DecodeError,
        match=r"s/c/bomb.png: decompression bomb refused: the image declares 900000000 pixels, above the limit of "
        r"64000000$",
    ):
        decode_for_analysis(_bomb_png(30000, 30000), "s/c/bomb.png")
    # Under Pillow's own limit, the configured one still applies.
    with pytest.raises(DecodeError, match=r"4000x4000 = 16000000 pixels, above the limit of 1000000"):
        decode_upright(_bomb_png(4000, 4000), "s/c/b.png", max_pixels=1_000_000)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200_000  # decoding 900 Mpx would have needed ~900 MB


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_multi_frame_files_decode_their_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (40, 60), color) for color in ((250, 0, 0), (0, 0, 250), (0, 250, 0))]
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 3
    image, _ = decode_upright(data, f"s/c/anim.{fmt.lower()}")
    small, _ = decode_for_analysis(data, f"s/c/anim.{fmt.lower()}", side=16)
    for pixel in (np.asarray(image)[5, 5], small[1, 1]):
        assert pixel[0] > 200 and pixel[1] < 30 and pixel[2] < 30  # red: the first frame
