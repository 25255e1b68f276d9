"""Layers shared by the ScreenStyle networks (ScreenVAE encoder/decoder, colour-to-ScreenMap generator)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.2


class PageLayerNorm(nn.Module):
    """Layer norm over the whole (C, H, W) map without affine parameters, as ScreenStyle normalises.

    The statistics cover the entire page and its padding, so outputs depend on the page size and padding mode.
    """

    eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[1:], eps=self.eps)


class NoiseInjection(nn.Module):
    """Per-pixel Gaussian noise ``weight[c] * N(0, 1) + bias[c]`` added to the first half of the channels.

    The published layers own ``weight``/``bias`` for all channels but only ever use the first half. The noise
    is drawn from ``generator`` (a seeded `torch.Generator`) so eval-mode renders are reproducible.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        half = self.weight.numel() // 2
        shape = (x.shape[0], half, *x.shape[2:])
        device = generator.device if generator is not None else x.device
        noise = torch.randn(shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
        noisy = x[:, :half] + self.weight[:half].view(1, -1, 1, 1) * noise + self.bias[:half].view(1, -1, 1, 1)
        return torch.cat([noisy, x[:, half:]], dim=1)


def leaky_relu() -> nn.LeakyReLU:
    return nn.LeakyReLU(LEAKY_SLOPE)


def bilinear_up() -> nn.Upsample:
    return nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)


def pad_to_multiple(x: torch.Tensor, multiple: int, *, always: bool = False) -> torch.Tensor:
    """Replicate-pad a N x C x H x W tensor on the bottom/right up to a multiple of ``multiple``.

    ``always`` adds a full extra block on exact multiples, as the ScreenVAE encoder's wrapper does. Replicate
    (not white) padding: the page-level layer norm sees the padding, and white padding skews its statistics.
    """
    h, w = x.shape[-2:]

    def extra(size: int) -> int:
        return multiple - size % multiple if always else -size % multiple

    pad_h, pad_w = extra(h), extra(w)
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
