"""The frozen SD UNet driven by the Colorization Guider (BrushNet-style residual injection, no diffusers fork).

`GuidedUNet` runs the stock `UNet2DConditionModel`'s own submodules (LoRA-injected or not) in the stock order and
adds the guider's residuals where ColorFlow's patched UNet does:
- down[0] right after conv_in, but the conv_in skip for the decoder is captured BEFORE it is added;
- inside each down block after every resnet(+cross-attention) layer and after the downsampler, added to the hidden
  state and THEN saved as the skip (the skips carry the guidance);
- the mid residual after the mid block;
- inside each up block after every layer (after the skip concat and the layer) and after the upsampler.
Gradient checkpointing follows the UNet's own flag (`unet.enable_gradient_checkpointing()`), resnet by resnet as the
stock blocks do, so outputs and gradients are the same with it on or off.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from model.colorguider import ColorGuider, GuiderOutput
from model.unet_walk import layer_count, run_down_block, run_mid_block, run_up_block, upsample_sizes_needed


def unwrap_unet(unet: torch.nn.Module) -> UNet2DConditionModel:
    """The stock UNet inside a peft `PeftModel`, DDP (`.module`) or `torch.compile` (`._orig_mod`) wrapper."""
    inner = unet
    for _ in range(8):
        if isinstance(inner, UNet2DConditionModel):
            break
        if hasattr(inner, "_orig_mod"):
            inner = inner._orig_mod
        elif hasattr(inner, "module"):
            inner = inner.module
        elif hasattr(inner, "base_model"):
            inner = inner.base_model
            inner = getattr(inner, "model", inner)
        else:
            break
    if not isinstance(inner, UNet2DConditionModel):
        raise TypeError(f"GuidedUNet: expected a UNet2DConditionModel, got {type(unet).__name__}")
    return inner


class GuidedUNet(torch.nn.Module):
    """`.unet` (stock UNet2DConditionModel, usually LoRA-injected) plus `.guider` (ColorGuider): one noise predictor."""

    def __init__(self, unet: torch.nn.Module, guider: ColorGuider):
        super().__init__()
        self.unet = unet
        self.guider = guider
        base = unwrap_unet(unet)
        for name in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type"):
            if base.config.get(name) is not None:
                raise ValueError(f"GuidedUNet: UNet {name}={base.config.get(name)!r} is not supported")
        expected = (
            1 + sum(layer_count(block) for block in base.down_blocks),
            1,
            sum(layer_count(block) for block in base.up_blocks),
        )
        if guider.residual_counts != expected:
            raise ValueError(
                f"GuidedUNet: the guider gives {guider.residual_counts} (down, mid, up) residuals, "
                f"the UNet takes {expected}"
            )

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint both the UNet's and the guider's resnets and transformer blocks."""
        unwrap_unet(self.unet).enable_gradient_checkpointing()
        self.guider.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        unwrap_unet(self.unet).disable_gradient_checkpointing()
        self.guider.disable_gradient_checkpointing()

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        guider_cond: torch.Tensor | None,
        conditioning_scale: float = 1.0,
        guider_output: GuiderOutput | None = None,
    ) -> torch.Tensor:
        """Noise prediction for `noisy_latents` (B,4,h,w); `guider_cond` (B,9,h,w) as `ColorGuider.forward` takes it.

        Pass `guider_output` instead of `guider_cond` to reuse residuals already computed (e.g. once for both CFG
        halves: the guider ignores the text, so both halves get the same residuals).
        """
        if guider_output is None:
            if guider_cond is None:
                raise ValueError("GuidedUNet: give guider_cond or guider_output")
            dtype = self.guider.dtype
            guider_output = self.guider(
                noisy_latents.to(dtype), timesteps, guider_cond.to(dtype), conditioning_scale=conditioning_scale
            )
        return guided_unet_forward(
            unwrap_unet(self.unet), noisy_latents, timesteps, encoder_hidden_states, guider_output
        )


def guided_unet_forward(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    residuals: GuiderOutput,
) -> torch.Tensor:
    """The stock UNet2DConditionModel forward (SD1.5 subset) with the guider's residuals added in BrushNet order."""
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)

    down_residuals = iter(residuals.down_residuals)
    up_residuals = iter(residuals.up_residuals)

    hidden = unet.conv_in(sample)
    skips: tuple[torch.Tensor, ...] = (hidden,)  # captured before the first residual
    hidden = hidden + next(down_residuals).to(hidden.dtype)
    for block in unet.down_blocks:
        hidden, block_skips = run_down_block(block, hidden, emb, encoder_hidden_states, residuals=down_residuals)
        skips += block_skips

    hidden = run_mid_block(unet.mid_block, hidden, emb, encoder_hidden_states)
    hidden = hidden + residuals.mid_residual.to(hidden.dtype)

    forward_sizes = upsample_sizes_needed(sample, unet.num_upsamplers)
    for index, block in enumerate(unet.up_blocks):
        block_skips, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
        last = index == len(unet.up_blocks) - 1
        upsample_size = skips[-1].shape[2:] if forward_sizes and not last else None
        hidden, _ = run_up_block(
            block, hidden, block_skips, emb, encoder_hidden_states, upsample_size, residuals=up_residuals
        )

    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)
