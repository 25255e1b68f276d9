"""The ICP UNet LoRA (peft): rank 64, alpha 64, gaussian init on every attention projection and feed-forward layer.

Saved as diffusers' `pytorch_lora_weights.safetensors` (keys `unet.<module>.lora_A.weight`, the LoRA config in the
file's metadata), which `StableDiffusionPipeline.lora_state_dict` / `load_lora_weights` read. `load_icp_lora` also
reads the released `GraySD/unet_lora.bin` spelling (`<module>.lora_A.default.weight`) and is strict where the
release's `load_state_dict(strict=False)` was not: every LoRA tensor of the UNet must be in the file and every key
of the file must have a place, else a ValueError names the first missing and the first unexpected key.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from model.state_keys import compare_state_shapes, read_lora_tensors

ICP_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
ICP_LORA_RANK = 64
ICP_LORA_ALPHA = 64
ADAPTER_NAME = "default"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_KEY_PREFIXES = ("unet.", "base_model.model.")


def add_icp_lora(
    unet: UNet2DConditionModel,
    rank: int = ICP_LORA_RANK,
    alpha: int = ICP_LORA_ALPHA,
    targets: Sequence[str] = ICP_LORA_TARGETS,
) -> UNet2DConditionModel:
    """Freeze the UNet and inject the ICP LoRA (adapter "default"): afterwards only LoRA parameters train."""
    if ADAPTER_NAME in getattr(unet, "peft_config", {}):
        raise ValueError(f"add_icp_lora: the UNet already has a LoRA adapter named {ADAPTER_NAME!r}")
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    return unet


def lora_settings(unet: UNet2DConditionModel) -> dict:
    """{"rank", "alpha", "targets"} of the UNet's ICP adapter (for export.json)."""
    config = _adapter_config(unet)
    targets = config.target_modules
    return {
        "rank": int(config.r),
        "alpha": float(config.lora_alpha),
        "targets": targets if isinstance(targets, str) else sorted(targets),
    }


def _adapter_config(unet: UNet2DConditionModel) -> LoraConfig:
    configs = getattr(unet, "peft_config", {})
    if ADAPTER_NAME not in configs:
        raise ValueError(f"the UNet has no LoRA adapter {ADAPTER_NAME!r} (call add_icp_lora first)")
    return configs[ADAPTER_NAME]


def save_icp_lora(unet: UNet2DConditionModel, folder: str | Path) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` in diffusers' pipeline LoRA format; returns the file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = _adapter_config(unet)
    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    metadata = config.to_dict()
    metadata["target_modules"] = lora_settings(unet)["targets"]
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers={key: value.detach().contiguous() for key, value in state.items()},
        unet_lora_adapter_metadata=json.loads(json.dumps(metadata, default=str)),
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
    )
    sort_safetensors_metadata(folder / LORA_WEIGHT_NAME)
    return folder / LORA_WEIGHT_NAME


def sort_safetensors_metadata(path: Path) -> None:
    """Rewrite a safetensors file's header with its ``__metadata__`` keys sorted.

    safetensors writes the metadata from a Rust hash map, so its key order (and the file's bytes) changes from one
    process to the next; sorted, the same tensors and settings give the same bytes in every run (a resumed run's
    export equals a straight run's).
    """
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the header is padded to 8 bytes, as safetensors writes it
    tmp = path.with_name(path.name + ".sorting")
    tmp.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length :])
    tmp.replace(path)


def lora_file(path: str | Path) -> Path:
    """The LoRA weight file at `path` (a file, or a folder holding pytorch_lora_weights.safetensors / unet_lora.bin)."""
    path = Path(path)
    if path.is_dir():
        for name in (LORA_WEIGHT_NAME, "unet_lora.bin", "pytorch_lora_weights.bin"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no {LORA_WEIGHT_NAME} or unet_lora.bin")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    return path


def read_icp_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's LoRA tensors keyed `<module>.lora_A.weight` / `.lora_B.weight`, whatever accepted spelling it uses.

    Accepted: `<module>.lora_A.default.weight` (the release) or `<module>.lora_A.weight` (peft/diffusers), either
    optionally prefixed `unet.` or `base_model.model.`. Any other key is an error naming it.
    """
    path = lora_file(path)
    return read_lora_tensors(path, _KEY_PREFIXES, "UNet")


def _file_lora_config(path: Path) -> dict:
    """LoRA settings stored in a safetensors file's metadata by `save_icp_lora` (empty when absent)."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    stored = json.loads(raw)
    return {key.removeprefix("unet."): value for key, value in stored.items()}


def load_icp_lora(
    unet: UNet2DConditionModel,
    path: str | Path,
    *,
    alpha: float | None = None,
    targets: Sequence[str] = ICP_LORA_TARGETS,
) -> UNet2DConditionModel:
    """Load a LoRA file (ours or the released spelling) into `unet`, strictly.

    A UNet without the adapter gets one first: rank from the file's shapes, alpha from the file's metadata, else
    `alpha`, else the rank (the release's alpha = r = 64); `targets` name the modules (ICP default).
    """
    path = lora_file(path)
    weights = read_icp_lora(path)
    if ADAPTER_NAME not in getattr(unet, "peft_config", {}):
        stored = _file_lora_config(path)
        rank = next(value.shape[0] for key, value in weights.items() if key.endswith(".lora_A.weight"))
        chosen_alpha = alpha if alpha is not None else stored.get("lora_alpha", rank)
        add_icp_lora(unet, rank=rank, alpha=chosen_alpha, targets=stored.get("target_modules", targets))
    adapter_state = {
        key: value
        for key, value in unet.state_dict().items()
        if f".lora_A.{ADAPTER_NAME}." in key or f".lora_B.{ADAPTER_NAME}." in key
    }
    expected = {
        key.removesuffix(f".{ADAPTER_NAME}.weight") + ".weight": tuple(value.shape)
        for key, value in adapter_state.items()
    }
    compare_state_shapes(expected, {key: tuple(value.shape) for key, value in weights.items()}, str(path))
    renamed = {key.removesuffix("weight") + f"{ADAPTER_NAME}.weight": value for key, value in weights.items()}
    result = unet.load_state_dict(renamed, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: unexpected key {result.unexpected_keys[0]!r}")
    return unet
