"""Block-by-block execution of the stock diffusers `PixArtTransformer2DModel`, so guidance can be added after a block.

The stock forward only returns the final prediction; the line-art Colorization Guider must add a residual after each
of the first blocks (PixArt-delta / ControlNet-Transformer order). These helpers run the transformer's own submodules
(patch embedding, adaLN-single, caption projection, blocks, output head) in the stock order, with gradient
checkpointing exactly as the stock forward does it, so a walk without residuals is numerically the stock forward.
They track diffusers' PixArt internals (pinned by `tests/test_model_pixart.py` and the release parity tests).
"""

from __future__ import annotations

import torch

# the value the stock PixArt forward turns a 0 of a 2-D attention mask into (a large negative attention bias)
MASK_BIAS = -10000.0


def attention_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A (B, L) keep-mask (1 keep, 0 drop) as the stock forward's (B, 1, L) additive bias; other shapes unchanged."""
    if mask is None or mask.ndim != 2:
        return mask
    return ((1 - mask.to(dtype)) * MASK_BIAS).unsqueeze(1)


def micro_conditions(
    height: int, width: int, batch: int, device: torch.device | str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """PixArt-alpha's size micro-conditions for a `height` x `width` PIXEL canvas: resolution (B, 2) = [h, w] and
    aspect_ratio (B, 1) = h / w, as the released pipeline feeds both the transformer and the guider."""
    resolution = torch.tensor([[float(height), float(width)]], device=device, dtype=dtype).repeat(batch, 1)
    aspect = torch.tensor([[float(height / width)]], device=device, dtype=dtype).repeat(batch, 1)
    return {"resolution": resolution, "aspect_ratio": aspect}


def run_block(
    owner: torch.nn.Module,
    block: torch.nn.Module,
    hidden: torch.Tensor,
    timestep_embedding: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One `BasicTransformerBlock` call as the stock PixArt loop makes it (checkpointed when `owner` says so)."""
    if torch.is_grad_enabled() and getattr(owner, "gradient_checkpointing", False):
        return owner._gradient_checkpointing_func(
            block, hidden, None, encoder_hidden_states, encoder_attention_mask, timestep_embedding, None, None
        )
    return block(
        hidden,
        attention_mask=None,
        encoder_hidden_states=encoder_hidden_states,
        encoder_attention_mask=encoder_attention_mask,
        timestep=timestep_embedding,
        cross_attention_kwargs=None,
        class_labels=None,
    )


def output_head(
    transformer: torch.nn.Module, hidden: torch.Tensor, embedded_timestep: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """The stock final norm, shift/scale modulation, projection and unpatchify: tokens -> (B, C_out, H, W) where
    `height` x `width` is the token grid."""
    table = transformer.scale_shift_table
    shift, scale = (table[None] + embedded_timestep[:, None].to(table.device)).chunk(2, dim=1)
    hidden = transformer.norm_out(hidden)
    hidden = hidden * (1 + scale.to(hidden.device)) + shift.to(hidden.device)
    hidden = transformer.proj_out(hidden).squeeze(1)
    patch = transformer.config.patch_size
    channels = transformer.out_channels
    hidden = hidden.reshape(-1, height, width, patch, patch, channels)
    hidden = torch.einsum("nhwpqc->nchpwq", hidden)
    return hidden.reshape(-1, channels, height * patch, width * patch)
