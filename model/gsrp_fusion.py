"""The GSRP fusion net: per encoder level, a residual stack that turns the concatenated colour and B&W VAE-encoder
features into a map the VAE decoder adds at the matching level.

Layout (ColorFlow's released `MultiHiddenResNetModel`, file `MultiResNetModel.bin`): branch i takes
concat(colour_i, bw_i) and runs `blocks_per_branch` residual blocks (3x3 conv without bias, norm, ReLU, 3x3 conv, norm,
plus a shortcut, ReLU); the first block projects to the decoder width with a 1x1 conv + norm shortcut when the widths
differ. Our module names say what they are (`branches.<i>.blocks.<j>.norm1`); `released_key` maps them one to one onto
the released names (`two_layer_resnets.<i>.block<j+1>.bn1`), in the same order, so the released file loads strictly.

Normalisation: "batch" is the released BatchNorm (needed to load its weights). Its batch statistics are noisy at the
per-GPU batch of 1-2 large crops that GSRP training affords, so `freeze_batchnorm_statistics()` keeps the running
statistics fixed while the affine parameters train (the trainer's default when it starts from trained weights).
"group" (GroupNorm) has no batch dependence and suits training from scratch.

BatchNorm statistics at inference (`statistics=` of `forward`): "running" normalises with the stored running
statistics (eval mode, what our trainer's validation uses); "page" normalises every sample with its own statistics
(functional batch norm per sample: the same output alone or in a batch, stored statistics untouched). ColorFlow's
released app never puts its fusion net in eval mode, so its one-page batches are normalised per page: "page" is how
the released weights are run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from pipelines.core.storage import atomic_path

NORMS = ("batch", "group")
BATCHNORM_STATISTICS = ("running", "page")
RELEASED_ENCODER_CHANNELS = (128, 128, 256, 512, 512)
RELEASED_DECODER_CHANNELS = (256, 512, 512, 512, 512)
RELEASED_BLOCKS_PER_BRANCH = 4

_OUR_KEY = re.compile(r"^branches\.(\d+)\.blocks\.(\d+)\.(.+)$")
_RELEASED_KEY = re.compile(r"^two_layer_resnets\.(\d+)\.block(\d+)\.(.+)$")
_OUR_TO_RELEASED_LEAF = {"norm1": "bn1", "norm2": "bn2"}
_RELEASED_TO_OUR_LEAF = {released: ours for ours, released in _OUR_TO_RELEASED_LEAF.items()}


def released_key(key: str) -> str:
    """`branches.1.blocks.0.norm1.weight` -> `two_layer_resnets.1.block1.bn1.weight` (the released file's name)."""
    match = _OUR_KEY.match(key)
    if match is None:
        raise ValueError(f"{key!r} is not a fusion-net parameter name")
    branch, block, rest = match.groups()
    head, _, tail = rest.partition(".")
    return f"two_layer_resnets.{branch}.block{int(block) + 1}.{_OUR_TO_RELEASED_LEAF.get(head, head)}.{tail}"


def our_key(key: str) -> str:
    """The inverse of `released_key`; raises ValueError on a name that is not in the released scheme."""
    match = _RELEASED_KEY.match(key)
    if match is None or int(match.group(2)) < 1:
        raise ValueError(f"{key!r} is not a released fusion-net parameter name")
    branch, block, rest = match.groups()
    head, _, tail = rest.partition(".")
    return f"branches.{branch}.blocks.{int(block) - 1}.{_RELEASED_TO_OUR_LEAF.get(head, head)}.{tail}"


def vae_fusion_channels(vae_config: Mapping) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(encoder tap widths, decoder add-point widths), branch by branch, for a diffusers AutoencoderKL config.

    Taps: encoder conv_in output, then each down block's output. Branch i (i < levels) is added at the input of
    decoder up block `levels - 1 - i`, the last branch at the mid-block input; the spatial sizes agree level by level.
    For SD1.5's VAE: (128, 128, 256, 512, 512) and (256, 512, 512, 512, 512), the released widths.
    """
    widths = tuple(int(c) for c in vae_config["block_out_channels"])
    levels = len(widths)
    encoder = (widths[0], *widths)
    reversed_widths = widths[::-1]
    up_block_inputs = [reversed_widths[0]] + [reversed_widths[j - 1] for j in range(1, levels)]
    decoder = tuple(up_block_inputs[levels - 1 - i] for i in range(levels)) + (widths[-1],)
    return encoder, decoder


def _normalise(norm: nn.Module, x: torch.Tensor, statistics: str) -> torch.Tensor:
    """`norm(x)`, except a BatchNorm under "page" statistics normalises each sample with its own mean and variance
    (what train-mode BatchNorm does to a batch of one) and leaves its running statistics untouched."""
    if statistics == "page" and isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return F.instance_norm(x, weight=norm.weight, bias=norm.bias, eps=norm.eps)
    return norm(x)


def _norm(kind: str, channels: int, num_groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(num_groups, channels), channels)


class FusionBlock(nn.Module):
    """conv3x3 -> norm -> ReLU -> conv3x3 -> norm, plus a (projected when widths differ) shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, norm_num_groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm1 = _norm(norm, out_channels, norm_num_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = _norm(norm, out_channels, norm_num_groups)
        self.shortcut = nn.Sequential()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                _norm(norm, out_channels, norm_num_groups),
            )

    def forward(self, x: torch.Tensor, statistics: str = "running") -> torch.Tensor:
        out = _normalise(self.norm1, self.conv1(x), statistics)
        out = _normalise(self.norm2, self.conv2(F.relu(out)), statistics)
        shortcut = x
        if len(self.shortcut):
            projection, norm = self.shortcut
            shortcut = _normalise(norm, projection(x), statistics)
        return F.relu(out + shortcut)


class FusionBranch(nn.Module):
    """One level's residual stack. With gradient checkpointing on, each block is recomputed in backward, except
    while BatchNorm updates its running statistics (a recomputed forward would update them twice)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, norm: str, norm_num_groups: int) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.blocks = nn.ModuleList(
            FusionBlock(widths[j], widths[j + 1], norm, norm_num_groups) for j in range(num_blocks)
        )
        self.gradient_checkpointing = False

    def _checkpointing(self) -> bool:
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            return False
        return not any(m.training for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))

    def forward(self, x: torch.Tensor, statistics: str = "running") -> torch.Tensor:
        checkpointing = self._checkpointing()
        for block in self.blocks:
            x = self._gradient_checkpointing_func(block, x, statistics) if checkpointing else block(x, statistics)
        return x


class GSRPFusion(ModelMixin, ConfigMixin):
    """Fuses the colour and B&W encoder taps into one map per decoder add point (see the module docstring).

    `encoder_channels[i]` is the width of tap i of ONE image (the branch sees twice that); `decoder_channels[i]` the
    width of the decoder point branch i is added to. Defaults are the released SD1.5 layout.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        encoder_channels: Sequence[int] = RELEASED_ENCODER_CHANNELS,
        decoder_channels: Sequence[int] = RELEASED_DECODER_CHANNELS,
        blocks_per_branch: int = RELEASED_BLOCKS_PER_BRANCH,
        norm: str = "batch",
        norm_num_groups: int = 32,
    ) -> None:
        super().__init__()
        if len(encoder_channels) != len(decoder_channels):
            raise ValueError(
                f"encoder_channels {list(encoder_channels)} and decoder_channels {list(decoder_channels)} "
                "must name the same number of branches"
            )
        if norm not in NORMS:
            raise ValueError(f"norm {norm!r} is not one of {NORMS}")
        if blocks_per_branch < 1:
            raise ValueError(f"blocks_per_branch must be >= 1, got {blocks_per_branch}")
        self.branches = nn.ModuleList(
            FusionBranch(2 * c_in, c_out, blocks_per_branch, norm, norm_num_groups)
            for c_in, c_out in zip(encoder_channels, decoder_channels, strict=True)
        )
        self._frozen_batchnorm_statistics = False

    @classmethod
    def from_vae_config(cls, vae_config: Mapping, **kwargs) -> GSRPFusion:
        """A fusion net whose widths match a diffusers AutoencoderKL config (`vae.config`)."""
        encoder, decoder = vae_fusion_channels(vae_config)
        return cls(encoder_channels=encoder, decoder_channels=decoder, **kwargs)

    def forward(
        self,
        color_features: Sequence[torch.Tensor],
        bw_features: Sequence[torch.Tensor],
        statistics: str = "running",
    ) -> list[torch.Tensor]:
        """One fused map per branch from the two images' encoder taps (same order as `GuidedVAE.encode_features`).

        `statistics="page"` normalises every sample with its own BatchNorm statistics (see the module docstring);
        "running" is the module's own behaviour (running statistics in eval mode, batch statistics in train mode).
        """
        if statistics not in BATCHNORM_STATISTICS:
            raise ValueError(f"statistics {statistics!r} is not one of {BATCHNORM_STATISTICS}")
        if not len(color_features) == len(bw_features) == len(self.branches):
            raise ValueError(
                f"expected {len(self.branches)} taps per image, got {len(color_features)} colour "
                f"and {len(bw_features)} B&W"
            )
        return [
            branch(torch.cat([color, bw], dim=1), statistics)
            for branch, color, bw in zip(self.branches, color_features, bw_features, strict=True)
        ]

    def freeze_batchnorm_statistics(self, frozen: bool = True) -> None:
        """Keep BatchNorm on its running statistics (no update) even in train mode; the affine params still train."""
        self._frozen_batchnorm_statistics = frozen
        self.train(self.training)

    @property
    def batchnorm_statistics_frozen(self) -> bool:
        return self._frozen_batchnorm_statistics

    def train(self, mode: bool = True) -> GSRPFusion:
        super().train(mode)
        if self._frozen_batchnorm_statistics:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def released_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under the released names, in the released order (BatchNorm variant only)."""
        if self.config.norm != "batch":
            raise ValueError(f"the released layout is BatchNorm; this fusion net uses norm={self.config.norm!r}")
        return {released_key(key): value for key, value in self.state_dict().items()}

    def save_released(self, path: str | Path) -> Path:
        """Write `MultiResNetModel.bin` in the released layout (plain torch state dict), atomically."""
        state = {key: value.detach().cpu().contiguous() for key, value in self.released_state_dict().items()}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        return Path(path)

    @classmethod
    def from_released(cls, path: str | Path, **config) -> GSRPFusion:
        """Load a released `MultiResNetModel.bin` strictly: the key set, order and every shape must equal this
        class's layout, else ValueError naming the first missing, unexpected, mis-shaped or misplaced key.

        Widths default to those stored in the file (so a tiny release loads too); pass `encoder_channels`,
        `decoder_channels` and `blocks_per_branch` (e.g. from `vae_fusion_channels`) to insist on a layout.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such released fusion-net file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - a truncated or foreign file: say which and why, in one line
            raise ValueError(f"{path}: not a readable torch state dict ({type(error).__name__}: {error})") from None
        if not isinstance(state, Mapping):
            raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
        config = {**_released_layout(state, path), **config, "norm": "batch"}
        with torch.device("meta"):  # no random init of 85M parameters that the file replaces anyway
            model = cls(**config)
        _check_layout(path, model.released_state_dict(), state)
        model.load_state_dict({our_key(key): value for key, value in state.items()}, strict=True, assign=True)
        return model.eval()


def _released_layout(state: Mapping[str, torch.Tensor], path: Path) -> dict:
    """Widths and depth as stored in a released file: branch i's first conv (input = 2 x tap width) and last norm."""
    branches: dict[int, set[int]] = {}
    for key in state:
        match = _RELEASED_KEY.match(key)
        if match:
            branches.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if not branches or sorted(branches) != list(range(len(branches))):
        raise ValueError(f"{path}: no branches 'two_layer_resnets.<i>' numbered from 0 (found {sorted(branches)})")
    depth = len(branches[0])
    encoder, decoder = [], []
    for i in range(len(branches)):
        first_key = f"two_layer_resnets.{i}.block1.conv1.weight"
        last_key = f"two_layer_resnets.{i}.block{depth}.bn2.weight"
        first, last = state.get(first_key), state.get(last_key)
        if first is None or first.ndim != 4:
            raise ValueError(f"{path}: missing or malformed key {first_key!r} (needed to read branch {i}'s widths)")
        if last is None or last.ndim != 1:
            raise ValueError(f"{path}: missing or malformed key {last_key!r} (needed to read branch {i}'s widths)")
        encoder.append(int(first.shape[1]) // 2)
        decoder.append(int(last.shape[0]))
    return {"encoder_channels": tuple(encoder), "decoder_channels": tuple(decoder), "blocks_per_branch": depth}


def _check_layout(path: Path, expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> None:
    missing = [key for key in expected if key not in found]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r} ({len(missing)} missing)")
    unexpected = [key for key in found if key not in expected]
    if unexpected:
        raise ValueError(f"{path}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for key, tensor in expected.items():
        shape = tuple(found[key].shape)
        if shape != tuple(tensor.shape):
            raise ValueError(f"{path}: key {key!r} has shape {list(shape)}, expected {list(tensor.shape)}")
    for position, (want, have) in enumerate(zip(expected, found, strict=True)):
        if want != have:
            raise ValueError(f"{path}: key order differs at position {position}: expected {want!r}, found {have!r}")
