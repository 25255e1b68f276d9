"""One training sample per frame: everything ICP and GSRP need, so training never opens another page.

A sample is a dict of WebDataset members under a dot-free key (the frame id). Every sample has exactly the
fields of `FIELDS` (Hugging Face `datasets` infers its schema from the first samples, so a missing field in one
sample would break the whole dataset):

=================  =========  ==========================================================================
member             format     content
=================  =========  ==========================================================================
``color.jpg``      JPEG q95   the colour frame fitted to W x H (the target of ICP)
``grey.png``       PNG, L     its greyscale (ITU-R 601 luma of the fitted colour frame)
``tone.png``       PNG, L     its screentone rendered at W x H by the screentone job (stored as rendered)
``ring.jpg``       JPEG q95   the 2W x 2H composite canvas holding the 12 retrieved reference patches on the
                              ring, centre white: paste any B&W variant in the centre to get C_bw
``hr_color.jpg``   JPEG q95   the colour frame at the GSRP size (default 1.5 W x 1.5 H)
``hr_grey.png``    PNG, L     its greyscale
``hr_tone.png``    PNG, L     its screentone rendered at the GSRP size
``sketch.png``     PNG, L     the line-art family's "sketch" frame at W x H: the line art of the frame fitted at
                              the GSRP size (bicubic), resized to W x H (bicubic), as the released app makes it
``shading.png``    PNG, L     its "shading" frame: that line art shaded by the grey (`screentone.shading`), resized
``hr_sketch.png``  PNG, L     the plain line art at the GSRP size: GSRP's guide for both line-art styles
``json``           JSON       frame id, series, chapter, sizes, the retrieval rows used, the encoder
                              fingerprint, the renderer and line extractor ids, the code version that made it
=================  =========  ==========================================================================

Why these encodings: screentone is a pattern of dots a few pixels wide; JPEG's 8x8 DCT rings around them, and
the B&W input must reach the model exactly as rendered, so screentone and greyscale are lossless PNG (for the
near-bitonal tone PNG is also ~11x smaller than JPEG q95). Colour is the diffusion target and the reference
ring: JPEG at quality 95 with 4:4:4 chroma (no chroma subsampling, which would smear the colour edges the
model learns) costs about half of PNG's bytes.

Bytes per sample, measured by `bench/bench_shards.py` on the generated "small" corpus (pages 576 x 816) at
512 x 800 (GSRP 768 x 1200), mean per member: color.jpg 146 kB, grey.png 88 kB, tone.png 27 kB, ring.jpg
614 kB, hr_color.jpg 252 kB, hr_grey.png 172 kB, hr_tone.png 51 kB, json 1.6 kB: 1.35 MB per sample, about
740 samples per 1 GB shard. The line art of format 3 adds about 108 kB (sketch.png 41 kB, shading.png 47 kB,
hr_sketch.png 20 kB; `bench/bench_line_art.py`). Alternatives: the tone as JPEG q95 would take 296 kB (and change
pixels by up to 11 grey levels), the colour frame as PNG 286 kB. Generated pages are flat-coloured: real scans with
paper texture and gradients compress worse, so expect roughly 1.5-2x these figures (the shard planner measures them).

The fitted frame, references and screentone all use `pipelines.core.geometry` (paper's fit: resize, centre-crop
first when the aspect is more than 15% off), so training, retrieval and inference agree on every pixel.

Sample format versions (`SAMPLE_FORMAT_VERSION`, in every sample's metadata, each split's manifest and
shards/manifest.json): 1 built the ring with Lanczos (references fitted and patches resized); 2 builds it the
released app's way (references fitted with its `process_image` rule and PIL bicubic, patches resized bicubic), so
our models see the ring the released ones saw. Frames, greyscale and screentone are the same in both. 3 adds the
line-art members (sketch.png, shading.png, hr_sketch.png, made by the screentone stage with
`pipelines.core.page_styles.pages_line_art`, the code colorize styles a page with); the other members are
version 2's. Readers accept `READABLE_SAMPLE_FORMAT_VERSIONS` and refuse others (`check_sample_format_version`);
the line-art styles need version 3 (`require_line_art`).

The line art is not optional: every sample of a dataset has the same members (see above), and it costs little
beside the rest of a sample (measured in docs/data-engineers.md), so every format-3 dataset trains both families.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pipelines.core.errors import PreconditionError
from pipelines.core.geometry import (
    RANKS_PER_PATCH,
    RESAMPLE_BICUBIC,
    RESAMPLE_LANCZOS,
    RESAMPLERS,
    CompositeLayout,
    fit_box,
    fit_image,
    hires_size,
    reference_boxes,
)
from pipelines.core.pagestore import decode_page, encode_page
from pipelines.core.schemas import QUERY_PATCHES, REF_PATCHES

if TYPE_CHECKING:
    from pipelines.core.page_styles import LineArtFrames

FIELD_COLOR = "color.jpg"
FIELD_GREY = "grey.png"
FIELD_TONE = "tone.png"
FIELD_RING = "ring.jpg"
FIELD_HR_COLOR = "hr_color.jpg"
FIELD_HR_GREY = "hr_grey.png"
FIELD_HR_TONE = "hr_tone.png"
FIELD_SKETCH = "sketch.png"
FIELD_SHADING = "shading.png"
FIELD_HR_SKETCH = "hr_sketch.png"
FIELD_META = "json"
LINE_ART_FIELDS: tuple[str, ...] = (FIELD_SKETCH, FIELD_SHADING, FIELD_HR_SKETCH)  # from format version 3
FIELDS: tuple[str, ...] = (
    FIELD_COLOR,
    FIELD_GREY,
    FIELD_TONE,
    FIELD_RING,
    FIELD_HR_COLOR,
    FIELD_HR_GREY,
    FIELD_HR_TONE,
    *LINE_ART_FIELDS,
    FIELD_META,
)

SAMPLE_FORMAT_VERSION = 3  # the one constant naming the sample bytes: the manifests record it, readers check it
# 1 and 2: the same members and sizes (2 resamples the ring bicubic); 3 adds LINE_ART_FIELDS
READABLE_SAMPLE_FORMAT_VERSIONS = (1, 2, 3)
LINE_ART_FORMAT_VERSION = 3  # the first version whose samples hold the line art
# the screentone stage's variants (rows of its table) that become the line-art members, and their sizes
LINE_ART_VARIANTS = {FIELD_SKETCH: "sketch", FIELD_SHADING: "shading", FIELD_HR_SKETCH: "hires_sketch"}


def encode_line_art(frames: LineArtFrames, png_level: int = 6) -> dict[str, bytes]:
    """A page's line art (`pipelines.core.page_styles.pages_line_art`) as the screentone stage stores it: PNG per
    variant of `LINE_ART_VARIANTS`."""
    images = {FIELD_SKETCH: frames.sketch, FIELD_SHADING: frames.shading, FIELD_HR_SKETCH: frames.hires_lines}
    return {LINE_ART_VARIANTS[name]: encode_page(image, "png", png_level=png_level) for name, image in images.items()}


class SampleFormatError(PreconditionError):
    """Samples of another format version: a dataset never mixes versions, and a reader never guesses."""


def require_sample_format(versions: Iterable[Any], where: str, *, reading: bool = False) -> None:
    """The one rule for a change of sample format: `where` (a shard folder, a manifest) holds samples of one format
    version, which the writer only appends to when it is this code's `SAMPLE_FORMAT_VERSION` and a reader (with
    `reading`) accepts when it is one of `READABLE_SAMPLE_FORMAT_VERSIONS`; anything else (another version, a mix)
    is refused in one line naming the way out, a rebuild. A missing version is 1, the first format."""
    found = sorted({1 if v is None else int(v) for v in versions})
    allowed = READABLE_SAMPLE_FORMAT_VERSIONS if reading else (SAMPLE_FORMAT_VERSION,)
    if len(found) > 1 or (found and found[0] not in allowed):
        does = (
            f"reads versions {', '.join(map(str, allowed))}" if reading else f"writes version {SAMPLE_FORMAT_VERSION}"
        )
        raise SampleFormatError(
            f"{where} holds samples of sample format version {', '.join(map(str, found))}; this code {does} and "
            "never mixes versions in a dataset: rewrite the shards with python -m jobs.shards --data OUT --rebuild "
            "(or python -m jobs.pipeline ... --rebuild)"
        )


def check_sample_format_version(version: Any, where: str) -> int:
    """The sample format version of one sample (absent: 1), refused in one line when this code cannot read it."""
    require_sample_format([version], where, reading=True)
    return 1 if version is None else int(version)


def fields_of_version(version: int) -> tuple[str, ...]:
    """The members a sample of a readable format `version` has."""
    return FIELDS if version >= LINE_ART_FORMAT_VERSION else tuple(f for f in FIELDS if f not in LINE_ART_FIELDS)


def require_line_art(version: Any, where: str, style: str) -> None:
    """Refuse, in one line naming the rebuild, a line-art `style` on samples older than format 3 (no line art)."""
    found = 1 if version is None else int(version)
    if found < LINE_ART_FORMAT_VERSION:
        raise SampleFormatError(
            f"{where} holds samples of sample format version {found}, without line art; the {style!r} style needs "
            f"version {LINE_ART_FORMAT_VERSION}: rewrite the shards with python -m jobs.pipeline ... --rebuild"
        )


class SampleError(ValueError):
    """A frame that cannot become a sample; the message names the frame and the cause."""


@dataclass(frozen=True)
class SampleConfig:
    """How samples are assembled; recorded in the dataset manifest and in every sample's metadata."""

    width: int = 512
    height: int = 800
    hires_scale: float = 1.5
    jpeg_quality: int = 95
    png_compress_level: int = 6
    encoder_id: str = ""  # the retrieval encoder's id, names its embeddings folder
    encoder_fingerprint: Mapping[str, Any] = field(default_factory=dict)
    renderer_id: str = ""
    line_extractor_id: str = ""  # what made the line-art members (`pipelines.core.page_styles.line_extractor_id`)
    code_version: Mapping[str, Any] = field(default_factory=dict)
    inputs: Mapping[str, Any] = field(default_factory=dict)  # upstream settings (retrieval run, screentone seed)
    fit_resample: str = RESAMPLE_LANCZOS  # how frames are fitted (their tone was rendered from the same fit)

    def __post_init__(self) -> None:
        CompositeLayout(self.width, self.height)  # validates the size (multiples of 16)
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError(f"png_compress_level must lie in [0, 9], got {self.png_compress_level}")
        if self.fit_resample not in RESAMPLERS:
            raise ValueError(f"fit_resample must be one of {', '.join(RESAMPLERS)}, got {self.fit_resample!r}")

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def hires_size(self) -> tuple[int, int]:
        return hires_size(self.width, self.height, self.hires_scale)

    @property
    def layout(self) -> CompositeLayout:
        return CompositeLayout(self.width, self.height)

    def to_json(self) -> dict[str, Any]:
        """The manifest's record; the fit is named only when not the original Lanczos (older plans stay current)."""
        fit = {} if self.fit_resample == RESAMPLE_LANCZOS else {"fit_resample": self.fit_resample}
        return {
            "width": self.width,
            "height": self.height,
            "hires_scale": self.hires_scale,
            "hires_size": list(self.hires_size),
            "jpeg_quality": self.jpeg_quality,
            "jpeg_subsampling": "4:4:4",
            "png_compress_level": self.png_compress_level,
            "encoder_id": self.encoder_id,
            "encoder_fingerprint": dict(self.encoder_fingerprint),
            "renderer_id": self.renderer_id,
            "line_extractor_id": self.line_extractor_id,
            "code_version": dict(self.code_version),
            "inputs": dict(self.inputs),
            **fit,
            "fields": list(FIELDS),
            "sample_format_version": SAMPLE_FORMAT_VERSION,
        }


@dataclass(frozen=True)
class FrameRecord:
    """Who a frame is: enough to name its sample and find its inputs."""

    frame_id: str
    series: str
    chapter_id: str
    chapter: str
    page_index: int


class ChapterPages:
    """A chapter's encoded pages, decoded on demand and fitted at most once per size.

    Frames of one chapter share their references, so a shard builds a chapter's samples together and the fitted
    references are reused instead of decoded again for every frame. Only fitted images are kept (full-size
    decodes are dropped after `keep_decoded` newer ones), and fits asked with ``keep=False`` (a frame's own
    GSRP-size fit, used once) are not cached: memory is about one training-size image per page of the chapter.
    """

    def __init__(self, encoded: Mapping[str, bytes], keep_decoded: int = 2) -> None:
        self._encoded = dict(encoded)
        self._keep_decoded = keep_decoded
        self._decoded: OrderedDict[str, Image.Image] = OrderedDict()
        self._fitted: dict[tuple[str, int, int, str], Image.Image] = {}

    def __contains__(self, page_id: str) -> bool:
        return page_id in self._encoded

    def page(self, page_id: str) -> Image.Image:
        if page_id not in self._encoded:
            raise SampleError(f"page {page_id} is not in its chapter's page store")
        if page_id in self._decoded:
            self._decoded.move_to_end(page_id)
            return self._decoded[page_id]
        try:
            image = decode_page(self._encoded[page_id])
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a property of this page
            raise SampleError(f"page {page_id}: page-store image does not decode: {exc}") from exc
        self._decoded[page_id] = image
        while len(self._decoded) > self._keep_decoded:
            self._decoded.popitem(last=False)
        return image

    def fitted(
        self, page_id: str, width: int, height: int, *, keep: bool = True, resample: str = RESAMPLE_LANCZOS
    ) -> Image.Image:
        """The page fitted to width x height: the dataset's fit for frames (Lanczos unless `fit_resample` says
        otherwise; their screentone was rendered from that fit), bicubic (the released app's fit) for the ring."""
        key = (page_id, width, height, resample)
        if key in self._fitted:
            return self._fitted[key]
        image = fit_image(self.page(page_id), width, height, resample=resample)
        if keep:
            self._fitted[key] = image
        return image


def _checked_tone(data: bytes | None, frame_id: str, variant: str, size: tuple[int, int]) -> bytes:
    """A stored screentone-stage PNG (tone or line art), validated (present, decodable, mode L, exactly `size`)."""
    if data is None:
        raise SampleError(f"frame {frame_id}: no {variant!r} screentone rendering (run the screentone job)")
    try:
        tone = Image.open(io.BytesIO(data))
        tone.load()
    except Exception as exc:  # noqa: BLE001 - a corrupt rendering is this frame's problem
        raise SampleError(f"frame {frame_id}: {variant!r} screentone does not decode: {exc}") from exc
    if tone.format != "PNG" or tone.mode != "L":
        raise SampleError(f"frame {frame_id}: {variant!r} screentone is {tone.format} mode {tone.mode}, expected PNG L")
    if tone.size != size:
        raise SampleError(
            f"frame {frame_id}: {variant!r} screentone is {tone.size[0]}x{tone.size[1]}, expected "
            f"{size[0]}x{size[1]}; screentone must be rendered at the size it is used at, never resampled"
        )
    return data


def retrieval_grid(frame_id: str, rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The 12 retrieval rows that fill the ring (ranks 0..2 of each query patch), sorted by (patch, rank).

    Rows of higher ranks (a cache built with k > 3) are not used; a missing cell is an error, not a blank.
    """
    by_cell: dict[tuple[int, int], dict[str, Any]] = {}
    for row in rows:
        cell = (int(row["query_patch"]), int(row["rank"]))
        if not 0 <= cell[0] < QUERY_PATCHES:
            raise SampleError(f"frame {frame_id}: retrieval row has query_patch {cell[0]} outside 0..3")
        if not 0 <= int(row["ref_patch"]) < REF_PATCHES:
            raise SampleError(f"frame {frame_id}: retrieval row has ref_patch {row['ref_patch']} outside 0..4")
        if cell[1] >= RANKS_PER_PATCH:
            continue
        if cell in by_cell:
            raise SampleError(f"frame {frame_id}: two retrieval rows for query patch {cell[0]} rank {cell[1]}")
        by_cell[cell] = {
            "query_patch": cell[0],
            "rank": cell[1],
            "ref_page_id": str(row["ref_page_id"]),
            "ref_patch": int(row["ref_patch"]),
            "score": float(row["score"]),
        }
    missing = [cell for cell in np.ndindex(QUERY_PATCHES, RANKS_PER_PATCH) if cell not in by_cell]
    if missing:
        raise SampleError(
            f"frame {frame_id}: retrieval incomplete, {len(missing)} of {QUERY_PATCHES * RANKS_PER_PATCH} ring "
            f"cells have no row (query_patch, rank): {missing[:4]}"
        )
    if any(row["ref_page_id"] == frame_id for row in by_cell.values()):
        raise SampleError(f"frame {frame_id}: retrieval uses the frame itself as a reference")
    return [by_cell[cell] for cell in sorted(by_cell)]


def build_ring(pages: ChapterPages, grid: list[dict[str, Any]], layout: CompositeLayout) -> Image.Image:
    """The reference ring, the released app's way: each retrieved patch cropped from its page fitted to W x H
    (bicubic), resized into its cell (bicubic), placed by patch and rank."""
    boxes = reference_boxes(layout.width, layout.height)
    patches = {
        (row["query_patch"], row["rank"]): pages.fitted(
            row["ref_page_id"], layout.width, layout.height, resample=RESAMPLE_BICUBIC
        ).crop(boxes[row["ref_patch"]])
        for row in grid
    }
    return layout.ring_canvas(patches, RESAMPLE_BICUBIC)


def build_sample(
    frame: FrameRecord,
    pages: ChapterPages,
    retrievals: list[Mapping[str, Any]],
    tone: bytes | None,
    hires_tone: bytes | None,
    config: SampleConfig,
    line_art: Mapping[str, bytes | None],
) -> dict[str, bytes | str]:
    """The members of one frame's sample (plus ``__key__``); raises `SampleError` naming what is missing.

    `line_art`: the screentone stage's PNGs by variant (`LINE_ART_VARIANTS`: sketch, shading, hires_sketch)."""
    key = frame.frame_id
    if not key or "." in key or "/" in key:
        raise SampleError(f"frame id {key!r} cannot be a WebDataset key (it must be non-empty, without '.' or '/')")
    width, height = config.size
    hr_width, hr_height = config.hires_size
    grid = retrieval_grid(frame.frame_id, retrievals)
    tone = _checked_tone(tone, frame.frame_id, "train", config.size)
    hires_tone = _checked_tone(hires_tone, frame.frame_id, "hires", config.hires_size)
    line_art_members = {
        name: _checked_tone(
            line_art.get(variant),
            frame.frame_id,
            variant,
            config.hires_size if name == FIELD_HR_SKETCH else config.size,
        )
        for name, variant in LINE_ART_VARIANTS.items()
    }
    page = pages.page(frame.frame_id)
    color = pages.fitted(frame.frame_id, width, height, resample=config.fit_resample)
    hr_color = pages.fitted(frame.frame_id, hr_width, hr_height, keep=False, resample=config.fit_resample)
    ring = build_ring(pages, grid, config.layout)
    meta = {
        "key": key,
        "frame_id": frame.frame_id,
        "series": frame.series,
        "chapter": frame.chapter,
        "chapter_id": frame.chapter_id,
        "page_index": frame.page_index,
        "source_size": [page.width, page.height],
        "fit_box": list(
            fit_box(page.width, page.height, width, height, truncate=config.fit_resample == RESAMPLE_BICUBIC)
        ),
        "size": [width, height],
        "hires_size": [hr_width, hr_height],
        "retrievals": grid,
        "encoder_id": config.encoder_id,
        "encoder_fingerprint": dict(config.encoder_fingerprint),
        "renderer_id": config.renderer_id,
        "line_extractor_id": config.line_extractor_id,
        "code_version": dict(config.code_version),
        "sample_format_version": SAMPLE_FORMAT_VERSION,
    }
    level = config.png_compress_level
    return {
        "__key__": key,
        FIELD_COLOR: encode_page(color, "jpeg", config.jpeg_quality),
        FIELD_GREY: encode_page(color.convert("L"), "png", png_level=level),
        FIELD_TONE: tone,
        FIELD_RING: encode_page(ring, "jpeg", config.jpeg_quality),
        FIELD_HR_COLOR: encode_page(hr_color, "jpeg", config.jpeg_quality),
        FIELD_HR_GREY: encode_page(hr_color.convert("L"), "png", png_level=level),
        FIELD_HR_TONE: hires_tone,
        **line_art_members,
        FIELD_META: json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
    }


def sample_nbytes(sample: Mapping[str, Any]) -> int:
    """Payload bytes of a sample's members (tar headers and padding not included)."""
    return sum(len(v) for k, v in sample.items() if not k.startswith("__"))
