"""Strict loading of the published ScreenStyle checkpoints into this package's modules.

The user supplies the files (custom CUHK licence; they are not downloaded). Every file must match the module's
layout key for key and shape for shape; the first difference is reported with the file, the key and both
shapes, before anything is loaded. The generator file may be in the published spectral-norm form (folded here)
or already folded (as `ColorToScreenMapGenerator.state_dict()` saves it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from screentone.color2manga import ColorToScreenMapGenerator, fold_spectral_norm
from screentone.screenvae import ScreenVAEDecoder, ScreenVAEEncoder

GENERATOR_FILE = "latest_net_G_RGB2INTSCR.pth"
DECODER_FILE = "latest_net_dec.pth"
# Where the files sit in a ScreenStyle checkout or in the ColorFlow weights (ScreenStyle/color2manga, .../ScreenVAE).
_GENERATOR_SUBDIRS = ("", "color2manga", "ScreenStyle/color2manga", "checkpoints/color2manga")
_SCREENVAE_SUBDIRS = ("", "ScreenVAE", "ScreenStyle/ScreenVAE", "checkpoints/ScreenVAE")

PathLike = str | os.PathLike


class CheckpointMismatchError(ValueError):
    """A checkpoint file does not have the layout of the module it is loaded into."""


@dataclass
class ScreenStyleModels:
    """The colour-to-screentone pair, in eval mode without gradients, with the files they came from."""

    generator: ColorToScreenMapGenerator
    decoder: ScreenVAEDecoder
    generator_path: Path | None = None
    decoder_path: Path | None = None


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """A plain tensor state dict from a ``.pth`` file (``weights_only``: no code in the file is executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ScreenStyle checkpoint not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointMismatchError(f"{path}: not a readable torch state dict ({type(exc).__name__}: {exc})") from exc
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointMismatchError(f"{path}: expected a plain state dict of tensors, got {type(loaded).__name__}")
    return dict(loaded)


def check_layout(path: PathLike, expected: Mapping[str, torch.Size], found: Mapping[str, torch.Tensor]) -> None:
    """Raise `CheckpointMismatchError` naming the first mismatching key (module order) and the counts."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong_shape = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or wrong_shape):
        return
    first_expected = next((k for k in expected if k in missing or k in wrong_shape), None)
    if first_expected is None:
        detail = f"unexpected key '{unexpected[0]}' with shape {tuple(found[unexpected[0]].shape)}"
    elif first_expected in missing:
        detail = f"missing key '{first_expected}' (expected shape {tuple(expected[first_expected])})"
    else:
        detail = (
            f"key '{first_expected}' has shape {tuple(found[first_expected].shape)}, "
            f"expected {tuple(expected[first_expected])}"
        )
    raise CheckpointMismatchError(
        f"{path}: checkpoint does not match the module: first mismatching key: {detail} "
        f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong_shape)} with another shape)"
    )


def load_module_weights(module: nn.Module, path: PathLike, state_dict: Mapping[str, torch.Tensor]) -> None:
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_layout(path, expected, state_dict)
    module.load_state_dict(state_dict, strict=True)


def _prepared(module: nn.Module, device: str | torch.device) -> nn.Module:
    module.eval().requires_grad_(False)
    return module.to(device)


def load_generator(path: PathLike, device: str | torch.device = "cpu") -> ColorToScreenMapGenerator:
    """``G_RGB2INTSCR`` from ``latest_net_G_RGB2INTSCR.pth`` (spectral-norm keys folded at load time)."""
    state = read_state_dict(path)
    if any(key.endswith(".weight_orig") for key in state):
        try:
            state = fold_spectral_norm(state)
        except ValueError as exc:
            raise CheckpointMismatchError(f"{path}: {exc}") from exc
    module = ColorToScreenMapGenerator()
    load_module_weights(module, path, state)
    return _prepared(module, device)


def load_decoder(path: PathLike, device: str | torch.device = "cpu") -> ScreenVAEDecoder:
    """The ScreenVAE decoder from ``latest_net_dec.pth``."""
    module = ScreenVAEDecoder()
    load_module_weights(module, path, read_state_dict(path))
    return _prepared(module, device)


def load_encoder(path: PathLike, device: str | torch.device = "cpu") -> ScreenVAEEncoder:
    """The ScreenVAE encoder from ``latest_net_enc.pth`` (manga -> ScreenMap)."""
    module = ScreenVAEEncoder()
    load_module_weights(module, path, read_state_dict(path))
    return _prepared(module, device)


def load_screenstyle(g_path: PathLike, dec_path: PathLike, device: str | torch.device = "cpu") -> ScreenStyleModels:
    """The colour-to-screentone pair from the two published files, strictly, in eval mode on ``device``."""
    return ScreenStyleModels(
        generator=load_generator(g_path, device),
        decoder=load_decoder(dec_path, device),
        generator_path=Path(g_path),
        decoder_path=Path(dec_path),
    )


def find_screenstyle_files(root: PathLike) -> tuple[Path, Path]:
    """Locate the generator and decoder files under a ScreenStyle or ColorFlow weights folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ScreenStyle weights folder not found: {root}")
    return _find(root, _GENERATOR_SUBDIRS, GENERATOR_FILE), _find(root, _SCREENVAE_SUBDIRS, DECODER_FILE)


def _find(root: Path, subdirs: tuple[str, ...], name: str) -> Path:
    candidates = [root / sub / name if sub else root / name for sub in subdirs]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"ScreenStyle checkpoint {name} not found under {root} (tried {tried})")
