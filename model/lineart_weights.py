"""Line-art family weights on disk: the release's `sketch/` and `shading/` folders, and our exports in that layout.

A style folder (released, or written by `save_lineart_export`) holds:

    config.json + diffusion_pytorch_model.bin   the PixArt Colorization Guider (a torch pickle: it carries the
                                                `after_proj.*` alias of the last adapter)
    transformer_lora.bin                        the transformer LoRA (r 128, `<module>.lora_A.default.weight`)
    MultiResNetModel.bin                        the GSRP fusion net (the SD1.5 layout of model/gsrp_fusion.py)
    export.json                                 ours only, written last: the completion marker and the run's meta

Every part loads strictly (`PixArtColorGuider.from_pretrained`, `load_pixart_lora`, `load_gsrp`): a wrong file
fails naming its first missing or unexpected key. The release's demo loads the LoRA and the fusion net non-strictly.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel

from model.colorguider_pixart import CONFIG_FILE, WEIGHT_FILES, PixArtColorGuider
from model.devices import place
from model.gsrp_fusion import GSRPFusion
from model.gsrp_weights import RELEASED_FILE as FUSION_FILE
from model.gsrp_weights import load_gsrp
from model.pipeline_pixart import ColorFlowPixArtPipeline
from model.pixart_lora import (
    PIXART_LORA_TARGETS,
    RELEASED_LORA_FILE,
    add_pixart_lora,
    load_pixart_lora,
    pixart_lora_settings,
    save_pixart_lora,
)
from pipelines.core.storage import atomic_write_json, replace_tree

EXPORT_FORMAT = "colorflow-lineart-export"
EXPORT_VERSION = 1
EXPORT_FILE = "export.json"
STYLES = ("sketch", "shading")  # the release's folder names (styles "Sketch" and "Sketch_Shading")


def check_lineart_folder(folder: str | Path) -> Path:
    """The folder, or FileNotFoundError naming the first part it lacks."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such line-art weights folder")
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_FILE} (the guider config)")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{folder}: no guider weights ({' or '.join(WEIGHT_FILES)})")
    if not (folder / RELEASED_LORA_FILE).is_file():
        raise FileNotFoundError(f"{folder}: no {RELEASED_LORA_FILE} (the transformer LoRA)")
    return folder


def load_lineart_weights(
    transformer: PixArtTransformer2DModel, folder: str | Path | None
) -> tuple[PixArtColorGuider, PixArtTransformer2DModel, dict[str, Any]]:
    """(guider, transformer with its LoRA, export meta) from a style folder (released or ours), strictly; None: a
    guider `from_transformer` and a fresh gaussian LoRA r 128."""
    if folder is None:
        guider = PixArtColorGuider.from_transformer(transformer)
        add_pixart_lora(transformer)
        return guider, transformer, {}
    folder = check_lineart_folder(folder)
    meta: dict[str, Any] = {"format": "released"}
    if (folder / EXPORT_FILE).is_file():
        meta = json.loads((folder / EXPORT_FILE).read_text())
        if meta.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{folder / EXPORT_FILE}: format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}")
    guider = PixArtColorGuider.from_pretrained(folder)
    lora = meta.get("lora", {})
    load_pixart_lora(
        transformer,
        folder / RELEASED_LORA_FILE,
        alpha=lora.get("alpha"),
        targets=lora.get("targets", PIXART_LORA_TARGETS),
    )
    return guider, transformer, meta


def load_lineart_fusion(folder: str | Path) -> GSRPFusion:
    """The style folder's GSRP fusion net (`MultiResNetModel.bin`), strictly."""
    path = Path(folder) / FUSION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {FUSION_FILE} (the GSRP fusion net)")
    return load_gsrp(path)


def save_lineart_export(
    folder: str | Path,
    guider: PixArtColorGuider,
    transformer: PixArtTransformer2DModel,
    meta: dict[str, Any],
    fusion: GSRPFusion | None = None,
) -> Path:
    """Write a style folder in the released layout plus export.json (meta, format, LoRA settings); returns it.

    Built under a scratch name and renamed into place, so a reader never sees half of it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    guider.save_released(scratch)
    save_pixart_lora(transformer, scratch / RELEASED_LORA_FILE)
    if fusion is not None:
        fusion.save_released(scratch / FUSION_FILE)
    record = {**meta, "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION}
    record["lora"] = pixart_lora_settings(transformer)
    atomic_write_json(scratch / EXPORT_FILE, record)
    replace_tree(scratch, folder)
    return folder


def load_lineart_pipeline(
    pixart_dir: str | Path,
    weights_dir: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ColorFlowPixArtPipeline:
    """The line-art pipeline from a local PixArt-alpha diffusers folder (transformer/, vae/, scheduler/; the text
    encoder is not loaded) plus a style folder (None: fresh guider and LoRA), in eval mode on `device` in `dtype`."""
    pixart_dir = Path(pixart_dir)
    if not (pixart_dir / "transformer").is_dir():
        raise FileNotFoundError(f"{pixart_dir}: not a PixArt-alpha diffusers folder (no transformer/)")
    transformer = PixArtTransformer2DModel.from_pretrained(pixart_dir, subfolder="transformer")
    guider, transformer, _ = load_lineart_weights(transformer, weights_dir)
    pipeline = ColorFlowPixArtPipeline(
        vae=AutoencoderKL.from_pretrained(pixart_dir, subfolder="vae"),
        transformer=transformer,
        guider=guider,
        scheduler=DPMSolverMultistepScheduler.from_pretrained(pixart_dir, subfolder="scheduler"),
    )
    for module in (pipeline.vae, pipeline.transformer, pipeline.guider):
        module.requires_grad_(False)
        module.eval()
        place(module, device, dtype)
    return pipeline
