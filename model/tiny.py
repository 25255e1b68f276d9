"""A tiny random SD1.5-shaped diffusers folder, so tests and `make demo` run the real loading code without weights.

Same structure as `stable-diffusion-v1-5` (StableDiffusionPipeline layout, PNDM scheduler config, CLIP tokenizer and
text encoder, a UNet with three cross-attention levels and a plain last level, two layers per block, so a guider
built from it has the SD1.5 count of 28 residuals; a VAE with four levels, so the latent factor is 8), only narrow.

Also home to the real SD1.5 layouts (`SD15_VAE_CONFIG`, `SD15_UNET_CONFIG`, `sd15_scheduler`) and the folder writer
(`save_sd_folder`), so the full-size random models of the benches and tests are built the same way.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TINY_TEXT_DIM = 32
TINY_SEED = 0

# stable-diffusion-v1-5's VAE and UNet layouts (its config.json files, architecture keys only), shared so benches and
# tests that build SD1.5-size random models from configs cannot drift apart. Read-only: pass them as `**kwargs`.
SD15_VAE_CONFIG: MappingProxyType[str, Any] = MappingProxyType(
    {
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }
)
SD15_UNET_CONFIG: MappingProxyType[str, Any] = MappingProxyType(
    {
        "sample_size": 64,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    }
)
# The tiny VAE's levels (SD1.5's four, so the latent factor is 8), narrow; norm groups and sizes are left to callers.
TINY_VAE_LAYOUT: MappingProxyType[str, Any] = MappingProxyType(
    {
        "block_out_channels": (8, 8, 16, 16),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 1,
        "latent_channels": 4,
    }
)


def _tiny_vocabulary() -> dict[str, int]:
    """Start/end/pad tokens plus a-z as word pieces and word ends: 55 entries, enough for prompts like "manga"."""
    tokens = ["<|startoftext|>", "!", "<|endoftext|>"]
    tokens += list(string.ascii_lowercase) + [f"{letter}</w>" for letter in string.ascii_lowercase]
    return {token: index for index, token in enumerate(tokens)}


def build_tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIPTokenizer from a hand-written vocabulary (no merges), the hub-free stand-in for SD1.5's tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(_tiny_vocabulary()))
    merges_file.write_text("#version: 0.2\n")
    return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77, pad_token="!")


def build_tiny_unet() -> UNet2DConditionModel:
    """SD1.5's block structure (3x CrossAttnDown + Down, cross-attention mid, Up + 3x CrossAttnUp), 16-32 channels."""
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_tiny_vae() -> AutoencoderKL:
    """Four encoder/decoder levels like SD1.5's VAE, so images map to latents 8x smaller."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, **TINY_VAE_LAYOUT, norm_num_groups=8, sample_size=64, scaling_factor=0.18215
    )


def build_tiny_text_encoder(vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=77,
    )
    return CLIPTextModel(config)


# stable-diffusion-v1-5's scheduler/scheduler_config.json, key for key. It has no `timestep_spacing`, so a UniPC built
# from it spaces its steps "linspace" (999..100 for 10 steps); a config saved by a recent diffusers would add
# "leading" and shift the schedule to 901..91. `save_sd_folder` writes exactly this file.
SD15_SCHEDULER_CONFIG: MappingProxyType[str, Any] = MappingProxyType(
    {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
    }
)


def sd15_scheduler() -> PNDMScheduler:
    """The PNDM scheduler as configured in stable-diffusion-v1-5's scheduler/ folder."""
    return PNDMScheduler.from_config(dict(SD15_SCHEDULER_CONFIG))


def save_sd_folder(
    folder: str | Path,
    *,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
) -> Path:
    """Write the models as a StableDiffusionPipeline folder (SD1.5's scheduler, no safety checker), so random
    models load through the same `from_pretrained` path as real weights. Returns the folder."""
    folder = Path(folder)
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder, safe_serialization=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(SD15_SCHEDULER_CONFIG), indent=2))
    return folder


def build_tiny_sd15(folder: str | Path, seed: int = TINY_SEED) -> Path:
    """Write a tiny random SD1.5-shaped pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/,
    model_index.json) with `save_pretrained`; loadable with `StableDiffusionPipeline.from_pretrained(folder)`.

    The same seed gives the same weights. Returns the folder.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tiny_tokenizer(Path(scratch))
        fork = torch.random.fork_rng(devices=[])
        with fork:
            torch.manual_seed(seed)
            unet = build_tiny_unet()
            vae = build_tiny_vae()
            text_encoder = build_tiny_text_encoder(len(tokenizer))
        save_sd_folder(folder, vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer)
    return folder


def main(argv: list[str] | None = None) -> int:
    """`python -m model.tiny FOLDER`: write the tiny folder (what `make demo` trains and colours with)."""
    from pipelines.core.cli import JobArgumentParser

    parser = JobArgumentParser(
        prog="python -m model.tiny",
        description="Write a tiny random SD1.5-shaped diffusers folder (no weights needed; for demos and tests).",
    )
    parser.add_argument("folder", type=Path, help="where to write the folder (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=TINY_SEED, help="seed of the random weights")
    args = parser.parse_args(argv)
    build_tiny_sd15(args.folder, seed=args.seed)
    print(f"tiny SD1.5-shaped folder written to {args.folder}")
    return 0


if __name__ == "__main__":
    from pipelines.core.cli import run_job

    raise SystemExit(run_job(main, prog="python -m model.tiny"))
