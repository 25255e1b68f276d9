"""The GSRP forward over a frozen, stock diffusers `AutoencoderKL`: encoder taps out, fused maps in.

ColorFlow's released code forks diffusers' VAE to return the encoder's hidden states and add the fused maps in the
decoder, and its fork drops both silently when gradient checkpointing is on. Here `GuidedVAE` runs the stock VAE's
own submodules in the stock order (conv_in, down blocks, mid block, norm/act/conv_out, quant convs) and takes the taps
and adds the maps between them; with `vae.enable_gradient_checkpointing()` each block goes through the VAE's own
checkpointing function, and the fused maps are added outside it, so outputs and gradients are the same either way.
Tiling and slicing of the stock VAE are not used on this path.

Taps (SD1.5 widths): conv_in output (128, full size), after down blocks 0-3 (128 /2, 256 /4, 512 /8, 512 /8). Fused
map i is added at the input of decoder up block `levels - 1 - i`, the last one at the mid-block input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from torch import nn

from model.gsrp_fusion import GSRPFusion, vae_fusion_channels


def _run_block(owner: nn.Module, block: Callable, *args) -> torch.Tensor:
    """Call a VAE block the way its stock forward does: through the owner's checkpointing function when it is on."""
    if torch.is_grad_enabled() and getattr(owner, "gradient_checkpointing", False):
        return owner._gradient_checkpointing_func(block, *args)
    return block(*args)


class GuidedVAE:
    """A frozen stock `AutoencoderKL` with the GSRP taps and add points; holds no parameters of its own."""

    def __init__(self, vae: AutoencoderKL) -> None:
        if not isinstance(vae.decoder.conv_norm_out, nn.GroupNorm):
            raise ValueError("GuidedVAE needs a VAE decoder with group norm output (spatial-norm decoders differ)")
        self.vae = vae
        self.levels = len(vae.config.block_out_channels)
        self.encoder_channels, self.decoder_channels = vae_fusion_channels(vae.config)

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD1.5's four levels)."""
        return 2 ** (self.levels - 1)

    @property
    def num_taps(self) -> int:
        return self.levels + 1

    def check_fusion(self, fusion: GSRPFusion) -> None:
        """Raise ValueError when the fusion net's widths do not fit this VAE."""
        found = (tuple(fusion.config.encoder_channels), tuple(fusion.config.decoder_channels))
        if found != (self.encoder_channels, self.decoder_channels):
            raise ValueError(
                f"fusion net widths (encoder {list(found[0])}, decoder {list(found[1])}) do not fit this VAE "
                f"(encoder {list(self.encoder_channels)}, decoder {list(self.decoder_channels)})"
            )

    def encode_features(self, images: torch.Tensor) -> tuple[DiagonalGaussianDistribution, list[torch.Tensor]]:
        """Images (B,3,H,W) in [-1,1] -> (the stock posterior, the 5 encoder taps)."""
        encoder = self.vae.encoder
        sample = encoder.conv_in(images)
        taps = [sample]
        for down_block in encoder.down_blocks:
            sample = _run_block(encoder, down_block, sample)
            taps.append(sample)
        sample = _run_block(encoder, encoder.mid_block, sample)
        sample = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(sample)))
        if self.vae.quant_conv is not None:
            sample = self.vae.quant_conv(sample)
        return DiagonalGaussianDistribution(sample), taps

    def decode_fused(self, latents: torch.Tensor, fused_maps: Sequence[torch.Tensor] | None) -> torch.Tensor:
        """Decode unscaled VAE latents, adding fused map i at its decoder point (None: the plain stock decode)."""
        if fused_maps is not None and len(fused_maps) != self.num_taps:
            raise ValueError(f"expected {self.num_taps} fused maps, got {len(fused_maps)}")
        decoder = self.vae.decoder
        if self.vae.post_quant_conv is not None:
            latents = self.vae.post_quant_conv(latents)
        sample = decoder.conv_in(latents)
        sample = self._add(sample, fused_maps, self.levels, "mid block")
        sample = _run_block(decoder, decoder.mid_block, sample, None)
        for j, up_block in enumerate(decoder.up_blocks):
            sample = self._add(sample, fused_maps, self.levels - 1 - j, f"up block {j}")
            sample = _run_block(decoder, up_block, sample, None)
        return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(sample)))

    @staticmethod
    def _add(sample: torch.Tensor, fused_maps: Sequence[torch.Tensor] | None, index: int, where: str) -> torch.Tensor:
        if fused_maps is None:
            return sample
        fused = fused_maps[index]
        if fused.shape != sample.shape:
            raise ValueError(
                f"fused map {index} has shape {list(fused.shape)}, the decoder's {where} input {list(sample.shape)}"
            )
        return sample + fused.to(sample.dtype)

    def restore(
        self,
        fusion: GSRPFusion,
        color: torch.Tensor,
        bw: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        bw_taps: Sequence[torch.Tensor] | None = None,
        statistics: str = "running",
    ) -> torch.Tensor:
        """The GSRP forward, unclamped: encode both images, fuse the taps, decode the colour posterior's sample.

        `colour` is the upsampled low-resolution colour image, `bw` the high-resolution B&W frame (B,3,H,W in [-1,1],
        H and W multiples of `scale_factor`). The encoder runs without gradients (it is frozen); gradients flow
        through the decoder into the fusion net, which runs on its own device and dtype. `bw_taps` reuses already
        computed B&W taps; `statistics` is the fusion net's BatchNorm mode (`GSRPFusion.forward`).
        """
        with torch.no_grad():
            posterior, color_taps = self.encode_features(color.to(self.vae.device, self.vae.dtype))
            if bw_taps is None:
                _, bw_taps = self.encode_features(bw.to(self.vae.device, self.vae.dtype))
            latents = posterior.sample(generator=generator)
        first = next(fusion.parameters())
        fused = fusion(
            [t.to(first.device, first.dtype) for t in color_taps],
            [t.to(first.device, first.dtype) for t in bw_taps],
            statistics,
        )
        return self.decode_fused(latents, [f.to(self.vae.device) for f in fused])


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB (B&W is repeated) PIL -> (3,H,W) float in [-1,1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """(3,H,W) in [-1,1] -> RGB PIL (clamped, rounded)."""
    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


def _pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")


def super_resolve(
    vae: AutoencoderKL,
    fusion: GSRPFusion,
    lowres_color: Image.Image,
    hr_bw: Image.Image,
    generator: torch.Generator | None = None,
    *,
    statistics: str = "running",
) -> Image.Image:
    """GSRP inference: the ICP output upsampled (PIL bicubic, as released) to the B&W frame's size, both encoded, the
    colour posterior's sample decoded with the fused maps, clamped to [-1,1]. Returns an RGB image of hr_bw's size.

    Sizes that are not multiples of the VAE factor are padded (replicate) and cropped back. Runs on the VAE's device
    and dtype; the fusion net runs in eval mode (its mode is restored afterwards) with BatchNorm `statistics`
    "running" (stored) or "page" (the page's own, as the released app runs its fusion net).
    """
    guided = GuidedVAE(vae)
    guided.check_fusion(fusion)
    width, height = hr_bw.size
    color = pil_to_tensor(lowres_color.convert("RGB").resize((width, height), Image.BICUBIC))
    bw = pil_to_tensor(hr_bw)
    batch = _pad_to_multiple(torch.stack([color, bw]), guided.scale_factor)
    was_training = fusion.training
    fusion.eval()
    try:
        with torch.no_grad():
            output = guided.restore(fusion, batch[:1], batch[1:], generator, statistics=statistics)
    finally:
        fusion.train(was_training)
    return tensor_to_pil(output[0, :, :height, :width])
