"""ScreenStyle's colour-to-ScreenMap generator ``G_RGB2INTSCR`` (file ``latest_net_G_RGB2INTSCR.pth``).

Input: concat(line map, RGB) in [-1, 1] (N x 4 x H x W, H and W multiples of 256 for the 8 stride-2 levels);
output: the 4-channel ScreenMap in [-1, 1] (tanh) that the ScreenVAE decoder renders as screentone.

The published file stores every 3x3 conv in spectral-norm form (``weight_orig``, ``weight_u``, ``weight_v``,
``bias``). This module uses plain convs: `fold_spectral_norm` turns the stored triple into the effective
weight once, at load time, with the formula PyTorch's spectral norm applies in eval mode
(``weight_orig / (u . (W_mat v))``); no power iteration ever runs. `to_published_state_dict` converts back, so a
module's weights can be saved in the published format.

Published behaviour kept: replicate padding, page-level layer norm, LeakyReLU 0.2, bilinear x2 upsampling
followed by a 1x1 conv, additive skips (a level returns up-path output + its activated input, the published
block applying its opening LeakyReLU in place), nearest resize of the up path on odd sizes. Each level stores
noise parameters that this network never uses; they are kept so strict loading accepts the file.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from screentone.layers import BatchInvariantConv2d, NoiseInjection, PageLayerNorm, bilinear_up, leaky_relu

GENERATOR_INPUT_CHANNELS = 4
GENERATOR_PAD_MULTIPLE = 256


class SpectralNormFoldedConv2d(BatchInvariantConv2d):
    """A conv stored in spectral-norm form in the published file; here it holds the folded weight."""


def _sn_conv(cin: int, cout: int, stride: int = 1) -> SpectralNormFoldedConv2d:
    return SpectralNormFoldedConv2d(cin, cout, kernel_size=3, stride=stride, padding=0, bias=True)


def _conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return BatchInvariantConv2d(cin, cout, kernel_size=1, padding=0, bias=True)


class _GeneratorLevel(nn.Module):
    def __init__(self, outer: int, inner: int, submodule: _GeneratorLevel | None):
        super().__init__()
        self.noiseblock = NoiseInjection(outer)  # stored by the published module, never used
        down = [leaky_relu(), nn.ReplicationPad2d(1), _sn_conv(outer, inner, stride=2)]
        middle = [] if submodule is None else [PageLayerNorm(), submodule]  # innermost: no norm, no inner level
        layers = [*down, *middle, leaky_relu()]
        layers += [bilinear_up(), _conv1x1(inner, outer), PageLayerNorm(), leaky_relu()]
        layers += [nn.ReplicationPad2d(1), _sn_conv(outer, outer), PageLayerNorm()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model[0](x)  # the published block activates its input in place: the skip carries it too
        y = self.model[1:](x)
        if y.shape[-2:] != x.shape[-2:]:
            y = F.interpolate(y, size=x.shape[-2:])
        return y + x


class _GeneratorOutermost(nn.Module):
    def __init__(self, channels: int, width: int, submodule: _GeneratorLevel):
        super().__init__()
        self.noiseblock = NoiseInjection(channels)  # stored by the published module, never used
        self.model = nn.Sequential(
            nn.ReplicationPad2d(1),
            _sn_conv(channels, width, stride=2),
            submodule,
            leaky_relu(),
            bilinear_up(),
            _conv1x1(width, channels),
            PageLayerNorm(),
            leaky_relu(),
            nn.ReplicationPad2d(1),
            _sn_conv(channels, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.model(x))


class ColorToScreenMapGenerator(nn.Module):
    """``G_RGB2INTSCR`` with the published test options: width 48, 8 levels, bilinear, no dropout, no noise."""

    def __init__(self, channels: int = GENERATOR_INPUT_CHANNELS, width: int = 48):
        super().__init__()
        deep = width * 8
        level = _GeneratorLevel(deep, deep, None)
        for _ in range(3):  # levels 6, 5, 4
            level = _GeneratorLevel(deep, deep, level)
        for outer in (width * 4, width * 2, width):  # levels 3, 2, 1
            level = _GeneratorLevel(outer, outer * 2, level)
        self.model = _GeneratorOutermost(channels, width, level)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def spectral_norm_prefixes(module: nn.Module) -> list[str]:
    """State-dict prefixes of the convs stored in spectral-norm form, in module order."""
    return [name for name, sub in module.named_modules() if isinstance(sub, SpectralNormFoldedConv2d)]


def fold_spectral_norm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each ``weight_orig``/``weight_u``/``weight_v`` triple by the effective ``weight``.

    sigma = u . (W_mat v) with W_mat = weight_orig reshaped to (out, -1), computed in the stored dtype exactly
    as PyTorch's spectral norm does in eval mode; ``weight`` takes the place of ``weight_orig`` in key order.
    Other keys pass through. A triple with a missing member or mismatched sizes raises ValueError.
    """
    folded: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in ("weight_u", "weight_v"):
            if _sibling(prefix, "weight_orig") not in state_dict:
                raise ValueError(f"spectral-norm key '{key}' has no matching '{_sibling(prefix, 'weight_orig')}'")
            continue
        if leaf != "weight_orig":
            folded[key] = value
            continue
        u_key, v_key, weight_key = (_sibling(prefix, name) for name in ("weight_u", "weight_v", "weight"))
        missing = [k for k in (u_key, v_key) if k not in state_dict]
        if missing:
            raise ValueError(f"spectral-norm weight '{key}' lacks {', '.join(repr(m) for m in missing)}")
        if weight_key in state_dict:
            raise ValueError(f"'{key}' comes with a plain '{weight_key}': not a spectral-norm state dict")
        u, v = state_dict[u_key], state_dict[v_key]
        matrix = value.reshape(value.shape[0], -1)
        if u.shape != (matrix.shape[0],) or v.shape != (matrix.shape[1],):
            raise ValueError(
                f"spectral-norm vectors of '{key}' do not fit its shape {tuple(value.shape)}: "
                f"weight_u {tuple(u.shape)}, weight_v {tuple(v.shape)} (expected ({matrix.shape[0]},) and "
                f"({matrix.shape[1]},))"
            )
        sigma = torch.dot(u, torch.mv(matrix, v))
        folded[weight_key] = value / sigma
    return folded


def _sibling(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def to_published_state_dict(module: ColorToScreenMapGenerator) -> dict[str, torch.Tensor]:
    """The module's weights in the published spectral-norm layout (keys, order and shapes of the release).

    For each folded weight W: ``weight_orig = W``, ``weight_v`` = W's top right singular vector (unit, by power
    iteration) and ``weight_u = W v / |W v|^2``, so ``u . (W v) = 1`` and eval-mode spectral norm (ours or PyTorch's)
    reproduces W exactly. (Trained files hold unit ``u``; a power iteration in train mode would rescale this
    one, and the published pipelines are only reproducible in eval mode anyway.)
    """
    prefixes = set(spectral_norm_prefixes(module))
    published: dict[str, torch.Tensor] = {}
    pending: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in prefixes:
            published[key] = value.detach().clone()
        elif leaf == "weight":
            pending[prefix] = value.detach()
        else:  # bias comes after weight in a conv's state dict; the release stores bias first
            weight = pending.pop(prefix)
            u, v = _unit_gain_vectors(weight)
            published[f"{prefix}.bias"] = value.detach().clone()
            published[f"{prefix}.weight_orig"] = weight.clone()
            published[f"{prefix}.weight_u"] = u
            published[f"{prefix}.weight_v"] = v
    if pending:
        raise ValueError(f"spectral-norm convs without bias cannot be published: {sorted(pending)}")
    return published


def _unit_gain_vectors(weight: torch.Tensor, iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """v: W's top right singular vector by power iteration (as spectral norm tracks it), u: W v / |W v|^2."""
    matrix = weight.reshape(weight.shape[0], -1).double()
    v = torch.ones(matrix.shape[1], dtype=torch.float64) / matrix.shape[1] ** 0.5
    for _ in range(iterations):
        v = matrix.T @ (matrix @ v)
        v = v / v.norm().clamp_min(1e-30)
    image = matrix @ v
    u = image / torch.dot(image, image).clamp_min(1e-30)
    return u.to(weight.dtype), v.to(weight.dtype)
