"""Sample assembly and its inverse: members, encodings, ring placement, and composites rebuilt from a sample."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from pipelines.core.geometry import CompositeLayout, fit_image, reference_boxes
from pipelines.core.pagestore import encode_page
from pipelines.core.sample_inputs import build_training_inputs, composite_inputs, decode_sample
from pipelines.core.samples import (
    FIELDS,
    LINE_ART_VARIANTS,
    ChapterPages,
    FrameRecord,
    SampleConfig,
    SampleError,
    SampleFormatError,
    build_sample,
    retrieval_grid,
)
from pipelines.screentone.stage import ScreentoneOptions, render_frame, render_frames
from screentone.augment import blend, sample_alpha
from screentone.render import renderer_for
from screentone.synthetic import synthetic_color_page

W, H = 128, 192
CONFIG = SampleConfig(width=W, height=H, encoder_id="enc-test", renderer_id="halftone-test", code_version={"v": 1})
PAGE_IDS = [f"page{i:02d}" for i in range(6)]
FRAME = FrameRecord(frame_id="page00", series="s", chapter_id="c0", chapter="ch01", page_index=0)


@pytest.fixture(scope="module")
def chapter() -> dict:
    # pages of different aspect ratios: the 200x240 one is centre-cropped by the fit, the others resized
    sizes = [(160, 240), (200, 240), (170, 250), (160, 240), (150, 230), (160, 240)]
    images = {
        p: Image.fromarray(synthetic_color_page(h, w, seed=i))
        for i, (p, (w, h)) in enumerate(zip(PAGE_IDS, sizes, strict=True))
    }
    encoded = {p: encode_page(im, "png") for p, im in images.items()}
    options = ScreentoneOptions(width=W, height=H, hires_scale=CONFIG.hires_scale)
    tones = render_frame(images[FRAME.frame_id], FRAME.frame_id, options, renderer_for("halftone"))
    from model.line_extractor import LineExtractor

    made, errors = render_frames(
        {FRAME.frame_id: encoded[FRAME.frame_id]}, options, renderer_for("halftone"), LineExtractor()
    )
    assert not errors and made[FRAME.frame_id]["train"] == tones["train"]  # the batch path renders the same tone
    line_art = {variant: made[FRAME.frame_id][variant] for variant in LINE_ART_VARIANTS.values()}
    rows = [
        {
            "query_patch": q,
            "rank": r,
            "ref_page_id": PAGE_IDS[1 + (q + r) % 5],
            "ref_patch": (2 * q + r) % 5,
            "score": 0.9 - 0.1 * r,
        }
        for q in range(4)
        for r in range(3)
    ]
    return {"images": images, "encoded": encoded, "tones": tones, "rows": rows, "line_art": line_art}


def _sample(chapter: dict, **overrides) -> dict:
    args = {
        "frame": FRAME,
        "pages": ChapterPages(chapter["encoded"]),
        "retrievals": chapter["rows"],
        "tone": chapter["tones"]["train"],
        "hires_tone": chapter["tones"]["hires"],
        "config": CONFIG,
        "line_art": chapter["line_art"],
    }
    args.update(overrides)
    return build_sample(**args)


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_sample_has_every_field_in_the_documented_encodings(chapter: dict) -> None:
    sample = _sample(chapter)
    assert set(sample) == {"__key__", *FIELDS} and sample["__key__"] == FRAME.frame_id
    color = fit_image(chapter["images"][FRAME.frame_id], W, H)
    hr_size = CONFIG.hires_size
    assert hr_size == (192, 288)
    for name, fmt, mode, size in [
        ("color.jpg", "JPEG", "RGB", (W, H)),
        ("grey.png", "PNG", "L", (W, H)),
        ("tone.png", "PNG", "L", (W, H)),
        ("ring.jpg", "JPEG", "RGB", (2 * W, 2 * H)),
        ("hr_color.jpg", "JPEG", "RGB", hr_size),
        ("hr_grey.png", "PNG", "L", hr_size),
        ("hr_tone.png", "PNG", "L", hr_size),
        ("sketch.png", "PNG", "L", (W, H)),
        ("shading.png", "PNG", "L", (W, H)),
        ("hr_sketch.png", "PNG", "L", hr_size),
    ]:
        image = _open(sample[name])
        assert (image.format, image.mode, image.size) == (fmt, mode, size), name
        if fmt == "JPEG":
            assert JpegImagePlugin.get_sampling(image) == 0, f"{name} must keep full chroma (4:4:4)"
    # greyscale is lossless and exactly the luma of the fitted colour frame; tone is stored as rendered
    assert np.array_equal(np.asarray(_open(sample["grey.png"])), np.asarray(color.convert("L")))
    assert sample["tone.png"] == chapter["tones"]["train"] and sample["hr_tone.png"] == chapter["tones"]["hires"]
    color_error = np.abs(np.asarray(_open(sample["color.jpg"]), np.int16) - np.asarray(color, np.int16)).mean()
    assert color_error < 3.0  # q95 JPEG


def test_metadata_records_the_frame_the_retrievals_and_the_versions(chapter: dict) -> None:
    meta = json.loads(_sample(chapter)["json"])
    assert meta["frame_id"] == FRAME.frame_id and meta["series"] == "s" and meta["chapter_id"] == "c0"
    assert meta["size"] == [W, H] and meta["hires_size"] == [192, 288]
    assert meta["encoder_id"] == "enc-test" and meta["renderer_id"] == "halftone-test" and meta["code_version"]
    assert [(r["query_patch"], r["rank"]) for r in meta["retrievals"]] == [(q, r) for q in range(4) for r in range(3)]
    assert meta["retrievals"][0]["ref_page_id"] == chapter["rows"][0]["ref_page_id"]


def test_ring_cells_hold_the_retrieved_patches_and_the_centre_is_empty(chapter: dict) -> None:
    ring = np.asarray(_open(_sample(chapter)["ring.jpg"]), np.int16)
    layout = CompositeLayout(W, H)
    pw, ph = layout.patch_size
    for row in chapter["rows"]:
        page = fit_image(chapter["images"][row["ref_page_id"]], W, H)
        expected = page.crop(reference_boxes(W, H)[row["ref_patch"]]).resize((pw, ph), Image.Resampling.LANCZOS)
        left, top, right, bottom = layout.ring_box(row["query_patch"], row["rank"])
        error = np.abs(ring[top:bottom, left:right] - np.asarray(expected, np.int16)).mean()
        assert error < 4.0, (row, error)
        wrong = page.crop(reference_boxes(W, H)[(row["ref_patch"] + 1) % 5]).resize((pw, ph))
        assert np.abs(ring[top:bottom, left:right] - np.asarray(wrong, np.int16)).mean() > 2 * error
    left, top, right, bottom = layout.centre_box
    assert ring[top + 2 : bottom - 2, left + 2 : right - 2].min() >= 250


@pytest.mark.parametrize("reader", ["bytes", "wids", "pil"])
def test_decode_accepts_what_each_reader_yields(chapter: dict, reader: str) -> None:
    sample = _sample(chapter)
    if reader == "wids":  # wids: keys with a leading dot, values as byte streams
        sample = {
            ("." + k if k != "__key__" else k): (io.BytesIO(v) if isinstance(v, bytes) else v)
            for k, v in sample.items()
        }
    elif reader == "pil":  # HF datasets: images decoded, JSON parsed
        sample = {
            k: (json.loads(v) if k == "json" else _open(v) if isinstance(v, bytes) else v) for k, v in sample.items()
        }
    decoded = decode_sample(sample)
    assert decoded.key == FRAME.frame_id and decoded.meta["frame_id"] == FRAME.frame_id
    assert decoded.ring.size == (2 * W, 2 * H) and decoded.hr_tone.size == (192, 288)
    assert np.array_equal(np.asarray(decoded.tone), np.asarray(_open(chapter["tones"]["train"])))


def test_training_inputs_rebuild_the_composites_and_mask(chapter: dict) -> None:
    decoded = decode_sample(_sample(chapter))
    layout = decoded.layout
    left, top, right, bottom = layout.centre_box
    tone = build_training_inputs(decoded, "tone")
    assert tone.alpha == 1.0
    c_bw, c_color = np.asarray(tone.c_bw), np.asarray(tone.c_color)
    assert c_bw.shape == (2 * H, 2 * W, 3)
    assert np.array_equal(c_bw[top:bottom, left:right, 0], np.asarray(decoded.tone))
    assert np.array_equal(c_color[top:bottom, left:right], np.asarray(decoded.color))
    ring = np.asarray(decoded.ring)
    outside = tone.mask.astype(bool)
    assert np.array_equal(c_bw[outside], ring[outside]) and np.array_equal(c_color[outside], ring[outside])
    assert tone.mask.shape == (2 * H, 2 * W) and tone.mask[top:bottom, left:right].max() == 0.0
    assert tone.mask.sum() == 3 * W * H  # the ring is three quarters of the canvas
    refs_only, frame_only = np.asarray(tone.refs_only), np.asarray(tone.frame_only)
    assert refs_only[top:bottom, left:right].max() == 0 and np.array_equal(refs_only[outside], ring[outside])
    assert frame_only[outside].max() == 0
    assert np.array_equal(frame_only[top:bottom, left:right], np.asarray(tone.bw))
    assert tone.hr_bw.size == tone.hr_color.size == (192, 288)

    grey = build_training_inputs(decoded, "grey")
    assert np.array_equal(np.asarray(grey.bw)[..., 0], np.asarray(decoded.grey))
    half = build_training_inputs(decoded, 0.5)
    expected = blend(np.asarray(decoded.grey), np.asarray(decoded.tone), 0.5)
    assert np.array_equal(np.asarray(half.bw)[..., 0], expected)
    assert not np.array_equal(expected, np.asarray(decoded.grey))
    with pytest.raises(ValueError, match="variant"):
        build_training_inputs(decoded, "sepia")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        build_training_inputs(decoded, 1.5)


def test_default_variant_is_the_screenstyle_draw_of_seed_epoch_and_key(chapter: dict) -> None:
    decoded = decode_sample(_sample(chapter))
    default = build_training_inputs(decoded)
    expected_alpha = sample_alpha(0, 0, decoded.key)
    assert default.alpha == expected_alpha and 0.0 < default.alpha < 1.0
    expected = blend(np.asarray(decoded.grey), np.asarray(decoded.tone), expected_alpha)
    assert np.array_equal(np.asarray(default.bw)[..., 0], expected)
    hr_grey, hr_tone = np.asarray(decoded.hr_grey, np.float64), np.asarray(decoded.hr_tone, np.float64)
    hr_expected = np.rint((1 - expected_alpha) * hr_grey + expected_alpha * hr_tone).astype(np.uint8)
    hr_bw = np.asarray(default.hr_bw)
    assert hr_bw.shape == (*hr_expected.shape, 3) and (hr_bw == hr_expected[..., None]).all()  # GSRP's input by value
    assert not np.array_equal(hr_expected, hr_grey) and not np.array_equal(hr_expected, hr_tone)  # a true blend
    assert build_training_inputs(decoded, epoch=1).alpha == sample_alpha(0, 1, decoded.key) != default.alpha
    assert build_training_inputs(decoded, seed=7).alpha == sample_alpha(7, 0, decoded.key)
    canvases = composite_inputs(decoded.layout, decoded.ring, default.bw)
    assert np.array_equal(np.asarray(canvases.c_bw), np.asarray(default.c_bw))
    assert np.array_equal(np.asarray(canvases.refs_only), np.asarray(default.refs_only))
    assert np.array_equal(np.asarray(canvases.frame_only), np.asarray(default.frame_only))


def test_missing_or_wrong_screentone_is_a_sample_error_naming_the_frame(chapter: dict) -> None:
    with pytest.raises(SampleError, match="page00.*no 'train' screentone"):
        _sample(chapter, tone=None)
    with pytest.raises(SampleError, match="page00.*'hires' screentone is 128x192, expected 192x288"):
        _sample(chapter, hires_tone=chapter["tones"]["train"])
    jpeg = io.BytesIO()
    _open(chapter["tones"]["train"]).save(jpeg, format="JPEG")
    with pytest.raises(SampleError, match="expected PNG L"):
        _sample(chapter, tone=jpeg.getvalue())


def test_incomplete_or_inconsistent_retrievals_are_sample_errors(chapter: dict) -> None:
    rows = chapter["rows"]
    with pytest.raises(SampleError, match="1 of 12 ring cells"):
        _sample(chapter, retrievals=rows[:-1])
    with pytest.raises(SampleError, match="two retrieval rows"):
        _sample(chapter, retrievals=rows + [rows[0]])
    with pytest.raises(SampleError, match="the frame itself"):
        _sample(chapter, retrievals=[{**r, "ref_page_id": FRAME.frame_id} for r in rows])
    with pytest.raises(SampleError, match="not in its chapter's page store"):
        _sample(chapter, retrievals=[{**r, "ref_page_id": "elsewhere"} for r in rows])
    deeper = rows + [{**rows[0], "rank": 3}]  # a cache built with k = 4: rank 3 is not used
    assert len(retrieval_grid(FRAME.frame_id, deeper)) == 12


def test_frame_ids_that_are_not_webdataset_keys_are_refused(chapter: dict) -> None:
    with pytest.raises(SampleError, match="cannot be a WebDataset key"):
        _sample(chapter, frame=FrameRecord("a.b", "s", "c0", "ch01", 0))


def test_the_line_art_members_are_what_colorize_makes_of_the_page_and_feed_the_line_art_variants(chapter) -> None:
    from inference.styles import PageStyler

    sample = _sample(chapter)
    page = chapter["images"][FRAME.frame_id]
    for style, member in (("sketch", "sketch.png"), ("shading", "shading.png")):
        frame, guide = PageStyler(style).frames(page, (W, H), CONFIG.hires_size, seed=0)
        assert np.array_equal(np.asarray(_open(sample[member])), np.asarray(frame)[..., 0]), style
        assert np.array_equal(np.asarray(_open(sample["hr_sketch.png"])), np.asarray(guide)[..., 0])
    sketch, shading = (np.asarray(_open(sample[m])) for m in ("sketch.png", "shading.png"))
    assert (sketch == 0).any() and (sketch == 255).mean() > 0.5 and not np.array_equal(sketch, shading)
    decoded = decode_sample(sample)
    inputs = build_training_inputs(decoded, "shading")
    assert inputs.alpha == 0.0 and np.array_equal(np.asarray(inputs.bw)[..., 0], shading)
    assert np.array_equal(np.asarray(inputs.hr_bw)[..., 0], np.asarray(decoded.hr_sketch))  # GSRP: the plain lines
    with pytest.raises(SampleError, match="no 'hires_sketch' screentone"):
        _sample(chapter, line_art={**chapter["line_art"], "hires_sketch": None})


def test_a_format_2_sample_reads_without_line_art_and_refuses_the_line_art_variants(chapter: dict) -> None:
    sample = {k: v for k, v in _sample(chapter).items() if k not in ("sketch.png", "shading.png", "hr_sketch.png")}
    sample["json"] = json.dumps({**json.loads(sample["json"]), "sample_format_version": 2}).encode()
    decoded = decode_sample(sample)
    assert decoded.sketch is None and build_training_inputs(decoded, "tone").alpha == 1.0
    with pytest.raises(SampleFormatError, match="version 2, without line art; the 'sketch' style needs version 3"):
        build_training_inputs(decoded, "sketch")
    with pytest.raises(KeyError, match=r"lacks fields \['hr_sketch.png'\]"):
        decode_sample({**sample, "sketch.png": b"", "shading.png": b"", "json": _sample(chapter)["json"]})
