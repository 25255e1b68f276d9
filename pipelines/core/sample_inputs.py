"""Reading a sample back: decode it as any reader yields it, and build what ICP and GSRP consume from it.

Kept apart from `pipelines.core.samples` (which writes samples) because the shard fingerprint covers the code that
produces shard bytes: changing how training reads or stitches a sample must not invalidate finished shards.
`composite_inputs` is the one composite of the project: the trainers, their validation and `jobs.colorize` all call
it, so a page is stitched identically everywhere.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipelines.core.geometry import CompositeLayout
from pipelines.core.samples import (
    FIELD_COLOR,
    FIELD_GREY,
    FIELD_HR_COLOR,
    FIELD_HR_GREY,
    FIELD_HR_SKETCH,
    FIELD_HR_TONE,
    FIELD_META,
    FIELD_RING,
    FIELD_SHADING,
    FIELD_SKETCH,
    FIELD_TONE,
    LINE_ART_FIELDS,
    check_sample_format_version,
    fields_of_version,
    require_line_art,
)

VARIANTS = ("tone", "grey")
SCREENSTYLE = "screenstyle"  # the random grey/tone interpolation, drawn per (seed, epoch, sample)
# the line-art family's B&W frames: the sample's member of that name; GSRP's guide is the plain line art for both
LINE_ART_MEMBERS = {"sketch": FIELD_SKETCH, "shading": FIELD_SHADING}


@dataclass
class DecodedSample:
    key: str
    color: Image.Image  # RGB, W x H
    grey: Image.Image  # L, W x H
    tone: Image.Image  # L, W x H
    ring: Image.Image  # RGB, 2W x 2H, centre white
    hr_color: Image.Image  # RGB, GSRP size
    hr_grey: Image.Image
    hr_tone: Image.Image
    meta: dict[str, Any]
    sketch: Image.Image | None = None  # L, W x H; the line-art members, from sample format 3 (None before)
    shading: Image.Image | None = None
    hr_sketch: Image.Image | None = None  # L, GSRP size

    @property
    def layout(self) -> CompositeLayout:
        return CompositeLayout(self.color.width, self.color.height)


def _normalise_field(name: str) -> str:
    return name[1:] if name.startswith(".") else name


def as_image(value: Any, name: str, mode: str) -> Image.Image:
    """Accept what each reader yields: raw bytes (webdataset), a byte stream (wids), a PIL image (HF datasets)."""
    if isinstance(value, Image.Image):
        image = value
    else:
        if isinstance(value, Mapping) and "bytes" in value:  # HF's undecoded image dict
            value = value["bytes"]
        data = value.read() if hasattr(value, "read") else value
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"sample field {name!r}: expected image bytes, a stream or a PIL image, got {type(value)}")
        image = Image.open(io.BytesIO(bytes(data)))
        image.load()
    return image if image.mode == mode else image.convert(mode)


def as_meta(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    data = value.read() if hasattr(value, "read") else value
    return json.loads(bytes(data).decode() if not isinstance(data, str) else data)


def decode_sample(sample: Mapping[str, Any]) -> DecodedSample:
    """Decode a sample as any of the three readers returns it (raw bytes, streams or PIL images), and check it."""
    fields = {_normalise_field(k): v for k, v in sample.items()}
    if FIELD_META not in fields:
        raise KeyError(f"sample {fields.get('__key__')!r} has no {FIELD_META!r} member")
    meta = as_meta(fields[FIELD_META])
    version = check_sample_format_version(meta.get("sample_format_version"), f"sample {fields.get('__key__')!r}")
    expected_fields = fields_of_version(version)
    missing = [name for name in expected_fields if name not in fields]
    if missing:
        raise KeyError(
            f"sample {fields.get('__key__')!r} lacks fields {missing}; a sample of format {version} has "
            f"{list(expected_fields)}"
        )
    line_art = {name: as_image(fields[name], name, "L") if name in fields else None for name in LINE_ART_FIELDS}
    decoded = DecodedSample(
        key=str(fields.get("__key__", meta.get("key"))),
        color=as_image(fields[FIELD_COLOR], FIELD_COLOR, "RGB"),
        grey=as_image(fields[FIELD_GREY], FIELD_GREY, "L"),
        tone=as_image(fields[FIELD_TONE], FIELD_TONE, "L"),
        ring=as_image(fields[FIELD_RING], FIELD_RING, "RGB"),
        hr_color=as_image(fields[FIELD_HR_COLOR], FIELD_HR_COLOR, "RGB"),
        hr_grey=as_image(fields[FIELD_HR_GREY], FIELD_HR_GREY, "L"),
        hr_tone=as_image(fields[FIELD_HR_TONE], FIELD_HR_TONE, "L"),
        meta=meta,
        sketch=line_art[FIELD_SKETCH],
        shading=line_art[FIELD_SHADING],
        hr_sketch=line_art[FIELD_HR_SKETCH],
    )
    size, hr = tuple(meta["size"]), tuple(meta["hires_size"])
    expected = {
        FIELD_COLOR: (decoded.color, size),
        FIELD_GREY: (decoded.grey, size),
        FIELD_TONE: (decoded.tone, size),
        FIELD_RING: (decoded.ring, (2 * size[0], 2 * size[1])),
        FIELD_HR_COLOR: (decoded.hr_color, hr),
        FIELD_HR_GREY: (decoded.hr_grey, hr),
        FIELD_HR_TONE: (decoded.hr_tone, hr),
        FIELD_SKETCH: (decoded.sketch, size),
        FIELD_SHADING: (decoded.shading, size),
        FIELD_HR_SKETCH: (decoded.hr_sketch, hr),
    }
    wrong = {name: image.size for name, (image, want) in expected.items() if image is not None and image.size != want}
    if wrong:
        raise ValueError(f"sample {decoded.key!r}: fields with sizes that disagree with its metadata: {wrong}")
    return decoded


@dataclass
class CompositeInputs:
    """The four canvases ICP sees for one frame: built by `composite_inputs`, the one function that training,
    validation and colorize all use, so a page is stitched identically everywhere."""

    c_bw: Image.Image  # references on the ring + the B&W frame in the centre (2W x 2H)
    mask: np.ndarray  # float32 2H x 2W: 1 on the ring (known), 0 on the centre (to generate)
    refs_only: Image.Image  # the guider's references-only input: ring with a black centre
    frame_only: Image.Image  # the guider's frame-only input: black canvas with the B&W frame in the centre


def composite_inputs(layout: CompositeLayout, ring: Image.Image, bw: Image.Image) -> CompositeInputs:
    """C_bw, the mask and the guider's two canvases from a ring canvas and a W x H B&W frame."""
    return CompositeInputs(
        c_bw=layout.compose(ring, bw),
        mask=layout.mask(),
        refs_only=layout.compose(ring, None),
        frame_only=layout.centre_only(bw),
    )


@dataclass
class TrainingInputs:
    """What one ICP + GSRP training step consumes, built from a sample alone."""

    alpha: float  # weight of the screentone in the B&W frame (0 = greyscale, 1 = pure screentone)
    bw: Image.Image  # the B&W frame, W x H, RGB
    color: Image.Image  # the colour frame, W x H
    c_bw: Image.Image  # references on the ring + the B&W frame in the centre (2W x 2H)
    c_color: Image.Image  # references on the ring + the colour frame in the centre (the target)
    mask: np.ndarray  # float32 2H x 2W: 1 on the ring (known), 0 on the centre (to generate)
    refs_only: Image.Image  # the guider's references-only input: ring with a black centre
    frame_only: Image.Image  # the guider's frame-only input: black canvas with the B&W frame in the centre
    hr_bw: Image.Image  # GSRP's high-resolution B&W frame, same variant
    hr_color: Image.Image  # GSRP's target


def variant_alpha(
    variant: str | float, key: str = "", *, seed: int = 0, epoch: int = 0, alpha_range: tuple[float, float] = (0.0, 1.0)
) -> float:
    """The tone weight of a B&W variant.

    "screenstyle" -> the project's one random draw (`screentone.augment.sample_alpha` of seed, epoch and the
    sample key: the paper's random interpolation); "tone" -> 1; "grey" -> 0; a number in [0, 1] -> itself; the
    line-art variants ("sketch", "shading") hold no tone: 0.
    """
    if isinstance(variant, str):
        if variant == SCREENSTYLE:
            from screentone.augment import sample_alpha

            return sample_alpha(seed, epoch, key, *alpha_range)
        if variant not in (*VARIANTS, *LINE_ART_MEMBERS):
            raise ValueError(
                f"unknown B&W variant {variant!r}; use {SCREENSTYLE!r}, one of {(*VARIANTS, *LINE_ART_MEMBERS)} or "
                "a blend weight in [0, 1]"
            )
        return 1.0 if variant == "tone" else 0.0
    alpha = float(variant)
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"B&W blend weight must lie in [0, 1], got {variant}")
    return alpha


def blended_bw(grey: Image.Image, tone: Image.Image, alpha: float) -> Image.Image:
    """The B&W frame at tone weight `alpha` as RGB; training streams and shard inputs share these pixels."""
    from screentone.augment import blend

    if alpha == 0.0:
        mixed = grey
    elif alpha == 1.0:
        mixed = tone
    else:
        mixed = Image.fromarray(blend(np.asarray(grey), np.asarray(tone), alpha), mode="L")
    return mixed.convert("RGB")


def build_training_inputs(
    sample: Mapping[str, Any] | DecodedSample,
    variant: str | float = "screenstyle",
    *,
    seed: int = 0,
    epoch: int = 0,
    alpha_range: tuple[float, float] = (0.0, 1.0),
) -> TrainingInputs:
    """C_bw, C_color, the mask and the guider's two canvases from one sample.

    The default B&W frame is the screenstyle blend at the project's one alpha draw for (seed, epoch, sample key);
    "tone", "grey" or a fixed weight select the other variants. GSRP's high-resolution B&W frame uses the same alpha.
    "sketch" or "shading" (format-3 samples) take that line-art member, and GSRP the plain line art.
    """
    decoded = sample if isinstance(sample, DecodedSample) else decode_sample(sample)
    alpha = variant_alpha(variant, decoded.key, seed=seed, epoch=epoch, alpha_range=alpha_range)
    layout = decoded.layout
    if variant in LINE_ART_MEMBERS:
        require_line_art(decoded.meta.get("sample_format_version"), f"sample {decoded.key!r}", str(variant))
        bw = (decoded.sketch if variant == "sketch" else decoded.shading).convert("RGB")
        hr_bw = decoded.hr_sketch.convert("RGB")
    else:
        bw, hr_bw = blended_bw(decoded.grey, decoded.tone, alpha), blended_bw(decoded.hr_grey, decoded.hr_tone, alpha)
    canvases = composite_inputs(layout, decoded.ring, bw)
    return TrainingInputs(
        alpha=alpha,
        bw=bw,
        color=decoded.color,
        c_bw=canvases.c_bw,
        c_color=layout.compose(decoded.ring, decoded.color),
        mask=canvases.mask,
        refs_only=canvases.refs_only,
        frame_only=canvases.frame_only,
        hr_bw=hr_bw,
        hr_color=decoded.hr_color,
    )
