"""The line-art Colorization Guider: ColorFlow's PixArt-alpha branch (released as `ColorGuiderPixArtModel`).

A half-depth PixArt DiT without text and without output head: its own `PatchEmbed` over 13 channels (the noisy latent
plus 9 conditioning channels: [VAE latent of the references-only canvas (4), mask at latent size with 1 on the
reference ring (1), VAE latent of the frame-only canvas (4)]), `num_layers // 2` self-attention `BasicTransformerBlock`s
(no cross-attention), its own adaLN-single with the resolution/aspect micro-conditions, and one zero-initialised
Linear adapter per block whose output `GuidedPixArtTransformer` adds after the same block of the base transformer.

Module names are the release's, so its state dict loads unchanged, with one exception: the release also registers
the last adapter as `after_proj` (a second name for `adapter_linear.13`, which is why its weight file is a pickle).
We keep one module; `from_pretrained` accepts the alias keys and checks they equal the last adapter's, and
`save_released` writes them back. `from_pretrained` is strict (missing, unexpected or mis-shaped keys are errors) and
`cond_channels` defaults to 9, the released value (the release's class default of 5 does not load its own file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import PixArtTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormSingle
from diffusers.utils import BaseOutput
from torch import nn

from model.pixart_walk import run_block
from model.state_keys import compare_state_shapes, read_state_dict
from model.unet_walk import timestep_batch

RELEASED_CLASS_NAME = "ColorGuiderPixArtModel"
RELEASED_DIFFUSERS_VERSION = "0.31.0.dev0"
ALIAS_PREFIX = "after_proj."
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors")
# config keys of the base transformer the guider shares (everything that shapes the blocks and the embeddings)
_SHARED_CONFIG = (
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "num_layers",
    "dropout",
    "norm_num_groups",
    "cross_attention_dim",
    "attention_bias",
    "sample_size",
    "patch_size",
    "activation_fn",
    "num_embeds_ada_norm",
    "upcast_attention",
    "norm_type",
    "norm_elementwise_affine",
    "norm_eps",
    "interpolation_scale",
    "use_additional_conditions",
    "caption_channels",
    "attention_type",
)


@dataclass
class PixArtGuiderOutput(BaseOutput):
    """One residual per guider block, (B, tokens, inner_dim), already times the conditioning scale."""

    block_residuals: tuple[torch.Tensor, ...]


def _zero_linear(width: int) -> nn.Linear:
    layer = nn.Linear(width, width)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class PixArtColorGuider(ModelMixin, ConfigMixin):
    """The PixArt Colorization Guider (config and state dict compatible with the released `ColorGuiderPixArtModel`).

    Config keys that build nothing here (`caption_channels`, `cross_attention_dim`, `out_channels`,
    `norm_num_groups`) are kept so the released config.json round-trips.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["BasicTransformerBlock", "PatchEmbed"]

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        cond_channels: int = 9,
        out_channels: int | None = 8,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = 1152,
        attention_bias: bool = True,
        sample_size: int = 128,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: int | None = None,
        use_additional_conditions: bool | None = None,
        caption_channels: int | None = None,
        attention_type: str | None = "default",
    ):
        super().__init__()
        if norm_type != "ada_norm_single" or num_embeds_ada_norm is None:
            raise ValueError(
                f"PixArtColorGuider: norm_type must be 'ada_norm_single' with num_embeds_ada_norm set, got "
                f"{norm_type!r} / {num_embeds_ada_norm!r}"
            )
        if num_layers < 2:
            raise ValueError(f"PixArtColorGuider: num_layers (the base depth) must be >= 2, got {num_layers}")
        self.inner_dim = num_attention_heads * attention_head_dim
        if use_additional_conditions is None:  # the stock PixArt rule: only the 1024 model has size conditions
            use_additional_conditions = sample_size == 128
        self.use_additional_conditions = use_additional_conditions
        self.gradient_checkpointing = False
        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels + cond_channels,
            embed_dim=self.inner_dim,
            interpolation_scale=interpolation_scale if interpolation_scale is not None else max(sample_size // 64, 1),
        )
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                self.inner_dim,
                num_attention_heads,
                attention_head_dim,
                dropout=dropout,
                cross_attention_dim=None,
                activation_fn=activation_fn,
                num_embeds_ada_norm=num_embeds_ada_norm,
                attention_bias=attention_bias,
                upcast_attention=upcast_attention,
                norm_type=norm_type,
                norm_elementwise_affine=norm_elementwise_affine,
                norm_eps=norm_eps,
                attention_type=attention_type,
            )
            for _ in range(num_layers // 2)
        )
        self.adapter_linear = nn.ModuleList(_zero_linear(self.inner_dim) for _ in range(num_layers // 2))
        self.adaln_single = AdaLayerNormSingle(self.inner_dim, use_additional_conditions=use_additional_conditions)

    @property
    def num_residuals(self) -> int:
        """How many base blocks get a residual (14 for PixArt-XL-2's 28)."""
        return len(self.transformer_blocks)

    @classmethod
    def from_transformer(cls, transformer: PixArtTransformer2DModel, cond_channels: int = 9) -> PixArtColorGuider:
        """A guider shaped after `transformer`, initialised from it (the Cobra recipe; ColorFlow ships no init).

        Blocks 0..n/2-1 and adaLN-single are copied (the base's cross-attention `attn2`/`norm2` dropped); the patch
        embedding's first latent channels copy the base's, the conditioning channels start at zero, the bias is
        copied; the adapters stay zero, so the guided transformer starts as the plain transformer. A LoRA-injected
        transformer contributes its base weights. Built in float32 on the transformer's device.
        """
        config = {name: transformer.config[name] for name in _SHARED_CONFIG if name in transformer.config}
        guider = cls(**config, cond_channels=cond_channels)
        source = base_weights(transformer)
        own = guider.state_dict()
        copied = {}
        for key, value in own.items():
            if key.startswith(("transformer_blocks.", "adaln_single.")):
                if key not in source or source[key].shape != value.shape:
                    raise ValueError(
                        f"PixArtColorGuider.from_transformer: the transformer has no {key!r} of shape "
                        f"{tuple(value.shape)}"
                    )
                copied[key] = source[key]
        weight = torch.zeros_like(own["pos_embed.proj.weight"])
        latent_channels = transformer.config.in_channels
        weight[:, :latent_channels] = source["pos_embed.proj.weight"]
        copied["pos_embed.proj.weight"] = weight
        copied["pos_embed.proj.bias"] = source["pos_embed.proj.bias"]
        guider.load_state_dict(copied, strict=False)
        return guider.to(transformer.device)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        cond: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        conditioning_scale: float = 1.0,
    ) -> PixArtGuiderOutput:
        """Residuals for the noisy latent `sample` (B, 4, h, w) at `timestep` given `cond` (B, 9, h, w) =
        cat[latent(refs_only), mask (1 = ring), latent(frame_only)]; `added_cond_kwargs` holds the micro-conditions
        (`micro_conditions` of the canvas's pixel size), mandatory when the guider uses them."""
        expected = self.config.cond_channels
        if cond.shape[0] != sample.shape[0] or cond.shape[1] != expected or cond.shape[-2:] != sample.shape[-2:]:
            raise ValueError(
                f"PixArtColorGuider: cond must be ({sample.shape[0]}, {expected}, {sample.shape[-2]}, "
                f"{sample.shape[-1]}), got {tuple(cond.shape)}"
            )
        if self.use_additional_conditions and added_cond_kwargs is None:
            raise ValueError("PixArtColorGuider: added_cond_kwargs (resolution, aspect_ratio) are required")
        batch = sample.shape[0]
        hidden = self.pos_embed(torch.cat([sample, cond.to(sample.dtype)], dim=1))
        timestep_embedding, _ = self.adaln_single(
            timestep_batch(timestep, sample), added_cond_kwargs, batch_size=batch, hidden_dtype=hidden.dtype
        )
        residuals = []
        for block, adapter in zip(self.transformer_blocks, self.adapter_linear, strict=True):
            hidden = run_block(self, block, hidden, timestep_embedding)
            residuals.append(adapter(hidden) * conditioning_scale)
        return PixArtGuiderOutput(block_residuals=tuple(residuals))

    # ---- released layout -------------------------------------------------------------------------------------------

    def released_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict in the release's order: `after_proj.*` (the same tensors as the last adapter) right before
        `adapter_linear.*`."""
        last = f"adapter_linear.{self.num_residuals - 1}."
        own = {key: value.detach().cpu() for key, value in self.state_dict().items()}
        state: dict[str, torch.Tensor] = {}
        for key, value in own.items():
            if key == "adapter_linear.0.weight":  # the very same tensors: the file stores them once, as the release's
                state[ALIAS_PREFIX + "weight"] = own[last + "weight"]
                state[ALIAS_PREFIX + "bias"] = own[last + "bias"]
            state[key] = value
        return state

    def save_released(self, folder: str | Path) -> Path:
        """config.json (class name `ColorGuiderPixArtModel`) + diffusion_pytorch_model.bin (a torch pickle: the alias
        shares storage, which safetensors refuses), as the release's sketch/ and shading/ folders hold them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {key: list(value) if isinstance(value, tuple) else value for key, value in self.config.items()}
        config = {key: value for key, value in config.items() if not key.startswith("_")}
        config = {"_class_name": RELEASED_CLASS_NAME, "_diffusers_version": RELEASED_DIFFUSERS_VERSION, **config}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        torch.save(self.released_state_dict(), folder / WEIGHT_FILES[0])
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype: torch.dtype | None = None) -> PixArtColorGuider:
        """A guider from a local folder (config.json + diffusion_pytorch_model.bin or .safetensors), strictly: the
        file must hold exactly the model's keys and shapes, plus optionally the `after_proj.*` alias, which must
        equal the last adapter. Errors name the first missing, unexpected or mis-shaped key."""
        folder = Path(folder)
        config_path = folder / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder}: no {CONFIG_FILE} (not a PixArt guider folder)")
        weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{folder}: no guider weights ({' or '.join(WEIGHT_FILES)})")
        config = json.loads(config_path.read_text())
        class_name = config.get("_class_name", RELEASED_CLASS_NAME)
        if class_name not in (RELEASED_CLASS_NAME, cls.__name__):
            raise ValueError(f"{config_path}: _class_name {class_name!r} is not a PixArt guider")
        guider = cls.from_config(config)
        state = fold_alias(read_state_dict(weights), guider.num_residuals, str(weights))
        compare_state_shapes(
            {key: tuple(value.shape) for key, value in guider.state_dict().items()},
            {key: tuple(value.shape) for key, value in state.items()},
            str(weights),
        )
        guider.load_state_dict(state, strict=True)
        if torch_dtype is not None:
            guider.to(torch_dtype)
        return guider.eval()


def fold_alias(state: dict[str, torch.Tensor], num_residuals: int, where: str) -> dict[str, torch.Tensor]:
    """`state` without the `after_proj.*` alias, after checking it equals `adapter_linear.<last>.*` (both keys or
    neither must be there)."""
    alias = {key: value for key, value in state.items() if key.startswith(ALIAS_PREFIX)}
    if not alias:
        return state
    last = f"adapter_linear.{num_residuals - 1}."
    for name in ("weight", "bias"):
        key = ALIAS_PREFIX + name
        if key not in alias:
            raise ValueError(f"{where}: the alias has {sorted(alias)} but lacks {key!r}")
        if last + name in state and not torch.equal(alias[key], state[last + name]):
            raise ValueError(f"{where}: {key!r} differs from {last + name!r} (the alias must equal the last adapter)")
    unknown = sorted(set(alias) - {ALIAS_PREFIX + "weight", ALIAS_PREFIX + "bias"})
    if unknown:
        raise ValueError(f"{where}: unexpected key {unknown[0]!r}")
    return {key: value for key, value in state.items() if not key.startswith(ALIAS_PREFIX)}


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's own weights without LoRA: peft's `base_layer` spelling folded back, adapter tensors dropped."""
    weights = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        weights[key.replace(".base_layer.", ".")] = value
    return weights
