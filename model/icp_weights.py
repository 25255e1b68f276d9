"""Loading and writing ICP weights: our export folder, the released `GraySD/` layout, and the full pipeline.

Our export (`save_icp_export`): `colorguider/` (diffusers `save_pretrained`), `unet_lora/pytorch_lora_weights.
safetensors` (diffusers LoRA format) and `export.json` (the caller's meta plus the LoRA rank/alpha/targets), written
last as the completion marker. The release (`TencentARC/ColorFlow` `GraySD/`): `config.json` +
`diffusion_pytorch_model.bin` (the guider) + `unet_lora.bin` (peft keys `<module>.lora_A.default.weight`, alpha = r).
Both load strictly (`ColorGuider.from_pretrained`, `load_icp_lora`): a wrong file fails naming the key.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UniPCMultistepScheduler
from transformers import CLIPTextModel, CLIPTokenizer

from model.colorguider import RELEASED_CLASS_NAME, WEIGHT_FILES, ColorGuider
from model.devices import place
from model.lora import ADAPTER_NAME, ICP_LORA_TARGETS, add_icp_lora, load_icp_lora, lora_settings, save_icp_lora
from model.pipeline_icp import ColorFlowICPPipeline
from pipelines.core.storage import TMP_TAG, atomic_write_json, replace_tree

EXPORT_FORMAT = "colorflow-icp-export"
EXPORT_VERSION = 1
RELEASED_LORA_FILE = "unet_lora.bin"


def _fresh_tmp(final: Path) -> Path:
    return final.with_name(f"{final.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def save_icp_export(folder: str | Path, guider: ColorGuider, unet: UNet2DConditionModel, meta: dict) -> Path:
    """Write `folder/colorguider/`, `folder/unet_lora/pytorch_lora_weights.safetensors` and, last, `export.json`
    (meta + {"format", "format_version", "lora": {rank, alpha, targets}}); returns `folder`.

    Other content of `folder` (a run root's checkpoints, logs) is left alone; each part is replaced atomically.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "export.json"
    marker.unlink(missing_ok=True)  # the old marker must not vouch for half-replaced parts
    tmp = _fresh_tmp(folder / "colorguider")
    try:
        guider.save_pretrained(tmp, safe_serialization=True)
        replace_tree(tmp, folder / "colorguider")
        tmp = _fresh_tmp(folder / "unet_lora")
        save_icp_lora(unet, tmp)
        replace_tree(tmp, folder / "unet_lora")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record = {**meta, "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "lora": lora_settings(unet)}
    atomic_write_json(marker, record)
    return folder


def write_released_icp_layout(folder: str | Path, guider: ColorGuider, unet: UNet2DConditionModel) -> Path:
    """Write a `GraySD/`-style folder as the release ships it: config.json (class name `ColorGuiderSDModel`),
    diffusion_pytorch_model.bin (torch pickle) and unet_lora.bin (`<module>.lora_A.default.weight`, no prefix)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {key: list(value) if isinstance(value, tuple) else value for key, value in guider.config.items()}
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    config = {"_class_name": RELEASED_CLASS_NAME, "_diffusers_version": "0.31.0.dev0", **config}
    atomic_write_json(folder / "config.json", config)
    guider_state = {key: value.detach().cpu().contiguous() for key, value in guider.state_dict().items()}
    torch.save(guider_state, folder / WEIGHT_FILES[1])
    lora_state = {
        key: value.detach().cpu().contiguous()
        for key, value in unet.state_dict().items()
        if f".lora_A.{ADAPTER_NAME}." in key or f".lora_B.{ADAPTER_NAME}." in key
    }
    if not lora_state:
        raise ValueError("write_released_icp_layout: the UNet has no ICP LoRA (call add_icp_lora first)")
    torch.save(lora_state, folder / RELEASED_LORA_FILE)
    return folder


def describe_weights(weights_dir: str | Path) -> str:
    """ "export" (ours), "released" (GraySD) or a FileNotFoundError saying what the folder lacks."""
    weights_dir = Path(weights_dir)
    if (weights_dir / "export.json").is_file():
        return "export"
    has_guider = any((weights_dir / name).is_file() for name in WEIGHT_FILES)
    if (weights_dir / "config.json").is_file() and has_guider and (weights_dir / RELEASED_LORA_FILE).is_file():
        return "released"
    raise FileNotFoundError(
        f"{weights_dir}: not ICP weights: expected export.json + colorguider/ + unet_lora/ (our export) or "
        f"config.json + diffusion_pytorch_model.bin|.safetensors + {RELEASED_LORA_FILE} (the released GraySD/ folder)"
    )


def load_icp_weights(
    unet: UNet2DConditionModel, weights_dir: str | Path | None
) -> tuple[ColorGuider, UNet2DConditionModel, dict]:
    """(guider, unet with its LoRA, export meta) from our export, a released folder, or (None) fresh from the UNet:
    a `from_unet` guider and a new gaussian-init LoRA."""
    if weights_dir is None:
        guider = ColorGuider.from_unet(unet)
        add_icp_lora(unet)
        return guider, unet, {}
    weights_dir = Path(weights_dir)
    if describe_weights(weights_dir) == "export":
        meta = json.loads((weights_dir / "export.json").read_text())
        if meta.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{weights_dir}/export.json: format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}")
        guider = ColorGuider.from_pretrained(weights_dir / "colorguider")
        lora = meta.get("lora", {})
        load_icp_lora(
            unet, weights_dir / "unet_lora", alpha=lora.get("alpha"), targets=lora.get("targets", ICP_LORA_TARGETS)
        )
        return guider, unet, meta
    guider = ColorGuider.from_pretrained(weights_dir)
    load_icp_lora(unet, weights_dir / RELEASED_LORA_FILE)
    return guider, unet, {"format": "released"}


def load_icp_pipeline(
    sd15_dir: str | Path,
    weights_dir: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    text_encoder: bool = True,
) -> ColorFlowICPPipeline:
    """The ICP pipeline from a local SD1.5 diffusers folder plus ICP weights (our export, a released `GraySD/`
    folder, or None for a fresh guider and LoRA), UniPC scheduler, in eval mode on `device` in `dtype`.

    `text_encoder=False` loads neither the text encoder nor the tokenizer (the caller passes `prompt_embeds`)."""
    sd15_dir = Path(sd15_dir)
    if not (sd15_dir / "unet").is_dir():
        raise FileNotFoundError(f"{sd15_dir}: not a Stable Diffusion 1.5 diffusers folder (no unet/)")
    unet = UNet2DConditionModel.from_pretrained(sd15_dir, subfolder="unet")
    guider, unet, _ = load_icp_weights(unet, weights_dir)
    pipeline = ColorFlowICPPipeline(
        vae=AutoencoderKL.from_pretrained(sd15_dir, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(sd15_dir, subfolder="text_encoder") if text_encoder else None,
        tokenizer=CLIPTokenizer.from_pretrained(sd15_dir, subfolder="tokenizer") if text_encoder else None,
        unet=unet,
        guider=guider,
        scheduler=UniPCMultistepScheduler.from_pretrained(sd15_dir, subfolder="scheduler"),
    )
    for module in (pipeline.vae, pipeline.text_encoder, pipeline.unet, pipeline.guider):
        if module is None:
            continue
        module.requires_grad_(False)
        module.eval()
        place(module, device, dtype)
    return pipeline
