"""The ICP sampling pipeline: the stitched composite in, the colourised 2W x 2H canvas out (a diffusers pipeline).

Inputs are the guider's two canvases and the mask exactly as
`pipelines.core.sample_inputs.composite_inputs` builds them, so training validation and colorize stitch
identically: `refs_only` (the ring with a black centre), `frame_only` (a black canvas with the B&W frame in the
centre) and `mask` (2H x 2W, 1 on the reference ring, 0 on the centre).
Both canvases are VAE-encoded (posterior samples drawn from `generator`, times the VAE scaling factor); the mask is
downsampled to latent size with BILINEAR interpolation, as the released inference does (BrushNet's training used
nearest). Classifier-free guidance contrasts the prompt with the negative prompt only: the guider gets the same
image conditioning for both halves, so it runs once per step and its residuals are shared. The latent factor is
derived from the VAE config (2 ** (levels - 1)); canvas sides must be multiples of it (frames multiples of 16 are).
A caller can fix every draw itself: `latents=` (the initial noise) and `posterior_noise=` (the standard-normal noise
of the two canvases' posterior samples), and skip the text encoder with `prompt_embeds=` (the pipeline may then be
built with `text_encoder=None, tokenizer=None`; without guidance no negative embedding is needed).
Crop the centre of each returned canvas with `CompositeLayout.crop_centre`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from model.colorguider import ColorGuider, GuiderOutput, build_guider_cond
from model.guided_unet import guided_unet_forward, unwrap_unet

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor


@dataclass
class ColorFlowICPPipelineOutput(BaseOutput):
    """`images`: full 2W x 2H canvases (PIL list, NHWC array or NCHW tensor in [0, 1]), or the latents."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def as_list(value: Any) -> list:
    """One item or a list of them, as a list (pipelines take a page or a batch)."""
    return list(value) if isinstance(value, list | tuple) else [value]


def scheduler_step_kwargs(scheduler: Any, generator: torch.Generator | None) -> dict:
    """The generator for `scheduler.step` when it takes one (stochastic schedulers), else nothing."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    return {"generator": generator} if "generator" in accepted else {}


def image_tensor(image: ImageInput) -> torch.Tensor:
    """(3, H, W) float in [-1, 1] from a PIL image, an HWC uint8/float array or a CHW tensor in [0, 1]."""
    if isinstance(image, PIL.Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        array = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        return torch.from_numpy(array * 2.0 - 1.0).permute(2, 0, 1)
    if isinstance(image, torch.Tensor) and image.ndim == 3:
        return image.float() * 2.0 - 1.0
    raise TypeError(f"ColorFlowICPPipeline: unsupported image type {type(image).__name__}")


def mask_tensor(mask: ImageInput) -> torch.Tensor:
    """(1, H, W) float in [0, 1], 1 on the reference ring; PIL masks are read as grey levels / 255."""
    if isinstance(mask, PIL.Image.Image):
        return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None]
    if isinstance(mask, np.ndarray):
        array = mask.astype(np.float32) / (255.0 if mask.dtype == np.uint8 else 1.0)
        return torch.from_numpy(array if array.ndim == 2 else array[..., 0])[None]
    if isinstance(mask, torch.Tensor):
        return (mask.float() if mask.ndim == 3 else mask.float()[None])[:1]
    raise TypeError(f"ColorFlowICPPipeline: unsupported mask type {type(mask).__name__}")


def _repeat_residuals(residuals: GuiderOutput, times: int) -> GuiderOutput:
    return GuiderOutput(
        down_residuals=tuple(torch.cat([r] * times) for r in residuals.down_residuals),
        mid_residual=torch.cat([residuals.mid_residual] * times),
        up_residuals=tuple(torch.cat([r] * times) for r in residuals.up_residuals),
    )


class ColorFlowICPPipeline(DiffusionPipeline):
    """SD1.5 + LoRA UNet guided by the Colorization Guider; UniPC by default when built by `load_icp_pipeline`."""

    model_cpu_offload_seq = "text_encoder->guider->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        guider: ColorGuider,
        scheduler: KarrasDiffusionSchedulers,
    ):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, guider=guider, scheduler=scheduler
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def encode_prompt(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("ColorFlowICPPipeline: built without a text encoder; pass prompt_embeds=")
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(device))[0].to(self.unet.dtype)

    def _encode_canvas(
        self, images: torch.Tensor, generator: torch.Generator | None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        images = images.to(device=self._execution_device, dtype=self.vae.dtype)
        posterior = self.vae.encode(images).latent_dist
        if noise is None:
            sample = posterior.sample(generator=generator)
        else:
            if noise.shape != posterior.mean.shape:
                raise ValueError(
                    f"ColorFlowICPPipeline: posterior noise has shape {list(noise.shape)}, "
                    f"the canvas posterior {list(posterior.mean.shape)}"
                )
            sample = posterior.mean + posterior.std * noise.to(posterior.mean.device, posterior.mean.dtype)
        return sample * self.vae.config.scaling_factor

    def prepare_guider_cond(
        self,
        refs_only: list[ImageInput],
        frame_only: list[ImageInput],
        masks: list[ImageInput],
        generator: torch.Generator | None = None,
        posterior_noise: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(B, 9, h, w) = cat[latent(refs_only), mask bilinear at latent size, latent(frame_only)].

        `posterior_noise`: (refs_only noise, frame_only noise), each (B, 4, h, w) standard normal, used in place of
        the generator's draws."""
        refs = torch.stack([image_tensor(image) for image in refs_only])
        frames = torch.stack([image_tensor(image) for image in frame_only])
        mask = torch.stack([mask_tensor(m) for m in masks])
        height, width = refs.shape[-2:]
        factor = self.vae_scale_factor
        if frames.shape[-2:] != (height, width) or mask.shape[-2:] != (height, width):
            raise ValueError(
                f"ColorFlowICPPipeline: refs_only is {width}x{height}, frame_only {frames.shape[-1]}x"
                f"{frames.shape[-2]}, mask {mask.shape[-1]}x{mask.shape[-2]}: all must be the same canvas size"
            )
        if height % factor or width % factor:
            raise ValueError(
                f"ColorFlowICPPipeline: canvas {width}x{height} is not a multiple of the VAE factor {factor} "
                f"(frame sides must be multiples of {factor // 2})"
            )
        refs_noise, frame_noise = posterior_noise if posterior_noise is not None else (None, None)
        refs_latent = self._encode_canvas(refs, generator, refs_noise)
        frame_latent = self._encode_canvas(frames, generator, frame_noise)
        return build_guider_cond(refs_latent, mask.to(refs_latent.device), frame_latent, mode="bilinear")

    def _text_embeddings(
        self, embeds: torch.Tensor | None, prompts: list[str], batch: int, device: torch.device
    ) -> torch.Tensor:
        """Given embeddings (1 or `batch` rows, repeated to the batch) or the prompts through the text encoder."""
        if embeds is None:
            return self.encode_prompt(prompts, device)
        if embeds.ndim != 3 or embeds.shape[0] not in (1, batch):
            raise ValueError(
                f"ColorFlowICPPipeline: prompt embeddings of shape {list(embeds.shape)} for {batch} canvases"
            )
        return embeds.to(device, self.unet.dtype).expand(batch, -1, -1)

    @torch.no_grad()
    def __call__(
        self,
        refs_only: ImageInput | list[ImageInput],
        frame_only: ImageInput | list[ImageInput],
        mask: ImageInput | list[ImageInput],
        prompt: str | list[str] = "manga",
        negative_prompt: str | list[str] = "",
        num_inference_steps: int = 10,
        guidance_scale: float = 7.5,
        conditioning_scale: float = 1.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        tiled_decode: bool = False,
        latents: torch.Tensor | None = None,
        posterior_noise: tuple[torch.Tensor, torch.Tensor] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> ColorFlowICPPipelineOutput | tuple:
        """Colourise the centre of each composite.

        `refs_only`, `frame_only`: one canvas or a list (PIL RGB, HWC array, or CHW tensor in [0, 1]), 2W x 2H.
        `mask`: 2H x 2W, 1 on the reference ring (a float array as `CompositeLayout.mask()` returns; PIL masks are
        grey / 255); one mask is shared by the whole batch. Guidance applies when `guidance_scale` > 1.
        `output_type`: "pil", "np", "pt" or "latent". Same generator seed, same output.
        `tiled_decode`: decode the final latents tile by tile (lower peak memory); the canvases' encodes are never
        tiled, so the guider sees exactly the latents it was trained on.
        `latents`: the initial noise (B, 4, h, w), unscaled (it is multiplied by the scheduler's initial sigma);
        `posterior_noise`: see `prepare_guider_cond`. The generator then draws nothing in their place.
        `prompt_embeds` / `negative_prompt_embeds`: text-encoder outputs (1 or B rows) used instead of the prompts;
        the negative one is needed only with guidance.
        """
        refs_list, frame_list = as_list(refs_only), as_list(frame_only)
        if len(refs_list) != len(frame_list):
            raise ValueError(f"ColorFlowICPPipeline: {len(refs_list)} refs_only canvases but {len(frame_list)} frames")
        batch = len(refs_list)
        mask_list = as_list(mask)
        if len(mask_list) == 1:
            mask_list = mask_list * batch
        if len(mask_list) != batch:
            raise ValueError(f"ColorFlowICPPipeline: {len(mask_list)} masks for {batch} canvases")
        prompts = as_list(prompt) * (batch if isinstance(prompt, str) else 1)
        negatives = as_list(negative_prompt) * (batch if isinstance(negative_prompt, str) else 1)
        if len(prompts) != batch or len(negatives) != batch:
            raise ValueError(f"ColorFlowICPPipeline: prompts and negative prompts must be one or {batch}")
        if num_inference_steps < 1:
            raise ValueError(f"ColorFlowICPPipeline: num_inference_steps must be >= 1, got {num_inference_steps}")

        device = self._execution_device
        unet = unwrap_unet(self.unet)
        guidance = guidance_scale > 1.0
        text = self._text_embeddings(prompt_embeds, prompts, batch, device)
        if guidance:
            text = torch.cat([self._text_embeddings(negative_prompt_embeds, negatives, batch, device), text])

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        noise_dtype = unet.dtype
        # The initial noise is drawn first, then the two posterior samples: one generator fixes everything.
        height, width = image_tensor(refs_list[0]).shape[-2:]
        latent_shape = (batch, unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(latent_shape, generator=generator, device=device, dtype=noise_dtype)
        elif tuple(latents.shape) != latent_shape:
            raise ValueError(
                f"ColorFlowICPPipeline: latents have shape {list(latents.shape)}, expected {list(latent_shape)}"
            )
        latents = latents.to(device, noise_dtype) * self.scheduler.init_noise_sigma
        cond = self.prepare_guider_cond(refs_list, frame_list, mask_list, generator, posterior_noise)
        cond = cond.to(self.guider.dtype)
        step_kwargs = scheduler_step_kwargs(self.scheduler, generator)

        # Model offload hooks fire on a module's forward; the guided UNet runs the UNet's blocks directly, so its hook
        # is fired here to bring it onto the device (the guider's and the VAE's own calls fire theirs).
        offload_hook = getattr(self.unet, "_hf_hook", None)
        if offload_hook is not None:
            offload_hook.pre_forward(self.unet)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(latents, t)
            residuals = self.guider(model_input.to(self.guider.dtype), t, cond, conditioning_scale=conditioning_scale)
            if guidance:
                model_input = torch.cat([model_input] * 2)
                residuals = _repeat_residuals(residuals, 2)
            noise = guided_unet_forward(unet, model_input, t, text, residuals)
            if guidance:
                uncond, cond_noise = noise.chunk(2)
                noise = uncond + guidance_scale * (cond_noise - uncond)
            latents = self.scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]

        if output_type == "latent":
            images = latents
        else:
            scaled = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
            decoded = (self.vae.tiled_decode(scaled) if tiled_decode else self.vae.decode(scaled)).sample
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ColorFlowICPPipelineOutput(images=images)
