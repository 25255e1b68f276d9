"""The line-art family's transformer LoRA (peft): rank 128, alpha 128, gaussian init, the release's 12 target names.

The target names reach well beyond attention: 'proj' also matches the patch-embedding Conv2d (a Conv2d LoRA pair),
'proj_out' the output head, 'linear' the adaLN-single projection, 'linear_1'/'linear_2' the timestep, resolution and
aspect embedders and the caption projection, and to_q/k/v/out.0 both self- and cross-attention; 'proj_in' matches
nothing in PixArt. 291 modules for PixArt-XL-2 (see tests/reference/colorflow_pixart_lora_keys.json).

Stored as the release stores `transformer_lora.bin`: a torch pickle of `<module>.lora_A.default.weight` /
`.lora_B.default.weight`. That spelling is inferred (the release loads it non-strictly into a peft-wrapped model, so
any other spelling would silently load nothing); `load_pixart_lora` therefore accepts it with or without `default`
(and a `transformer.` or `base_model.model.` prefix), and is strict: every LoRA tensor of the transformer must be in
the file and every key of the file must have a place, else a ValueError names the first missing and unexpected key.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model

from model.state_keys import compare_state_shapes, read_lora_tensors

PIXART_LORA_TARGETS = (
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "proj",
    "linear",
    "linear_1",
    "linear_2",
)
PIXART_LORA_RANK = 128
PIXART_LORA_ALPHA = 128
ADAPTER_NAME = "default"
RELEASED_LORA_FILE = "transformer_lora.bin"
_KEY_PREFIXES = ("transformer.", "base_model.model.")


def add_pixart_lora(
    transformer: torch.nn.Module,
    rank: int = PIXART_LORA_RANK,
    alpha: float = PIXART_LORA_ALPHA,
    targets: Sequence[str] = PIXART_LORA_TARGETS,
) -> torch.nn.Module:
    """Freeze the transformer and inject the LoRA (adapter "default") in place: afterwards only LoRA weights train."""
    if ADAPTER_NAME in getattr(transformer, "peft_config", {}):
        raise ValueError(f"add_pixart_lora: the transformer already has a LoRA adapter named {ADAPTER_NAME!r}")
    transformer.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    inject_adapter_in_model(config, transformer, adapter_name=ADAPTER_NAME)
    return transformer


def pixart_lora_settings(transformer: torch.nn.Module) -> dict:
    """{"rank", "alpha", "targets"} of the transformer's adapter (for export.json)."""
    configs = getattr(transformer, "peft_config", {})
    if ADAPTER_NAME not in configs:
        raise ValueError(f"the transformer has no LoRA adapter {ADAPTER_NAME!r} (call add_pixart_lora first)")
    config = configs[ADAPTER_NAME]
    targets = config.target_modules
    return {
        "rank": int(config.r),
        "alpha": float(config.lora_alpha),
        "targets": targets if isinstance(targets, str) else sorted(targets),
    }


def pixart_lora_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors in the released spelling (`<module>.lora_A.default.weight`), module order."""
    state = {
        key: value.detach().cpu().contiguous()
        for key, value in transformer.state_dict().items()
        if f".lora_A.{ADAPTER_NAME}." in key or f".lora_B.{ADAPTER_NAME}." in key
    }
    if not state:
        raise ValueError("the transformer has no LoRA tensors (call add_pixart_lora first)")
    return state


def save_pixart_lora(transformer: torch.nn.Module, path: str | Path) -> Path:
    """Write the adapter as the release's `transformer_lora.bin` (a torch pickle); returns the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(pixart_lora_state(transformer), path)
    return path


def read_pixart_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's LoRA tensors keyed `<module>.lora_A.weight` / `.lora_B.weight`, whatever accepted spelling it uses;
    any other key is an error naming it."""
    path = Path(path)
    return read_lora_tensors(path, _KEY_PREFIXES, "transformer")


def load_pixart_lora(
    transformer: torch.nn.Module,
    path: str | Path,
    *,
    alpha: float | None = None,
    targets: Sequence[str] = PIXART_LORA_TARGETS,
) -> torch.nn.Module:
    """Load a LoRA file (the released spelling or without `default`) into `transformer`, strictly.

    A transformer without the adapter gets one first: rank from the file's shapes, alpha `alpha` or else the rank
    (the release's alpha = r = 128), `targets` the release's 12 names.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    weights = read_pixart_lora(path)
    if ADAPTER_NAME not in getattr(transformer, "peft_config", {}):
        rank = next(value.shape[0] for key, value in weights.items() if key.endswith(".lora_A.weight"))
        add_pixart_lora(transformer, rank=rank, alpha=alpha if alpha is not None else rank, targets=targets)
    expected = {
        key.replace(f".{ADAPTER_NAME}.weight", ".weight"): tuple(value.shape)
        for key, value in pixart_lora_state(transformer).items()
    }
    if not expected.keys() & weights.keys():
        raise ValueError(
            f"{path}: no key matches a LoRA module of the transformer (first key {next(iter(weights))!r}; "
            f"expected e.g. {next(iter(expected))!r})"
        )
    compare_state_shapes(expected, {key: tuple(value.shape) for key, value in weights.items()}, str(path))
    renamed = {key.removesuffix("weight") + f"{ADAPTER_NAME}.weight": value for key, value in weights.items()}
    result = transformer.load_state_dict(renamed, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: unexpected key {result.unexpected_keys[0]!r}")
    return transformer
