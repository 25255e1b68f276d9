"""The reference pool of a chapter for colorize (and the trainer's benchmark validation): embedded once, searched
per page, turned into the composite ring.

Patches are cut as the released app cuts them: 4 query crops (3/4 size, stride 1/4) of the page's ICP frame (the
styled page, `inference.styles`), 5 reference crops (the same 4 and the whole page) of each colour reference fitted to
W x H with the app's `process_image` rule (PIL bicubic, `geometry.fit_image(resample="bicubic")`); ring patches are
resized into their cells bicubic too. The retrieval cache of the data pipeline keeps its Lanczos fit (its stored
embeddings would all change). All reference patches of the chapter are embedded once; each page's 4
query patches are then searched among all of them with FAISS (`pipelines.core.search.PoolSearcher`, exact scores and
a deterministic tie order), top 3 per query patch, chosen independently as the released app does: 12 ring cells.

Encoders: every `pipelines.core.encoders` spec (`open_clip:...`, `weightfree`), plus ``clip_vision:<folder>``, a
transformers `CLIPVisionModelWithProjection` saved with `save_pretrained` (the released `image_encoder/`),
preprocessed like the release (the folder's `CLIPImageProcessor`, else the default one: shortest side 224, centre
crop 224, OpenAI mean/std) and read through its projected `image_embeds`, L2-normalised.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.core.encoders import Encoder, EncoderInfo, load_encoder, resolve_encoder
from pipelines.core.geometry import (
    RANKS_PER_PATCH,
    RESAMPLE_BICUBIC,
    CompositeLayout,
    fit_image,
    quadrant_boxes,
    reference_boxes,
)
from pipelines.core.sample_inputs import CompositeInputs, composite_inputs
from pipelines.core.samples import retrieval_grid
from pipelines.core.schemas import QUERY_PATCHES, REF_PATCHES
from pipelines.core.search import PoolSearcher, RefKeys
from pipelines.core.storage import sha256_file

CLIP_VISION = "clip_vision"
CLIP_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# ---- encoders ----------------------------------------------------------------------------------------------------


def resolve_colorize_encoder(spec: str) -> EncoderInfo:
    """An encoder spec of `jobs.retrieval`, or ``clip_vision:<folder>`` (fingerprinted, nothing loaded)."""
    spec = spec.strip()
    if spec.startswith(f"{CLIP_VISION}:"):
        return _clip_vision_info(spec)
    return resolve_encoder(spec)


def _clip_vision_info(spec: str) -> EncoderInfo:
    folder = Path(spec.split(":", 1)[1]).expanduser().absolute()
    config_path = folder / "config.json"
    weights = next((folder / name for name in CLIP_WEIGHT_FILES if (folder / name).is_file()), None)
    if not config_path.is_file() or weights is None:
        raise FileNotFoundError(
            f"encoder spec {spec!r}: {folder} is not a saved CLIPVisionModelWithProjection "
            f"(needs config.json and one of {list(CLIP_WEIGHT_FILES)})"
        )
    config = json.loads(config_path.read_text())
    dim = int(config.get("projection_dim") or config.get("vision_config", {}).get("projection_dim") or 0)
    if not dim:
        raise ValueError(f"encoder spec {spec!r}: {config_path} has no projection_dim")
    processor = folder / "preprocessor_config.json"
    fingerprint = {
        "kind": CLIP_VISION,
        "name": f"{CLIP_VISION}-{folder.name}",
        "config_sha256": sha256_file(config_path),
        "weights": f"sha256:{sha256_file(weights)}",
        "preprocessing": json.loads(processor.read_text()) if processor.is_file() else "CLIPImageProcessor()",
        "output": "image_embeds (projected), L2-normalised",
        "dim": dim,
    }
    return EncoderInfo(spec=spec, kind=CLIP_VISION, fingerprint=fingerprint, dim=dim, load_args={"folder": str(folder)})


def _clip_processor(folder: str):
    from transformers import CLIPImageProcessor

    if (Path(folder) / "preprocessor_config.json").is_file():
        return CLIPImageProcessor.from_pretrained(folder)
    return CLIPImageProcessor()  # what the released app builds: the library's defaults


def patch_preparer(info: EncoderInfo) -> Callable[[Image.Image], np.ndarray]:
    """CPU half of an encoder's preprocessing: patch image -> fixed-shape uint8 array."""
    if info.kind != CLIP_VISION:
        return info.preparer()
    processor = _clip_processor(info.load_args["folder"])

    def prepare(patch: Image.Image) -> np.ndarray:
        pixels = processor(images=[patch.convert("RGB")], do_rescale=False, do_normalize=False, return_tensors="np")
        return np.asarray(pixels.pixel_values[0]).transpose(1, 2, 0).round().clip(0, 255).astype(np.uint8)

    return prepare


class ClipVisionEncoder(Encoder):
    """The released retrieval tower: `CLIPVisionModelWithProjection.from_pretrained(folder)`, fp32 like the app."""

    def __init__(self, info: EncoderInfo, device: str = "cpu") -> None:
        import torch
        from transformers import CLIPVisionModelWithProjection

        folder = info.load_args["folder"]
        processor = _clip_processor(folder)
        self.device = torch.device(device)
        self.model = CLIPVisionModelWithProjection.from_pretrained(folder).to(self.device).eval()
        self.mean = torch.tensor(processor.image_mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, device=self.device).view(1, 3, 1, 1)
        self.dim = info.dim

    def embed(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            pixels = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            embeds = self.model(pixel_values=(pixels - self.mean) / self.std).image_embeds.float()
            embeds = torch.nn.functional.normalize(embeds, dim=-1)
        return embeds.cpu().numpy().astype(np.float32)


def load_colorize_encoder(info: EncoderInfo, device: str = "cpu") -> Encoder:
    if info.kind == CLIP_VISION:
        return ClipVisionEncoder(info, device)
    return load_encoder(info, device)


def embed_prepared(encoder: Encoder, prepared: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """fp16 vectors (as the retrieval cache stores them, and as `PoolSearcher` scores them) of prepared patches."""
    if not len(prepared):
        return np.zeros((0, encoder.dim), dtype=np.float16)
    out = []
    for start in range(0, len(prepared), batch_size):
        vectors = encoder.embed(prepared[start : start + batch_size])
        if not np.all(np.isfinite(vectors)):
            raise FloatingPointError("the encoder returned non-finite values")
        out.append(vectors.astype(np.float16))
    return np.concatenate(out)


# ---- patches and search ------------------------------------------------------------------------------------------


def query_patches(frame: Image.Image) -> list[Image.Image]:
    """The 4 query crops (TL, TR, BL, BR) of a page's ICP frame (already W x H), as the app cuts them."""
    return [frame.crop(box) for box in quadrant_boxes(*frame.size)]


def fitted_reference(reference: Image.Image, width: int, height: int) -> Image.Image:
    """A colour reference fitted to W x H the app's way (`process_image`: bicubic)."""
    return fit_image(reference.convert("RGB"), width, height, resample=RESAMPLE_BICUBIC)


def reference_patches(reference: Image.Image, width: int, height: int) -> list[Image.Image]:
    """The 5 reference crops (4 quadrants and the whole page) of a colour reference."""
    fitted = fitted_reference(reference, width, height)
    return [fitted.crop(box) for box in reference_boxes(width, height)]


@dataclass
class ReferencePool:
    """One chapter's embedded reference patches: `REF_PATCHES` consecutive rows per reference, in `ref_ids` order."""

    ref_ids: list[str]
    vectors: np.ndarray  # (len(ref_ids) * REF_PATCHES, dim) float16

    def __post_init__(self) -> None:
        if len(self.vectors) != REF_PATCHES * len(self.ref_ids):
            raise ValueError(f"{len(self.vectors)} reference vectors for {len(self.ref_ids)} references")
        self.keys = RefKeys(np.repeat(np.array(self.ref_ids), REF_PATCHES), np.tile(np.arange(REF_PATCHES), len(self)))

    def __len__(self) -> int:
        return len(self.ref_ids)

    def search(
        self, queries: np.ndarray, k: int = RANKS_PER_PATCH, max_per_page: int | None = None, threads: int = 1
    ) -> list[list[dict[str, Any]]]:
        """Retrieval rows (query_patch, rank, ref_page_id, ref_patch, score) of each page's 4 query vectors.

        `queries` holds `QUERY_PATCHES` consecutive rows per page; every reference patch of the pool is allowed.
        `max_per_page` is the retrieval job's cap on one reference page's patches per frame (None: independent).
        """
        if len(queries) % QUERY_PATCHES:
            raise ValueError(f"{len(queries)} query vectors are not {QUERY_PATCHES} per page")
        if not len(queries):
            return []
        searcher = PoolSearcher(self.vectors, self.keys.tie_rank, threads=threads)
        rows, scores = searcher.search(
            queries,
            np.arange(len(self.vectors)),
            k,
            max_per_page=max_per_page,
            ref_pages=self.keys.page_ids,
            queries_per_frame=QUERY_PATCHES,
        )
        pages = []
        for page in range(len(queries) // QUERY_PATCHES):
            grid = []
            for query_patch in range(QUERY_PATCHES):
                line = page * QUERY_PATCHES + query_patch
                for rank in range(k):
                    row = int(rows[line, rank])
                    grid.append(
                        {
                            "query_patch": query_patch,
                            "rank": rank,
                            "ref_page_id": str(self.keys.page_ids[row]),
                            "ref_patch": int(self.keys.patches[row]),
                            "score": float(scores[line, rank]),
                        }
                    )
            pages.append(grid)
        return pages


# ---- the composite -----------------------------------------------------------------------------------------------


def ring_from_references(
    layout: CompositeLayout, grid: list[dict[str, Any]], fitted_refs: Mapping[str, Image.Image]
) -> Image.Image:
    """The ring canvas: each retrieved patch cut from its reference fitted to W x H, resized into its cell (bicubic,
    as the app), placed by (patch, rank)."""
    boxes = reference_boxes(layout.width, layout.height)
    patches = {
        (row["query_patch"], row["rank"]): fitted_refs[row["ref_page_id"]].crop(boxes[row["ref_patch"]]) for row in grid
    }
    return layout.ring_canvas(patches, RESAMPLE_BICUBIC)


def page_composite(
    layout: CompositeLayout,
    page_id: str,
    frame: Image.Image,
    grid: list[dict[str, Any]],
    fitted_refs: Mapping[str, Image.Image],
) -> CompositeInputs:
    """The four ICP canvases of a page's ICP frame (`inference.styles`): `sample_inputs.composite_inputs`, the
    trainer's own function."""
    grid = retrieval_grid(page_id, grid)
    return composite_inputs(layout, ring_from_references(layout, grid, fitted_refs), frame)
