"""The line-art (PixArt) family of colorize, beside the SD1.5 one of `inference.models`: its weights located and
checked, and its `Colorizer`.

Weights: a style folder (the release's `sketch/` or `shading/`, or our export written by
`training.train_pixart_icp`, or that run's folder holding it in `export/`) on a local PixArt-alpha diffusers folder
(`--pixart DIR`, or the `base_model` the export records). Text comes only from a text cache (`model.text_cache`,
`--text-cache FILE`, or the cache the export records): T5 is never loaded. GSRP: `--gsrp`, else the style
folder's own `MultiResNetModel.bin`, else bicubic upsampling.

One page, as the released app colours it: the PixArt pipeline samples the 2W x 2H canvas (PixArt's DPM-Solver as
shipped, CFG 4.5, 10 steps), the centre W x H is cropped out, and GSRP fuses it with the plain line art at the GSRP
size (`inference.models.finish_pages`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from inference.models import PageBatchItem, SamplingOptions, files_token, finish_pages, read_export
from inference.sources import ColorizeInputError

LINEART_EXPORT_FORMAT = "colorflow-lineart-export"  # model.lineart_weights.EXPORT_FORMAT, without importing torch
RELEASED_LORA_FILE = "transformer_lora.bin"
RELEASED_GSRP_FILE = "MultiResNetModel.bin"
RUN_EXPORT_FOLDER = "export"  # training.train_pixart_icp writes its export here, beside its checkpoints
DEFAULT_GUIDANCE = 4.5  # model.pipeline_pixart.DEFAULT_GUIDANCE, the release's


@dataclass(frozen=True)
class LineArtPaths:
    """Where the line-art family's files are; resolved once in the driver, shipped to the workers."""

    pixart: str
    weights: str  # a style folder: released sketch/ or shading/, or our export
    gsrp: str | None
    text_cache: str  # the .safetensors of a model.text_cache file
    family: ClassVar[str] = "pixart"

    def identity(self) -> dict[str, Any]:
        """What names these weights in a fingerprint (see `inference.models.files_token`)."""
        return {
            "pixart": files_token(self.pixart),
            "lineart": files_token(self.weights),
            "gsrp": files_token(self.gsrp),
            "text_cache": files_token(self.text_cache),
        }


def lineart_folder(path: str | None) -> Path | None:
    """The style folder `path` names (a training run's folder stands for its export/), or None when `path` holds
    no line-art weights (then it is SD1.5 ICP weights, or nothing)."""
    if not path:
        return None
    folder = Path(path)
    for candidate in (folder, folder / RUN_EXPORT_FOLDER):
        meta = read_export(candidate)
        if meta.get("format") == LINEART_EXPORT_FORMAT or (not meta and (candidate / RELEASED_LORA_FILE).is_file()):
            return candidate
    return None


def resolve_lineart_paths(
    weights: Path, *, style: str, pixart: str | None, text_cache: str | None, gsrp: str | None
) -> LineArtPaths:
    """Check the line-art weights, PixArt folder, text cache and GSRP; ColorizeInputError says which is wrong."""
    from model.lineart_weights import STYLES, check_lineart_folder

    try:
        check_lineart_folder(weights)
    except FileNotFoundError as exc:
        raise ColorizeInputError(f"line-art weights: {exc}") from None
    other = next((name for name in STYLES if name != style), None)
    if weights.name == other:
        raise ColorizeInputError(
            f"--style {style}: the weights {weights} are the release's {other} model; give --style {other} or the "
            f"{style}/ folder"
        )
    meta = read_export(weights)
    base = pixart or meta.get("base_model")
    if not base:
        raise ColorizeInputError("no PixArt-alpha folder: give --pixart DIR (a local PixArt-XL-2 diffusers folder)")
    for part in ("transformer", "vae", "scheduler"):
        if not (Path(base) / part).is_dir():
            raise ColorizeInputError(f"PixArt folder {base}: no {part}/ (a local PixArt-alpha diffusers folder)")
    cache = text_cache or meta.get("text_cache")
    if not cache:
        raise ColorizeInputError(
            "no text cache: give --text-cache FILE (make one with `python -m model.text_cache PIXART_DIR FILE`)"
        )
    _check_text_cache(cache, Path(base))
    if gsrp is None and (weights / RELEASED_GSRP_FILE).is_file():
        gsrp = str(weights / RELEASED_GSRP_FILE)
    if gsrp is not None and not Path(gsrp).exists():
        raise ColorizeInputError(f"GSRP weights {gsrp}: no such file or folder")
    from model.gsrp_weights import run_export

    return LineArtPaths(
        pixart=str(Path(base).absolute()),
        weights=str(weights.absolute()),
        gsrp=str(run_export(Path(gsrp)).absolute()) if gsrp else None,
        text_cache=str(Path(cache).with_suffix(".safetensors").absolute()),
    )


def _check_text_cache(cache: str, pixart: Path) -> None:
    """The cache loads (format, checksum, shapes) and its embeddings are as wide as the transformer's captions."""
    from model.text_cache import load_text_cache

    try:
        text = load_text_cache(cache)
    except (FileNotFoundError, ValueError) as exc:
        raise ColorizeInputError(f"--text-cache: {exc}") from None
    caption = json.loads((pixart / "transformer" / "config.json").read_text()).get("caption_channels")
    width = int(text.prompt_embeds.shape[-1])
    if caption is not None and width != caption:
        raise ColorizeInputError(
            f"--text-cache {cache}: embeddings are {width} wide, the PixArt transformer's captions {caption}: the "
            "cache was made with another text encoder"
        )


def text_cache_prompts(cache: str) -> tuple[str, str]:
    """(prompt, negative prompt) a text cache was made from (what the run record reports)."""
    sidecar = json.loads(Path(cache).with_suffix(".json").read_text())
    return str(sidecar.get("prompt", "")), str(sidecar.get("negative_prompt", ""))


class PixArtColorizer:
    """The line-art pipeline and GSRP loaded once (per Ray actor), colouring batches of pages."""

    def __init__(self, paths: LineArtPaths, sampling: SamplingOptions, device: str) -> None:
        import torch

        from model.devices import place
        from model.gsrp_weights import load_gsrp
        from model.lineart_weights import load_lineart_pipeline
        from model.text_cache import load_text_cache

        self.device = torch.device(device)
        self.sampling = sampling
        dtype = getattr(torch, sampling.dtype)
        if sampling.memory == "offload" and self.device.type != "cuda":
            raise ColorizeInputError("--memory offload moves models between CPU and GPU: it needs a CUDA device")
        load_device = "cpu" if sampling.memory == "offload" else str(self.device)
        self.pipeline = load_lineart_pipeline(paths.pixart, paths.weights, device=load_device, dtype=dtype)
        self.pipeline.set_progress_bar_config(disable=True)
        self.text = load_text_cache(paths.text_cache)
        self.fusion = None if paths.gsrp is None else place(load_gsrp(paths.gsrp), self.device, dtype).eval()
        if sampling.memory == "offload":
            self.pipeline.enable_model_cpu_offload(device=self.device)
        elif sampling.memory == "vae-slicing":
            self.pipeline.vae.enable_slicing()

    def colorize(self, items: list[PageBatchItem], layout: Any) -> list[Image.Image]:
        """The final pages (GSRP size) of a batch, page by page: each page's noise and VAE posteriors come from its
        own seed (under guidance the pipeline draws posteriors for a doubled batch), so a batch changes nothing."""
        import torch

        lowres = []
        for item in items:
            canvas = self.pipeline(
                refs_only=item.refs_only,
                frame_only=item.frame_only,
                mask=item.mask,
                text=self.text,
                num_inference_steps=self.sampling.steps,
                guidance_scale=self.sampling.guidance_scale,
                conditioning_scale=self.sampling.conditioning_scale,
                generator=torch.Generator("cpu").manual_seed(item.seed),
                output_type="pil",
            ).images[0]
            lowres.append(layout.crop_centre(canvas))
        return finish_pages(self.pipeline.vae, self.fusion, items, lowres, self.sampling, self.device)
