"""MangaLineExtraction (`res_skip`), the network the line-art family uses to turn a page into line art (`LE/erika.pth`).

A pre-activation residual U-Net: every conv is preceded by BatchNorm(eps 1e-3) and LeakyReLU(0.2). Encoder stages of
24/48/96/192/384 channels (2/3/5/7/12 blocks; stages 1-4 halve the size in their last block), decoder stages of
192/96/48/24 (7/5/3/2 blocks, the first of each upsampling x2, nearest, after its conv) each followed by the addition
of the matching encoder map, then a 16-wide stage and a 1x1 conv to one channel. Module names are the release's,
so `erika.pth` (707 keys) loads strictly (files without the BatchNorm `num_batches_tracked` counters are accepted).

Input: grey values 0-255 as float (not normalised), sides multiples of 16; `extract_lines` pads each page with 1.0
(as the release does: nearly black on the 0-255 scale), runs pages of the same padded size as one batch, clips the
output to 0-255, crops it back and truncates to uint8.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from model.state_keys import compare_state_shapes, read_state_dict

RELEASED_FILE = "erika.pth"
PAD_VALUE = 1.0  # the release pads with np.ones
SIDE_MULTIPLE = 16  # four halvings in the encoder
ENCODER = ((24, 2), (48, 3), (96, 5), (192, 7), (384, 12))
DECODER = ((192, 7), (96, 5), (48, 3), (24, 2))
HEAD = (16, 2)


class _PreActConv(nn.Module):
    """BatchNorm -> LeakyReLU -> conv (-> nearest x2 upsampling), held in `.model` as the release names it."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, upsample: bool = False):
        super().__init__()
        layers: list[nn.Module] = [
            nn.BatchNorm2d(in_channels, eps=1e-3),
            nn.LeakyReLU(0.2),
            nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2),
        ]
        if upsample:
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _ResidualBlock(nn.Module):
    """conv1 (maybe strided or upsampling) -> residual conv, plus a shortcut (a 1x1 conv when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, upsample: bool = False):
        super().__init__()
        self.conv1 = _PreActConv(in_channels, out_channels, 3, stride=stride, upsample=upsample)
        self.residual = _PreActConv(out_channels, out_channels, 3)
        self.shortcut = _Shortcut(in_channels, out_channels, stride, upsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x, self.residual(self.conv1(x)))


class _Shortcut(nn.Module):
    """x + y, with x through a 1x1 conv (strided, or followed by x2 upsampling) when widths or sizes differ."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, upsample: bool = False):
        super().__init__()
        self.model = None
        if in_channels != out_channels or stride != 1:
            layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 1, stride=stride)]
            if upsample:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x if self.model is None else self.model(x)) + y


class _Stage(nn.Module):
    """`count` residual blocks in `.model`: downsampling in the last one, or upsampling in the first one."""

    def __init__(self, in_channels: int, out_channels: int, count: int, downsample: bool = False, upsample=False):
        super().__init__()
        blocks = []
        for index in range(count):
            stride = 2 if downsample and index == count - 1 else 1
            blocks.append(
                _ResidualBlock(
                    in_channels if index == 0 else out_channels,
                    out_channels,
                    stride=stride,
                    upsample=upsample and index == 0,
                )
            )
        self.model = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MangaLineExtractor(ModelMixin, ConfigMixin):
    """MangaLineExtraction's `res_skip` (no configuration: the release has one layout)."""

    @register_to_config
    def __init__(self):
        super().__init__()
        channels = 1
        for index, (width, count) in enumerate(ENCODER):
            setattr(self, f"block{index}", _Stage(channels, width, count, downsample=index > 0))
            channels = width
        for index, (width, count) in enumerate(DECODER):
            setattr(self, f"block{len(ENCODER) + index}", _Stage(channels, width, count, upsample=True))
            setattr(self, f"res{index + 1}", _Shortcut(width, width))
            channels = width
        self.block9 = _Stage(channels, HEAD[0], HEAD[1])
        self.conv15 = _PreActConv(HEAD[0], 1, 1)

    def forward(self, pages: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) grey 0-255 (sides multiples of 16) -> (B, 1, H, W) unclipped line values."""
        if pages.ndim != 4 or pages.shape[1] != 1 or pages.shape[-1] % SIDE_MULTIPLE or pages.shape[-2] % SIDE_MULTIPLE:
            raise ValueError(
                f"MangaLineExtractor: input must be (B, 1, H, W) with H, W multiples of {SIDE_MULTIPLE}, "
                f"got {tuple(pages.shape)}"
            )
        skips = []
        hidden = pages
        for index in range(len(ENCODER)):
            hidden = getattr(self, f"block{index}")(hidden)
            skips.append(hidden)
        skips.pop()  # the deepest map feeds the decoder directly
        for index in range(len(DECODER)):
            hidden = getattr(self, f"block{len(ENCODER) + index}")(hidden)
            hidden = getattr(self, f"res{index + 1}")(skips.pop(), hidden)
        return self.conv15(self.block9(hidden))

    @classmethod
    def from_released(cls, path: str | Path) -> MangaLineExtractor:
        """The extractor from `erika.pth` (or a folder holding it), strictly, in eval mode."""
        path = Path(path)
        if path.is_dir():
            path = path / RELEASED_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no line extractor weights")
        state = read_state_dict(path)
        model = cls()
        expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        found = {key: tuple(value.shape) for key, value in state.items()}
        counters = {key: shape for key, shape in expected.items() if key.endswith(".num_batches_tracked")}
        compare_state_shapes(expected, {**{k: v for k, v in counters.items() if k not in found}, **found}, str(path))
        model.load_state_dict(state, strict=False)  # only the counters can be missing after the check
        return model.eval()


def padded_side(side: int) -> int:
    """The side rounded up to a multiple of 16."""
    return -(-side // SIDE_MULTIPLE) * SIDE_MULTIPLE


@torch.no_grad()
def extract_lines(model: MangaLineExtractor, pages: Sequence[np.ndarray], max_batch: int = 8) -> list[np.ndarray]:
    """Line art (uint8 H x W, 255 = paper) of each grey page (uint8 H x W), as the release computes it page by
    page: padded with 1.0 to multiples of 16, clipped to 0-255, cropped back, truncated. Pages of the same padded
    size run together, at most `max_batch` at a time (BatchNorm is in eval mode, so batching changes nothing)."""
    device, dtype = model.device, model.dtype
    results: list[np.ndarray | None] = [None] * len(pages)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, page in enumerate(pages):
        if page.ndim != 2:
            raise ValueError(f"extract_lines: page {index} must be a 2-D grey array, got shape {page.shape}")
        groups.setdefault((padded_side(page.shape[0]), padded_side(page.shape[1])), []).append(index)
    for (rows, cols), members in groups.items():
        for start in range(0, len(members), max_batch):
            chunk = members[start : start + max_batch]
            batch = np.full((len(chunk), 1, rows, cols), PAD_VALUE, dtype=np.float32)
            for slot, index in enumerate(chunk):
                height, width = pages[index].shape
                batch[slot, 0, :height, :width] = pages[index]
            output = model(torch.from_numpy(batch).to(device, dtype)).float().cpu().numpy()
            for slot, index in enumerate(chunk):
                height, width = pages[index].shape
                results[index] = np.clip(output[slot, 0, :height, :width], 0, 255).astype(np.uint8)
    return results


class LineExtractor:
    """Grey pages -> line art: the network on `device` (default: cuda if present) when `weights` (an erika.pth) are
    given, else XDoG (`screentone.lines`, weight-free, CPU). One implementation for the screentone stage, the
    benchmark and colorize."""

    def __init__(self, weights: str | None = None, device: str | None = None) -> None:
        self.weights = weights
        self._model = None
        if weights is not None:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._model = MangaLineExtractor.from_released(weights).to(device)

    def __call__(self, grey: np.ndarray) -> np.ndarray:
        return self.many([grey])[0]

    def many(self, greys: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Line art of each grey page (uint8 H x W, 255 = paper); the network runs pages of one size as a batch."""
        if self._model is None:
            from screentone.lines import extract_lines as xdog_lines

            return [xdog_lines(grey) for grey in greys]
        return extract_lines(self._model, list(greys))
