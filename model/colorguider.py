"""The Colorization Guider: ColorFlow's BrushNet-style branch for the SD1.5 UNet (released as `ColorGuiderSDModel`).

A full-depth copy of the UNet (down, mid AND up blocks) that keeps self-attention and drops cross-attention. Its
first conv sees the noisy latent plus 9 conditioning channels (`cond` = [VAE latent of the references-only canvas
(4), mask at latent size with 1 on the reference ring (1), VAE latent of the frame-only canvas (4)]). One
zero-initialised 1x1 conv per layer output (12 down, 1 mid, 15 up for SD1.5) turns its activations into residuals
that `GuidedUNet` adds to the frozen UNet's stream, all scaled by `conditioning_scale`.

Built only from stock diffusers blocks: the released config names `SelfAttnDownBlock2D`, `UNetMidBlock2DSelfAttn`
and `SelfAttnUpBlock2D`, which are the stock cross-attention blocks built without a cross-attention dimension (no
`attn2`/`norm2`), so the names are mapped rather than new blocks written. Module names (`conv_in_condition`,
`brushnet_down_blocks`, ...) are those of the released checkpoint, so its state dict loads unchanged.
`from_pretrained` is strict: the file's keys and shapes must equal the model's (`check_guider_weights`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)
from diffusers.utils import BaseOutput
from torch import nn

from model.state_keys import compare_state_shapes, read_tensor_shapes
from model.unet_walk import (
    run_down_block,
    run_mid_block,
    run_up_block,
    timestep_batch,
    upsample_sizes_needed,
)

RELEASED_CLASS_NAME = "ColorGuiderSDModel"
GUIDER_DOWN_BLOCKS = ("SelfAttnDownBlock2D", "SelfAttnDownBlock2D", "SelfAttnDownBlock2D", "DownBlock2D")
GUIDER_MID_BLOCK = "UNetMidBlock2DSelfAttn"
GUIDER_UP_BLOCKS = ("UpBlock2D", "SelfAttnUpBlock2D", "SelfAttnUpBlock2D", "SelfAttnUpBlock2D")

# Block names a guider config may use -> does the block carry (self-)attention. The cross-attention names are
# accepted as synonyms: a guider never has cross-attention.
_ATTENTION_DOWN = {"SelfAttnDownBlock2D": True, "CrossAttnDownBlock2D": True, "DownBlock2D": False}
_ATTENTION_UP = {"SelfAttnUpBlock2D": True, "CrossAttnUpBlock2D": True, "UpBlock2D": False}
_ATTENTION_MID = ("UNetMidBlock2DSelfAttn", "UNetMidBlock2DCrossAttn")
_GUIDER_NAME_OF_UNET_DOWN = {"CrossAttnDownBlock2D": "SelfAttnDownBlock2D", "DownBlock2D": "DownBlock2D"}
_GUIDER_NAME_OF_UNET_UP = {"CrossAttnUpBlock2D": "SelfAttnUpBlock2D", "UpBlock2D": "UpBlock2D"}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass
class GuiderOutput(BaseOutput):
    """Residuals for the guided UNet, already multiplied by the conditioning scale, in consumption order."""

    down_residuals: tuple[torch.Tensor, ...]
    mid_residual: torch.Tensor
    up_residuals: tuple[torch.Tensor, ...]


def build_guider_cond(
    refs_latent: torch.Tensor, mask: torch.Tensor, frame_latent: torch.Tensor, mode: str = "bilinear"
) -> torch.Tensor:
    """The guider's 9 conditioning channels: cat[latent(refs_only), mask at latent size, latent(frame_only)].

    `mask` is (B, 1, H, W) at any resolution with 1 on the reference ring; it is resized to the latent size with
    `mode` (bilinear as the released inference; BrushNet's training used nearest).
    """
    if mask.ndim == 3:
        mask = mask[:, None]
    size = refs_latent.shape[-2:]
    if frame_latent.shape != refs_latent.shape:
        raise ValueError(
            f"build_guider_cond: latents differ: {tuple(refs_latent.shape)} vs {tuple(frame_latent.shape)}"
        )
    if mask.shape[-2:] != size:
        mask = torch.nn.functional.interpolate(mask.to(refs_latent.dtype), size=size, mode=mode)
    return torch.cat([refs_latent, mask.to(refs_latent.dtype), frame_latent], dim=1)


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _level_block(
    attention_block: type[nn.Module],
    plain_block: type[nn.Module],
    with_attention: bool,
    common: dict,
    *,
    layers: int,
    heads: int,
    use_linear_projection: bool,
    upcast_attention: bool,
) -> nn.Module:
    """One down or up level, so both paths build their attention blocks alike: self-attention only
    (`cross_attention_dim=None`: the guider never sees the text), or the plain block."""
    if not with_attention:
        return plain_block(**common)
    return attention_block(
        **common,
        transformer_layers_per_block=layers,
        num_attention_heads=heads,
        cross_attention_dim=None,
        use_linear_projection=use_linear_projection,
        upcast_attention=upcast_attention,
    )


def _per_block(value, count: int, name: str) -> list:
    values = [value] * count if isinstance(value, int) or value is None else list(value)
    if len(values) != count:
        raise ValueError(f"ColorGuider: {name} has {len(values)} entries, expected {count} (one per block)")
    return values


class ColorGuider(ModelMixin, ConfigMixin):
    """The Colorization Guider (config and state dict compatible with the released `ColorGuiderSDModel`).

    Config keys of the released `config.json` that build nothing in the SD release (`cross_attention_dim`: text is
    accepted but never used; `conditioning_embedding_out_channels`; `only_cross_attention`) are kept so the file
    round-trips; options that would add modules the release lacks (class/addition embeddings, encoder projection)
    must stay null.
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = 9,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = GUIDER_DOWN_BLOCKS,
        mid_block_type: str | None = GUIDER_MID_BLOCK,
        up_block_types: tuple[str, ...] = GUIDER_UP_BLOCKS,
        only_cross_attention: bool = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 768,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        projection_class_embeddings_input_dim: int | None = None,
        brushnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        global_pool_conditions: bool = False,
        addition_embed_type_num_heads: int = 64,
    ):
        super().__init__()
        unsupported = {
            "encoder_hid_dim": encoder_hid_dim,
            "encoder_hid_dim_type": encoder_hid_dim_type,
            "class_embed_type": class_embed_type,
            "addition_embed_type": addition_embed_type,
            "num_class_embeds": num_class_embeds,
        }
        for name, value in unsupported.items():
            if value is not None:
                raise ValueError(f"ColorGuider: {name}={value!r} is not supported (the SD1.5 guider has none)")
        if only_cross_attention:
            raise ValueError("ColorGuider: only_cross_attention must be false (the guider has no cross-attention)")
        if brushnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(f"ColorGuider: unknown conditioning channel order {brushnet_conditioning_channel_order!r}")
        if len(down_block_types) != len(up_block_types) or len(down_block_types) != len(block_out_channels):
            raise ValueError(
                "ColorGuider: down_block_types, up_block_types and block_out_channels must have the same length"
            )
        for name in down_block_types:
            if name not in _ATTENTION_DOWN:
                raise ValueError(
                    f"ColorGuider: unknown down block type {name!r}; expected one of {list(_ATTENTION_DOWN)}"
                )
        for name in up_block_types:
            if name not in _ATTENTION_UP:
                raise ValueError(f"ColorGuider: unknown up block type {name!r}; expected one of {list(_ATTENTION_UP)}")
        if mid_block_type not in _ATTENTION_MID:
            raise ValueError(
                f"ColorGuider: unknown mid block type {mid_block_type!r}; expected one of {_ATTENTION_MID}"
            )

        levels = len(block_out_channels)
        # SD's historical naming: attention_head_dim holds the number of heads when num_attention_heads is unset.
        heads = _per_block(num_attention_heads or attention_head_dim, levels, "num_attention_heads")
        layers = _per_block(transformer_layers_per_block, levels, "transformer_layers_per_block")
        time_embed_dim = block_out_channels[0] * 4

        self.conv_in_condition = nn.Conv2d(in_channels + conditioning_channels, block_out_channels[0], 3, padding=1)
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn)

        self.down_blocks = nn.ModuleList()
        self.brushnet_down_blocks = nn.ModuleList([_zero_conv(block_out_channels[0])])
        output_channel = block_out_channels[0]
        for level, name in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[level]
            common = {
                "num_layers": layers_per_block,
                "in_channels": input_channel,
                "out_channels": output_channel,
                "temb_channels": time_embed_dim,
                "add_downsample": level < levels - 1,
                "resnet_eps": norm_eps,
                "resnet_act_fn": act_fn,
                "resnet_groups": norm_num_groups,
                "downsample_padding": downsample_padding,
                "resnet_time_scale_shift": resnet_time_scale_shift,
            }
            block = _level_block(
                CrossAttnDownBlock2D,
                DownBlock2D,
                _ATTENTION_DOWN[name],
                common,
                layers=layers[level],
                heads=heads[level],
                use_linear_projection=use_linear_projection,
                upcast_attention=upcast_attention,
            )
            self.down_blocks.append(block)
            outputs = layers_per_block + (1 if level < levels - 1 else 0)
            self.brushnet_down_blocks.extend(_zero_conv(output_channel) for _ in range(outputs))

        self.brushnet_mid_block = _zero_conv(block_out_channels[-1])
        self.mid_block = UNetMidBlock2DCrossAttn(
            in_channels=block_out_channels[-1],
            temb_channels=time_embed_dim,
            transformer_layers_per_block=layers[-1],
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            output_scale_factor=mid_block_scale_factor,
            resnet_time_scale_shift=resnet_time_scale_shift,
            cross_attention_dim=None,
            num_attention_heads=heads[-1],
            resnet_groups=norm_num_groups,
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
        )

        self.up_blocks = nn.ModuleList()
        self.brushnet_up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        reversed_heads = list(reversed(heads))
        reversed_layers = list(reversed(layers))
        output_channel = reversed_channels[0]
        self.num_upsamplers = 0
        for level, name in enumerate(up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_channels[level]
            input_channel = reversed_channels[min(level + 1, levels - 1)]
            add_upsample = level < levels - 1
            self.num_upsamplers += int(add_upsample)
            common = {
                "num_layers": layers_per_block + 1,
                "in_channels": input_channel,
                "out_channels": output_channel,
                "prev_output_channel": prev_output_channel,
                "temb_channels": time_embed_dim,
                "resolution_idx": level,
                "add_upsample": add_upsample,
                "resnet_eps": norm_eps,
                "resnet_act_fn": act_fn,
                "resnet_groups": norm_num_groups,
                "resnet_time_scale_shift": resnet_time_scale_shift,
            }
            block = _level_block(
                CrossAttnUpBlock2D,
                UpBlock2D,
                _ATTENTION_UP[name],
                common,
                layers=reversed_layers[level],
                heads=reversed_heads[level],
                use_linear_projection=use_linear_projection,
                upcast_attention=upcast_attention,
            )
            self.up_blocks.append(block)
            outputs = layers_per_block + 1 + int(add_upsample)
            self.brushnet_up_blocks.extend(_zero_conv(output_channel) for _ in range(outputs))

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        conditioning_channels: int = 9,
        load_weights_from_unet: bool = True,
    ) -> ColorGuider:
        """A guider shaped after `unet` (SD1.5 -> the released layout) initialised from its weights.

        conv_in_condition: input channels 0-3 (noisy latent) and 4-7 (references-only latent) copy the UNet's
        conv_in, the mask and frame-only latent channels start at zero, the bias is copied; time embedding and all
        down/mid/up blocks are copied (the UNet's cross-attention `attn2`/`norm2` weights are dropped). The 28 output
        convs stay zero, so the guided UNet starts as the plain UNet. A LoRA-injected UNet contributes its base
        weights. The guider is built in float32 on the UNet's device (trainable weights stay fp32).
        """
        config = unet.config
        for name in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type"):
            if config.get(name) is not None:
                raise ValueError(f"ColorGuider.from_unet: UNet {name}={config.get(name)!r} is not supported")
        try:
            down_types = tuple(_GUIDER_NAME_OF_UNET_DOWN[name] for name in config.down_block_types)
            up_types = tuple(_GUIDER_NAME_OF_UNET_UP[name] for name in config.up_block_types)
        except KeyError as error:
            raise ValueError(f"ColorGuider.from_unet: unsupported UNet block type {error.args[0]!r}") from None
        if config.mid_block_type != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"ColorGuider.from_unet: unsupported UNet mid block {config.mid_block_type!r}")
        if not isinstance(config.layers_per_block, int):
            raise ValueError("ColorGuider.from_unet: per-level layers_per_block is not supported")
        guider = cls(
            in_channels=config.in_channels,
            conditioning_channels=conditioning_channels,
            flip_sin_to_cos=config.flip_sin_to_cos,
            freq_shift=config.freq_shift,
            down_block_types=down_types,
            mid_block_type=GUIDER_MID_BLOCK,
            up_block_types=up_types,
            block_out_channels=tuple(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            downsample_padding=config.downsample_padding,
            mid_block_scale_factor=config.mid_block_scale_factor,
            act_fn=config.act_fn,
            norm_num_groups=config.norm_num_groups,
            norm_eps=config.norm_eps,
            cross_attention_dim=config.cross_attention_dim,
            transformer_layers_per_block=config.transformer_layers_per_block,
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
            use_linear_projection=config.use_linear_projection,
            upcast_attention=config.upcast_attention,
            resnet_time_scale_shift=config.resnet_time_scale_shift,
        )
        if load_weights_from_unet:
            guider._copy_from_unet(unet)
        return guider.to(unet.device)

    @torch.no_grad()
    def _copy_from_unet(self, unet: UNet2DConditionModel) -> None:
        source = _base_weights(unet)
        weight = torch.zeros_like(self.conv_in_condition.weight)
        latent_channels = unet.config.in_channels
        conv_in = source["conv_in.weight"].to(weight.dtype)
        weight[:, :latent_channels] = conv_in
        if weight.shape[1] >= 2 * latent_channels:
            weight[:, latent_channels : 2 * latent_channels] = conv_in
        self.conv_in_condition.weight.copy_(weight)
        self.conv_in_condition.bias.copy_(source["conv_in.bias"])
        copied = {}
        for prefix in ("time_embedding.", "down_blocks.", "mid_block.", "up_blocks."):
            copied.update({key: value for key, value in source.items() if key.startswith(prefix)})
        own = self.state_dict()
        wanted = [
            key for key in own if key.split(".")[0] in ("time_embedding", "down_blocks", "mid_block", "up_blocks")
        ]
        missing = [key for key in wanted if key not in copied]
        if missing:
            raise ValueError(
                f"ColorGuider.from_unet: the UNet has no weight for {missing[0]!r} ({len(missing)} missing)"
            )
        dropped = [key for key in copied if key not in own]
        foreign = [key for key in dropped if ".attn2." not in key and ".norm2." not in key]
        if foreign:
            raise ValueError(f"ColorGuider.from_unet: UNet weight {foreign[0]!r} has no place in the guider")
        for key in wanted:
            if own[key].shape != copied[key].shape:
                raise ValueError(
                    f"ColorGuider.from_unet: {key!r} is {tuple(copied[key].shape)} in the UNet, "
                    f"{tuple(own[key].shape)} in the guider"
                )
        self.load_state_dict({key: copied[key] for key in wanted}, strict=False)

    @property
    def residual_counts(self) -> tuple[int, int, int]:
        """(down, mid, up) residual counts: (12, 1, 15) for SD1.5."""
        return len(self.brushnet_down_blocks), 1, len(self.brushnet_up_blocks)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> GuiderOutput:
        """Residuals for the noisy latent `sample` (B,4,h,w) at `timestep` given `cond` (B,9,h,w) =
        cat[latent(refs_only), mask (1 = ring), latent(frame_only)].

        `encoder_hidden_states` is accepted for signature parity with the release and ignored: the guider has no
        cross-attention.
        """
        del encoder_hidden_states
        expected = self.config.conditioning_channels
        if cond.shape[1] != expected or cond.shape[-2:] != sample.shape[-2:]:
            raise ValueError(
                f"ColorGuider: cond must be (B, {expected}, {sample.shape[-2]}, {sample.shape[-1]}), "
                f"got {tuple(cond.shape)}"
            )
        if self.config.brushnet_conditioning_channel_order == "bgr":
            cond = torch.flip(cond, dims=[1])
        t_emb = self.time_proj(timestep_batch(timestep, sample)).to(dtype=sample.dtype)
        emb = self.time_embedding(t_emb)

        hidden = self.conv_in_condition(torch.cat([sample, cond.to(sample.dtype)], dim=1))
        skips: tuple[torch.Tensor, ...] = (hidden,)
        for block in self.down_blocks:
            hidden, block_skips = run_down_block(block, hidden, emb)
            skips += block_skips
        down_activations = skips

        hidden = run_mid_block(self.mid_block, hidden, emb)
        mid_activation = hidden

        forward_sizes = upsample_sizes_needed(sample, self.num_upsamplers)
        up_activations: tuple[torch.Tensor, ...] = ()
        for index, block in enumerate(self.up_blocks):
            block_skips, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            last = index == len(self.up_blocks) - 1
            upsample_size = skips[-1].shape[2:] if forward_sizes and not last else None
            hidden, outputs = run_up_block(block, hidden, block_skips, emb, upsample_size=upsample_size)
            up_activations += outputs

        down = tuple(
            conv(x) * conditioning_scale for x, conv in zip(down_activations, self.brushnet_down_blocks, strict=True)
        )
        mid = self.brushnet_mid_block(mid_activation) * conditioning_scale
        up = tuple(
            conv(x) * conditioning_scale for x, conv in zip(up_activations, self.brushnet_up_blocks, strict=True)
        )
        if self.config.global_pool_conditions:
            down = tuple(x.mean(dim=(2, 3), keepdim=True) for x in down)
            mid = mid.mean(dim=(2, 3), keepdim=True)
            up = tuple(x.mean(dim=(2, 3), keepdim=True) for x in up)
        return GuiderOutput(down_residuals=down, mid_residual=mid, up_residuals=up)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args, **kwargs) -> ColorGuider:
        """diffusers' loader, made strict: a local folder's weight file must hold exactly the model's keys and shapes
        (diffusers would only warn on extra keys and re-initialise missing ones)."""
        folder = Path(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            folder = folder / kwargs["subfolder"]
        if folder.is_dir():
            weights = guider_weight_file(folder, prefer_safetensors=kwargs.get("use_safetensors") is not False)
            check_guider_weights(folder, weights)
            if weights.suffix == ".bin":
                kwargs.setdefault("use_safetensors", False)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


def _base_weights(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's own weights without LoRA: peft's `base_layer` spelling folded back, adapter tensors dropped."""
    weights = {}
    for key, value in unet.state_dict().items():
        if ".lora_" in key or ".lora_magnitude_vector" in key:
            continue
        weights[key.replace(".base_layer.", ".")] = value
    return weights


def guider_weight_file(folder: str | Path, prefer_safetensors: bool = True) -> Path:
    """The weight file of a guider folder: diffusion_pytorch_model.safetensors, else .bin (the other way round when
    `prefer_safetensors` is False)."""
    folder = Path(folder)
    for name in WEIGHT_FILES if prefer_safetensors else reversed(WEIGHT_FILES):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no guider weights ({' or '.join(WEIGHT_FILES)})")


def expected_guider_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a guider built from `config`, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = ColorGuider.from_config(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def check_guider_weights(folder: str | Path, weights: Path | None = None) -> None:
    """Check a guider folder's weight file against its config.json before loading; ValueError naming the first
    missing, unexpected and mis-shaped key."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json")
    config = json.loads(config_path.read_text())
    weights = weights or guider_weight_file(folder)
    compare_state_shapes(expected_guider_shapes(config), read_tensor_shapes(weights), str(weights))
