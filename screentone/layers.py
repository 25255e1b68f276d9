"""Layers shared by the ScreenStyle networks (ScreenVAE encoder/decoder, colour-to-ScreenMap generator)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.2
# PyTorch sends a single-page CPU conv whose input has at most this many elements to its native kernel and a
# batch to oneDNN; the two round differently (up to ~1e-6), so batched pages would not equal per-page ones.
_CPU_SMALL_CONV_ELEMENTS = 20480

NoiseGenerator = torch.Generator | Sequence[torch.Generator] | None


class PageLayerNorm(nn.Module):
    """Layer norm over the whole (C, H, W) map without affine parameters, as ScreenStyle normalises.

    The statistics cover the entire page and its padding, so outputs depend on the page size and padding mode;
    pages of one batch are normalised independently (a batch must hold pages of one size, padded alike).
    """

    eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[1:], eps=self.eps)


class NoiseInjection(nn.Module):
    """Per-pixel Gaussian noise ``weight[c] * N(0, 1) + bias[c]`` added to the first half of the channels.

    The published layers own ``weight``/``bias`` for all channels but only ever use the first half. The noise
    comes from ``generator``: one seeded `torch.Generator` for the whole batch, or one per page, so a page
    rendered in a batch gets exactly the noise it gets alone. Noise is drawn in float32 and cast, so a bfloat16
    run sees the float32 run's noise rounded.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, generator: NoiseGenerator) -> torch.Tensor:
        half = self.weight.numel() // 2
        noise = draw_noise((x.shape[0], half, *x.shape[2:]), generator, x.device).to(x.dtype)
        noisy = x[:, :half] + self.weight[:half].view(1, -1, 1, 1) * noise + self.bias[:half].view(1, -1, 1, 1)
        return torch.cat([noisy, x[:, half:]], dim=1)


def draw_noise(shape: tuple[int, ...], generator: NoiseGenerator, device: torch.device) -> torch.Tensor:
    """Standard normal float32 noise of ``shape`` (N first) from one generator, or row by row from N generators."""
    if generator is None or isinstance(generator, torch.Generator):
        source = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=source).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} noise generators for a batch of {shape[0]} pages")
    return torch.cat([draw_noise((1, *shape[1:]), g, device) for g in generator])


def _batch_invariant(conv, x: torch.Tensor, forward) -> torch.Tensor:
    if x.device.type == "cpu" and x.shape[0] > 1 and x[0].numel() <= _CPU_SMALL_CONV_ELEMENTS:
        return torch.cat([forward(x[i : i + 1]) for i in range(x.shape[0])])
    return forward(x)


class BatchInvariantConv2d(nn.Conv2d):
    """`nn.Conv2d` whose CPU output for a page does not depend on the batch it is in (same weights and keys).

    Small inputs take per-page calls, so they run the kernel a single page runs (see `_CPU_SMALL_CONV_ELEMENTS`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _batch_invariant(self, x, super().forward)


class BatchInvariantConvTranspose2d(nn.ConvTranspose2d):
    """`nn.ConvTranspose2d` with the batch invariance of `BatchInvariantConv2d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _batch_invariant(self, x, super().forward)


def leaky_relu() -> nn.LeakyReLU:
    return nn.LeakyReLU(LEAKY_SLOPE)


def bilinear_up() -> nn.Upsample:
    return nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)


def padded_size(size: int, multiple: int, *, always: bool = False) -> int:
    """``size`` rounded up to a multiple; ``always`` adds a full block on exact multiples (``size // m * m + m``)."""
    return size // multiple * multiple + multiple if always else -(-size // multiple) * multiple


def pad_bottom_right(x: torch.Tensor, height: int, width: int, *, mode: str = "replicate", value: float = 0.0):
    """Pad a N x C x H x W tensor on the bottom/right to ``height`` x ``width`` (``mode``: replicate or constant)."""
    pad_h, pad_w = height - x.shape[-2], width - x.shape[-1]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"cannot pad {tuple(x.shape[-2:])} down to {(height, width)}")
    if pad_h == 0 and pad_w == 0:
        return x
    if mode == "constant":
        return F.pad(x, (0, pad_w, 0, pad_h), mode="constant", value=value)
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def pad_to_multiple(x: torch.Tensor, multiple: int, *, always: bool = False) -> torch.Tensor:
    """Replicate-pad a N x C x H x W tensor on the bottom/right to multiples of ``multiple`` (see `padded_size`)."""
    h, w = x.shape[-2:]
    return pad_bottom_right(x, padded_size(h, multiple, always=always), padded_size(w, multiple, always=always))
