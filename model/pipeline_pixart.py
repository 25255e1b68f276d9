"""The line-art family's sampling pipeline: PixArt-alpha + LoRA guided by the PixArt Colorization Guider.

Inputs are the composite's two canvases and mask exactly as for the ICP pipeline (`refs_only`: the ring with a black
centre; `frame_only`: a black canvas holding the B&W (line-art) frame; `mask`: 1 on the reference ring), plus
precomputed text embeddings (a `model.text_cache.TextCache`): T5 is never loaded here. Both canvases are VAE-encoded
(posterior samples from `generator`, refs first, as the release encodes them), the mask is resized bilinearly to
the latent size; the guider and the transformer get the canvas's PIXEL size as resolution/aspect micro-conditions.
The transformer predicts 8 channels; sampling uses the noise half. Classifier-free guidance (default 4.5, the
release's) contrasts the prompt with the negative prompt; as in the release, each guidance half gets its own VAE
posterior samples of the same canvases (the batch is doubled before encoding), so the guider runs on both halves.
Unlike the release, every conditioning tensor (the mask included) is sized from the latent batch, so guidance 1
and batches of several canvases work. Scheduler: PixArt's DPM-Solver multistep as shipped.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, PixArtTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor

from model.colorguider import build_guider_cond
from model.colorguider_pixart import PixArtColorGuider
from model.guided_pixart import guided_pixart_forward, noise_half, unwrap_transformer
from model.pipeline_icp import (
    ColorFlowICPPipelineOutput,
    ImageInput,
    as_list,
    image_tensor,
    mask_tensor,
    scheduler_step_kwargs,
)
from model.pixart_walk import micro_conditions
from model.text_cache import TextCache

DEFAULT_GUIDANCE = 4.5


class ColorFlowPixArtPipeline(DiffusionPipeline):
    """PixArt-alpha (LoRA) guided by `PixArtColorGuider`; returns full 2W x 2H canvases (crop the centre)."""

    model_cpu_offload_seq = "guider->transformer->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        transformer: PixArtTransformer2DModel,
        guider: PixArtColorGuider,
        scheduler: KarrasDiffusionSchedulers,
    ):
        super().__init__()
        self.register_modules(vae=vae, transformer=transformer, guider=guider, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def _encode_canvas(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        images = images.to(device=self._execution_device, dtype=self.vae.dtype)
        posterior = self.vae.encode(images).latent_dist
        return posterior.sample(generator=generator) * self.vae.config.scaling_factor

    def prepare_guider_cond(
        self,
        refs_only: list[ImageInput],
        frame_only: list[ImageInput],
        masks: list[ImageInput],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(B, 9, h, w) = cat[latent(refs_only), mask bilinear at latent size, latent(frame_only)]."""
        refs = torch.stack([image_tensor(image) for image in refs_only])
        frames = torch.stack([image_tensor(image) for image in frame_only])
        mask = torch.stack([mask_tensor(m) for m in masks])
        height, width = refs.shape[-2:]
        factor = self.vae_scale_factor * unwrap_transformer(self.transformer).config.patch_size
        if frames.shape[-2:] != (height, width) or mask.shape[-2:] != (height, width):
            raise ValueError(
                f"ColorFlowPixArtPipeline: refs_only is {width}x{height}, frame_only {frames.shape[-1]}x"
                f"{frames.shape[-2]}, mask {mask.shape[-1]}x{mask.shape[-2]}: all must be the same canvas size"
            )
        if height % factor or width % factor:
            raise ValueError(
                f"ColorFlowPixArtPipeline: canvas {width}x{height} is not a multiple of {factor} (VAE factor x patch)"
            )
        refs_latent = self._encode_canvas(refs, generator)
        frame_latent = self._encode_canvas(frames, generator)
        return build_guider_cond(refs_latent, mask.to(refs_latent.device), frame_latent, mode="bilinear")

    @torch.no_grad()
    def __call__(
        self,
        refs_only: ImageInput | list[ImageInput],
        frame_only: ImageInput | list[ImageInput],
        mask: ImageInput | list[ImageInput],
        text: TextCache,
        num_inference_steps: int = 10,
        guidance_scale: float = DEFAULT_GUIDANCE,
        conditioning_scale: float = 1.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ColorFlowICPPipelineOutput | tuple:
        """Colourise the centre of each composite.

        `refs_only`, `frame_only`: one canvas or a list (PIL RGB, HWC array, or CHW tensor in [0, 1]), 2W x 2H.
        `mask`: 1 on the reference ring, one per canvas or one for all. `text`: cached prompt/negative embeddings.
        `latents`: the initial noise (B, 4, h, w); else drawn from `generator` before the canvases' posteriors.
        `output_type`: "pil", "np", "pt" or "latent". Same generator seed, same output.
        """
        refs_list, frame_list = as_list(refs_only), as_list(frame_only)
        if len(refs_list) != len(frame_list):
            raise ValueError(
                f"ColorFlowPixArtPipeline: {len(refs_list)} refs_only canvases but {len(frame_list)} frames"
            )
        batch = len(refs_list)
        mask_list = as_list(mask)
        if len(mask_list) == 1:
            mask_list = mask_list * batch
        if len(mask_list) != batch:
            raise ValueError(f"ColorFlowPixArtPipeline: {len(mask_list)} masks for {batch} canvases")
        if num_inference_steps < 1:
            raise ValueError(f"ColorFlowPixArtPipeline: num_inference_steps must be >= 1, got {num_inference_steps}")

        device = self._execution_device
        transformer = unwrap_transformer(self.transformer)
        dtype = transformer.dtype
        guidance = guidance_scale > 1.0
        prompt_embeds, prompt_mask = text.for_batch(batch)
        if guidance:
            negative_embeds, negative_mask = text.for_batch(batch, negative=True)
            prompt_embeds = torch.cat([negative_embeds, prompt_embeds])
            prompt_mask = torch.cat([negative_mask, prompt_mask])
        prompt_embeds, prompt_mask = prompt_embeds.to(device, dtype), prompt_mask.to(device)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        height, width = image_tensor(refs_list[0]).shape[-2:]
        latent_channels = transformer.config.in_channels
        shape = (batch, latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"ColorFlowPixArtPipeline: latents {tuple(latents.shape)}, expected {shape}")
        latents = latents.to(device, dtype) * self.scheduler.init_noise_sigma
        # Under guidance each half gets its own posterior samples of the same canvases, drawn for the doubled batch
        # (uncond rows first, refs before frames) as the release draws them, so the guider runs on both halves.
        copies = 2 if guidance else 1
        cond = self.prepare_guider_cond(refs_list * copies, frame_list * copies, mask_list * copies, generator)
        cond = cond.to(self.guider.dtype)
        conditions = micro_conditions(height, width, batch * copies, device, prompt_embeds.dtype)
        step_kwargs = scheduler_step_kwargs(self.scheduler, generator)

        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(torch.cat([latents] * copies), t)
            residuals = self.guider(
                model_input.to(self.guider.dtype), t, cond, conditions, conditioning_scale=conditioning_scale
            ).block_residuals
            prediction = guided_pixart_forward(
                transformer, model_input.to(dtype), t, prompt_embeds, prompt_mask, conditions, residuals
            )
            if guidance:
                uncond, conditional = prediction.chunk(2)
                prediction = uncond + guidance_scale * (conditional - uncond)
            noise = noise_half(prediction, latent_channels)
            latents = self.scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]

        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ColorFlowICPPipelineOutput(images=images)
