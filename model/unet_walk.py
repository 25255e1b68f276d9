"""Layer-by-layer execution of stock diffusers UNet blocks, so guidance can be captured or added after each layer.

Stock `CrossAttnDownBlock2D` / `DownBlock2D` / `CrossAttnUpBlock2D` / `UpBlock2D` only return block outputs; the
Colorization Guider needs every layer output and the guided UNet must add a residual after every layer (BrushNet
order). These helpers run the blocks' own submodules in the blocks' own order (resnet, then attention; gradient
checkpointing of the resnet exactly as the stock forward does it), so a walk with no residuals is numerically the
stock forward. They track diffusers' block internals (pinned by `tests/test_model_guider.py`'s parity tests).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from diffusers.utils.torch_utils import apply_freeu


def timestep_batch(timestep: torch.Tensor | float | int, sample: torch.Tensor) -> torch.Tensor:
    """The timestep as a 1-D tensor of the batch size on the sample's device (stock UNet semantics)."""
    if not torch.is_tensor(timestep):
        dtype = torch.float64 if isinstance(timestep, float) else torch.int64
        if sample.device.type == "mps":
            dtype = torch.float32 if dtype == torch.float64 else torch.int32
        timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
    elif timestep.ndim == 0:
        timestep = timestep[None].to(sample.device)
    return timestep.to(sample.device).expand(sample.shape[0])


def upsample_sizes_needed(sample: torch.Tensor, num_upsamplers: int) -> bool:
    """True when the latent is not a multiple of 2**num_upsamplers, so upsamplers must be told their output size."""
    factor = 2**num_upsamplers
    return any(dim % factor != 0 for dim in sample.shape[-2:])


def _run_layer(
    block: torch.nn.Module,
    resnet: torch.nn.Module,
    attention: torch.nn.Module | None,
    hidden: torch.Tensor,
    temb: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
) -> torch.Tensor:
    if torch.is_grad_enabled() and getattr(block, "gradient_checkpointing", False):
        hidden = block._gradient_checkpointing_func(resnet, hidden, temb)
    else:
        hidden = resnet(hidden, temb)
    if attention is not None:
        hidden = attention(hidden, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
    return hidden


def _add(hidden: torch.Tensor, residuals: Iterator[torch.Tensor] | None) -> torch.Tensor:
    if residuals is None:
        return hidden
    return hidden + next(residuals).to(hidden.dtype)


def layer_count(block: torch.nn.Module) -> int:
    """Outputs a block contributes to the guidance: one per resnet(+attention) layer, one for its resampler."""
    resampler = getattr(block, "downsamplers", None) or getattr(block, "upsamplers", None)
    return len(block.resnets) + (1 if resampler else 0)


def run_down_block(
    block: torch.nn.Module,
    hidden: torch.Tensor,
    temb: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    residuals: Iterator[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Run a down block; after each layer and after the downsampler add the next residual (if given), THEN save the
    result as a skip. Returns (hidden, skips) like the stock block."""
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    skips: tuple[torch.Tensor, ...] = ()
    for resnet, attention in zip(block.resnets, attentions, strict=True):
        hidden = _run_layer(block, resnet, attention, hidden, temb, encoder_hidden_states)
        hidden = _add(hidden, residuals)
        skips += (hidden,)
    if block.downsamplers is not None:
        for downsampler in block.downsamplers:
            hidden = downsampler(hidden)
        hidden = _add(hidden, residuals)
        skips += (hidden,)
    return hidden, skips


def run_mid_block(
    block: torch.nn.Module,
    hidden: torch.Tensor,
    temb: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """The stock mid block call (its forward already checkpoints as configured)."""
    if getattr(block, "has_cross_attention", False):
        return block(hidden, temb, encoder_hidden_states=encoder_hidden_states)
    return block(hidden, temb)


def run_up_block(
    block: torch.nn.Module,
    hidden: torch.Tensor,
    skips: tuple[torch.Tensor, ...],
    temb: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    upsample_size: torch.Size | None = None,
    residuals: Iterator[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Run an up block consuming `skips` from the end; returns (hidden, layer outputs), the outputs taken after each
    layer and after the upsampler BEFORE the residual (if given) is added to the running hidden state."""
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    freeu = all(getattr(block, name, None) for name in ("s1", "s2", "b1", "b2"))
    outputs: tuple[torch.Tensor, ...] = ()
    for resnet, attention in zip(block.resnets, attentions, strict=True):
        skip, skips = skips[-1], skips[:-1]
        if freeu:
            hidden, skip = apply_freeu(
                block.resolution_idx, hidden, skip, s1=block.s1, s2=block.s2, b1=block.b1, b2=block.b2
            )
        hidden = torch.cat([hidden, skip], dim=1)
        hidden = _run_layer(block, resnet, attention, hidden, temb, encoder_hidden_states)
        outputs += (hidden,)
        hidden = _add(hidden, residuals)
    if block.upsamplers is not None:
        for upsampler in block.upsamplers:
            hidden = upsampler(hidden, upsample_size)
        outputs += (hidden,)
        hidden = _add(hidden, residuals)
    return hidden, outputs
