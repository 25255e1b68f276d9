"""The frozen PixArt-alpha transformer driven by the line-art Colorization Guider (no diffusers fork).

`guided_pixart_forward` runs the stock `PixArtTransformer2DModel`'s own submodules (LoRA-injected or not) in the stock
order and adds the guider's i-th residual to the hidden states right after block i, for the guider's blocks (0..13
for PixArt-XL-2), with no other change: that is what ColorFlow's patched transformer does with its `control_list`.
The output has the transformer's 8 channels: the noise prediction (first half) and the learned-variance head (second
half), which sampling and training ignore. Gradient checkpointing follows each model's own flag, as the stock loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import PixArtTransformer2DModel

from model.colorguider_pixart import PixArtColorGuider, PixArtGuiderOutput
from model.pixart_walk import attention_bias, output_head, run_block
from model.unet_walk import timestep_batch


def unwrap_transformer(transformer: torch.nn.Module) -> PixArtTransformer2DModel:
    """The stock transformer inside a DDP (`.module`) or `torch.compile` (`._orig_mod`) wrapper (peft injects in
    place, so a LoRA-injected transformer is still the stock class)."""
    inner = transformer
    for _ in range(4):
        if isinstance(inner, PixArtTransformer2DModel):
            return inner
        inner = getattr(inner, "_orig_mod", None) or getattr(inner, "module", None) or inner
    raise TypeError(f"expected a PixArtTransformer2DModel, got {type(transformer).__name__}")


def noise_half(prediction: torch.Tensor, latent_channels: int) -> torch.Tensor:
    """The epsilon channels of a learned-variance prediction (the first `latent_channels`); others unchanged."""
    if prediction.shape[1] == 2 * latent_channels:
        return prediction[:, :latent_channels]
    return prediction


class GuidedPixArtTransformer(torch.nn.Module):
    """`.transformer` (stock PixArtTransformer2DModel, usually LoRA-injected) plus `.guider`: one predictor."""

    def __init__(self, transformer: torch.nn.Module, guider: PixArtColorGuider):
        super().__init__()
        self.transformer = transformer
        self.guider = guider
        base = unwrap_transformer(transformer)
        if guider.num_residuals > len(base.transformer_blocks):
            raise ValueError(
                f"GuidedPixArtTransformer: the guider gives {guider.num_residuals} residuals, the transformer has "
                f"only {len(base.transformer_blocks)} blocks"
            )
        if guider.inner_dim != base.inner_dim:
            raise ValueError(f"GuidedPixArtTransformer: guider width {guider.inner_dim}, transformer {base.inner_dim}")

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint the transformer's and the guider's blocks."""
        unwrap_transformer(self.transformer).enable_gradient_checkpointing()
        self.guider.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        unwrap_transformer(self.transformer).disable_gradient_checkpointing()
        self.guider.disable_gradient_checkpointing()

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        added_cond_kwargs: dict[str, torch.Tensor] | None,
        guider_cond: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
        guider_output: PixArtGuiderOutput | None = None,
    ) -> torch.Tensor:
        """The full (B, 8, h, w) prediction for `noisy_latents` (B, 4, h, w); `guider_cond` (B, 9, h, w) as
        `PixArtColorGuider.forward` takes it, or `guider_output` to reuse residuals already computed."""
        if guider_output is None:
            if guider_cond is None:
                raise ValueError("GuidedPixArtTransformer: give guider_cond or guider_output")
            dtype = self.guider.dtype
            guider_output = self.guider(
                noisy_latents.to(dtype),
                timestep,
                guider_cond.to(dtype),
                added_cond_kwargs=added_cond_kwargs,
                conditioning_scale=conditioning_scale,
            )
        return guided_pixart_forward(
            unwrap_transformer(self.transformer),
            noisy_latents,
            timestep,
            encoder_hidden_states,
            encoder_attention_mask,
            added_cond_kwargs,
            guider_output.block_residuals,
        )


def guided_pixart_forward(
    transformer: PixArtTransformer2DModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None,
    added_cond_kwargs: dict[str, torch.Tensor] | None,
    block_residuals: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """The stock PixArtTransformer2DModel forward with `block_residuals[i]` added after block i."""
    if transformer.use_additional_conditions and added_cond_kwargs is None:
        raise ValueError("guided PixArt: added_cond_kwargs (resolution, aspect_ratio) are required")
    if len(block_residuals) > len(transformer.transformer_blocks):
        raise ValueError(
            f"guided PixArt: {len(block_residuals)} residuals for {len(transformer.transformer_blocks)} blocks"
        )
    encoder_attention_mask = attention_bias(encoder_attention_mask, sample.dtype)
    batch = sample.shape[0]
    patch = transformer.config.patch_size
    height, width = sample.shape[-2] // patch, sample.shape[-1] // patch
    hidden = transformer.pos_embed(sample)
    timestep_embedding, embedded_timestep = transformer.adaln_single(
        timestep_batch(timestep, sample), added_cond_kwargs, batch_size=batch, hidden_dtype=hidden.dtype
    )
    if transformer.caption_projection is not None:
        encoder_hidden_states = transformer.caption_projection(encoder_hidden_states)
        encoder_hidden_states = encoder_hidden_states.view(batch, -1, hidden.shape[-1])
    for index, block in enumerate(transformer.transformer_blocks):
        hidden = run_block(
            transformer, block, hidden, timestep_embedding, encoder_hidden_states, encoder_attention_mask
        )
        if index < len(block_residuals):
            hidden = hidden + block_residuals[index].to(hidden.dtype)
    return output_head(transformer, hidden, embedded_timestep, height, width)
