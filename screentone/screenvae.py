"""ScreenVAE (ScreenStyle): the encoder (screened manga + lines -> ScreenMap) and decoder (ScreenMap -> tone).

Both modules reproduce the published state-dict layouts key for key (`latest_net_enc.pth`,
`latest_net_dec.pth`), so the released files load with ``strict=True``. Layer indices inside each
``nn.Sequential`` follow the published definition (padding, activation and norm layers hold no parameters but
occupy indices), which is why key numbers skip.

Behaviour kept from the published networks, because the weights were trained with it:

- replicate padding layers before every unpadded conv; layer norm over the whole page (`PageLayerNorm`);
- decoder: a nested U-Net whose levels return ``concat(up-path output, level input)``; the level input in that
  skip has already been through the level's opening LeakyReLU (the published block applies it in place, so the
  skip sees the activated tensor);
- decoder noise on levels 1-3 (first half of the channels), applied in eval mode too: pass a seeded
  ``torch.Generator`` (or one per page of a batch) for reproducible output; Dropout(0.5) on levels 4-5 is off
  in eval mode.

Convs are `BatchInvariantConv2d` (same keys as ``nn.Conv2d``) so a page's CPU output does not depend on its batch.
"""

from __future__ import annotations

import torch
from torch import nn

from screentone.layers import (
    BatchInvariantConv2d,
    BatchInvariantConvTranspose2d,
    NoiseGenerator,
    NoiseInjection,
    PageLayerNorm,
    bilinear_up,
    leaky_relu,
    pad_to_multiple,
    padded_size,
)

SCREENMAP_CHANNELS = 4
ENCODER_PAD_MULTIPLE = 128
DECODER_PAD_MULTIPLE = 128


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return BatchInvariantConv2d(cin, cout, kernel_size=kernel, stride=stride, padding=0, bias=True)


class _ResidualBlock(nn.Module):
    """y = x + f(x), f = pad, conv3, norm, ReLU, pad, conv3, norm (keys ``conv_block.1``, ``conv_block.5``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReplicationPad2d(1),
            _conv(channels, channels, 3),
            PageLayerNorm(),
            nn.ReLU(),
            nn.ReplicationPad2d(1),
            _conv(channels, channels, 3),
            PageLayerNorm(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ScreenVAEEncoder(nn.Module):
    """ResNet generator: (manga grey, line map) in [-1, 1] -> 4-channel ScreenMap mean + 4-channel log-variance.

    Input N x 2 x H x W with H, W multiples of 8 (use `encode_screenmap` for arbitrary pages).
    """

    def __init__(self, input_channels: int = 2, width: int = 24, residual_blocks: int = 6):
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReplicationPad2d(3),
            _conv(input_channels, width, 7),
            PageLayerNorm(),
            nn.ReLU(),
        ]
        channels = width
        for _ in range(3):
            layers += [
                nn.ReplicationPad2d(1),
                _conv(channels, channels * 2, 3, stride=2),
                PageLayerNorm(),
                nn.ReLU(),
            ]
            channels *= 2
        layers += [_ResidualBlock(channels) for _ in range(residual_blocks)]
        for _ in range(3):
            half = channels // 2
            layers += [bilinear_up(), _conv(channels, half, 1), PageLayerNorm(), nn.ReLU()]
            layers += [nn.ReplicationPad2d(1), _conv(half, half, 3), PageLayerNorm(), nn.ReLU()]
            channels = half
        layers += [nn.ReplicationPad2d(3), _conv(channels, 2 * SCREENMAP_CHANNELS, 7)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _DecoderLevel(nn.Module):
    """One level of the decoder U-Net; see the module docstring for the skip and noise behaviour."""

    def __init__(
        self,
        outer: int,
        inner: int,
        submodule: _DecoderLevel | None,
        *,
        transposed_up: bool,
        noise: bool,
        dropout: bool,
    ):
        super().__init__()
        self.noiseblock = NoiseInjection(outer)
        self.apply_noise = noise
        down = [leaky_relu(), nn.ReplicationPad2d(1), _conv(outer, inner, 3, stride=2)]
        if submodule is None:  # innermost: no norm after the down conv, skip width = inner
            up_in = inner
            layers = [*down, leaky_relu()]
        else:
            up_in = inner * 2
            layers = [*down, PageLayerNorm(), submodule, leaky_relu()]
        if transposed_up:
            layers += [BatchInvariantConvTranspose2d(up_in, outer, kernel_size=4, stride=2, padding=1)]
        else:
            layers += [bilinear_up(), _conv(up_in, outer, 1)]
        layers += [
            PageLayerNorm(),
            leaky_relu(),
            nn.ReplicationPad2d(1),
            _conv(outer, outer, 3),
            PageLayerNorm(),
        ]
        if dropout:
            layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, generator: NoiseGenerator) -> torch.Tensor:
        x = self.model[0](x)  # the published block activates its input in place: the skip carries it too
        y = x
        for layer in self.model[1:]:
            y = layer(y, generator) if isinstance(layer, _DecoderLevel) else layer(y)
        if self.apply_noise:
            y = self.noiseblock(y, generator)
        return torch.cat([y, x], dim=1)


class _DecoderOutermost(nn.Module):
    def __init__(self, input_channels: int, output_channels: int, width: int, submodule: _DecoderLevel):
        super().__init__()
        self.noiseblock = NoiseInjection(output_channels)  # stored by the published module, never used
        self.model = nn.Sequential(
            nn.ReplicationPad2d(1),
            _conv(input_channels, width, 3, stride=2),
            submodule,
            leaky_relu(),
            BatchInvariantConvTranspose2d(width * 2, width, kernel_size=4, stride=2, padding=1),
            PageLayerNorm(),
            leaky_relu(),
            nn.ReplicationPad2d(3),
            _conv(width, output_channels, 7),
        )

    def forward(self, x: torch.Tensor, generator: NoiseGenerator) -> torch.Tensor:
        for layer in self.model:
            x = layer(x, generator) if isinstance(layer, _DecoderLevel) else layer(x)
        return x


class ScreenVAEDecoder(nn.Module):
    """U-Net with 7 stride-2 levels: 4-channel ScreenMap -> 1-channel tone (raw, no tanh).

    Input N x 4 x H x W with H, W multiples of 128 (use `decode_tone` for arbitrary pages).
    """

    def __init__(self, input_channels: int = SCREENMAP_CHANNELS, output_channels: int = 1, width: int = 48):
        super().__init__()
        deep = width * 8
        level = _DecoderLevel(deep, deep, None, transposed_up=False, noise=False, dropout=False)
        for _ in range(2):  # levels 5 and 4
            level = _DecoderLevel(deep, deep, level, transposed_up=False, noise=False, dropout=True)
        for outer in (width * 4, width * 2, width):  # levels 3, 2, 1
            level = _DecoderLevel(outer, outer * 2, level, transposed_up=True, noise=True, dropout=False)
        self.model = _DecoderOutermost(input_channels, output_channels, width, level)

    def forward(self, screenmap: torch.Tensor, generator: NoiseGenerator = None) -> torch.Tensor:
        return self.model(screenmap, generator)


def encode_screenmap(
    encoder: ScreenVAEEncoder, manga: torch.Tensor, lines: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ScreenMap mean and log-variance (N x 4 x H x W each) of screened manga and its line map, both in [-1, 1].

    Pads like the published wrapper (bottom/right, replicate, always at least one row/column block of 128) and
    crops back.
    """
    h, w = manga.shape[-2:]
    x = pad_to_multiple(torch.cat([manga, lines], dim=1), ENCODER_PAD_MULTIPLE, always=True)
    out = encoder(x)[..., :h, :w]
    return out[:, :SCREENMAP_CHANNELS], out[:, SCREENMAP_CHANNELS:]


def decoder_input_size(height: int, width: int) -> tuple[int, int]:
    """The size the released decode branch pads a ScreenMap to: always at least one more block of 128.

    ``h // 128 * 128 + 128`` per side: 200 -> 256, 256 -> 384 (an exact multiple still gains a block).
    """
    return padded_size(height, DECODER_PAD_MULTIPLE, always=True), padded_size(width, DECODER_PAD_MULTIPLE, always=True)


def multiply_lines(tone: torch.Tensor, lines: torch.Tensor) -> torch.Tensor:
    """Tone times line map in [0, 1] space, back in [-1, 1] and clamped: ``clamp((t + 1)(l + 1) / 2 - 1)``."""
    return torch.clamp((tone + 1) * (lines + 1) / 2 - 1, -1, 1)


def decode_tone(
    decoder: ScreenVAEDecoder,
    screenmap: torch.Tensor,
    lines: torch.Tensor,
    generator: NoiseGenerator = None,
) -> torch.Tensor:
    """Screentone in [-1, 1] (N x 1 x H x W) of a ScreenMap, as ScreenVAE's decode branch renders it (ColorFlow).

    The ScreenMap is replicate-padded to `decoder_input_size`, decoded, cropped back to H x W and multiplied by
    the RAW line map (`multiply_lines`; no sign, no push of the ScreenMap on ink pixels: those belong to the
    encode branch). ColorFlow passes the whole 256-padded ScreenMap and line map here and crops only at the end.
    """
    h, w = screenmap.shape[-2:]
    tone = decoder(pad_to_multiple(screenmap, DECODER_PAD_MULTIPLE, always=True), generator)[..., :h, :w]
    return multiply_lines(tone, lines)


def decode_tone_binarised(
    decoder: ScreenVAEDecoder,
    screenmap: torch.Tensor,
    lines: torch.Tensor,
    generator: NoiseGenerator = None,
) -> torch.Tensor:
    """The project's first decode (renderer path ``"eroded-binarised"``): lines binarised as the encoder sees them.

    The line map is binarised by its sign, the ScreenMap pushed to +1 on ink pixels (``clamp(screenmap + 1 -
    line, -1, 1)``), decoded with replicate padding to the next multiple of 128 only, cropped, and multiplied
    by the binarised line (`multiply_lines`).
    """
    h, w = screenmap.shape[-2:]
    lines = torch.sign(lines)
    screenmap = torch.clamp(screenmap + (1 - lines), -1, 1).to(screenmap.dtype)
    tone = decoder(pad_to_multiple(screenmap, DECODER_PAD_MULTIPLE), generator)[..., :h, :w]
    return multiply_lines(tone, lines)
