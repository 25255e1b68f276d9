"""Parity with the RELEASED line-art code: tiny seeded modules saved by the release's own code, and its outputs, pinned
in tests/reference/pixart_release/ by bench/release_pixart_parity.py (see docs/reference/fidelity.md to regenerate).

Our strict loaders read the release-written files (the guider .bin with its after_proj alias, transformer_lora.bin);
our guider, guided transformer walk and sampling pipeline must then reproduce the release's numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
from PIL import Image
from safetensors.torch import load_file

from model.colorguider_pixart import PixArtColorGuider
from model.guided_pixart import guided_pixart_forward
from model.pipeline_pixart import ColorFlowPixArtPipeline
from model.pixart_lora import load_pixart_lora
from model.text_cache import TextCache

pytestmark = pytest.mark.usefixtures("frugal_threads")
PINNED = Path(__file__).resolve().parent / "reference" / "pixart_release"


@pytest.fixture(scope="module")
def released() -> dict:
    transformer = PixArtTransformer2DModel.from_pretrained(PINNED / "base" / "transformer", torch_dtype=torch.float32)
    load_pixart_lora(transformer, PINNED / "sketch" / "transformer_lora.bin")
    return {
        "transformer": transformer.eval(),
        "vae": AutoencoderKL.from_pretrained(PINNED / "base" / "vae", torch_dtype=torch.float32).eval(),
        "guider": PixArtColorGuider.from_pretrained(PINNED / "sketch"),
        "record": json.loads((PINNED / "release.json").read_text()),
    }


def test_the_pinned_files_come_from_the_released_code(released: dict) -> None:
    record = released["record"]
    assert record["versions"]["diffusers"] == "0.31.0.dev0"  # the release's vendored fork, not ours
    config = json.loads((PINNED / "sketch" / "config.json").read_text())
    assert config["_class_name"] == "ColorGuiderPixArtModel" and config["cond_channels"] == 9
    raw = torch.load(PINNED / "sketch" / "diffusion_pytorch_model.bin", weights_only=True)
    assert torch.equal(raw["after_proj.weight"], raw["adapter_linear.1.weight"])  # the alias, as the release saves it
    assert released["guider"].num_residuals == 2


def test_guided_forward_matches_the_release_to_float_rounding(released: dict) -> None:
    pinned = load_file(PINNED / "forward.safetensors")
    conditions = {"resolution": pinned["resolution"], "aspect_ratio": pinned["aspect_ratio"]}
    with torch.no_grad():
        residuals = released["guider"](pinned["sample"], pinned["timestep"], pinned["cond"], conditions)
        for index, residual in enumerate(residuals.block_residuals):
            expected = pinned[f"residual_{index}"]
            assert expected.abs().max() > 0.1  # the pinned adapters are not the zero init
            torch.testing.assert_close(residual, expected, rtol=0, atol=1e-6)
        output = guided_pixart_forward(
            released["transformer"],
            pinned["sample"],
            pinned["timestep"],
            pinned["text"],
            pinned["text_mask"],
            conditions,
            residuals.block_residuals,
        )
    assert output.shape == (2, 8, 8, 12)  # noise and variance halves
    torch.testing.assert_close(output, pinned["output"], rtol=0, atol=1e-5)


def _canvases() -> tuple[Image.Image, Image.Image, np.ndarray]:
    """The release's split of its composite: A = centre painted black, B = black canvas with the centre; M = 1 - red
    channel of the white-centre mask image."""
    composite = Image.open(PINNED / "composite.png").convert("RGB")
    width, height = composite.size
    box = (width // 4, height // 4, width // 4 + width // 2, height // 4 + height // 2)
    refs_only = composite.copy()
    refs_only.paste(Image.new("RGB", (width // 2, height // 2)), box[:2])
    frame_only = Image.new("RGB", (width, height))
    frame_only.paste(composite.crop(box), box[:2])
    mask = 1 - np.asarray(Image.open(PINNED / "mask.png").convert("RGB"))[..., 0].astype(np.float32) / 255
    return refs_only, frame_only, mask


def test_three_sampler_steps_match_the_released_pipeline(released: dict) -> None:
    pinned = load_file(PINNED / "sampler.safetensors")
    pipeline = ColorFlowPixArtPipeline(
        vae=released["vae"],
        transformer=released["transformer"],
        guider=released["guider"],
        scheduler=DPMSolverMultistepScheduler.from_pretrained(PINNED / "base"),
    )
    pipeline.set_progress_bar_config(disable=True)
    text = TextCache(
        pinned["prompt_embeds"],
        pinned["prompt_attention_mask"],
        pinned["negative_prompt_embeds"],
        pinned["negative_prompt_attention_mask"],
        meta={},
    )
    refs_only, frame_only, mask = _canvases()
    generator = torch.Generator().manual_seed(released["record"]["posterior_seed"])  # the release's global seed
    latents = pipeline(
        refs_only,
        frame_only,
        mask,
        text,
        num_inference_steps=3,
        guidance_scale=4.5,
        generator=generator,
        latents=pinned["latents"],
        output_type="latent",
    ).images
    expected = pinned["final_latents"]
    spread = float(expected.max() - expected.min())
    assert float((latents - expected).abs().max()) <= 1e-5 * spread


def test_guidance_1_and_a_batch_of_two_run_where_the_release_fails(released: dict) -> None:
    assert "Sizes of tensors must match" in released["record"]["release_error_at_guidance_1"]
    pipeline = ColorFlowPixArtPipeline(
        vae=released["vae"],
        transformer=released["transformer"],
        guider=released["guider"],
        scheduler=DPMSolverMultistepScheduler.from_pretrained(PINNED / "base"),
    )
    pipeline.set_progress_bar_config(disable=True)
    pinned = load_file(PINNED / "sampler.safetensors")
    text = TextCache(
        pinned["prompt_embeds"],
        pinned["prompt_attention_mask"],
        pinned["negative_prompt_embeds"],
        pinned["negative_prompt_attention_mask"],
        meta={},
    )
    refs_only, frame_only, mask = _canvases()
    for guidance, batch in ((1.0, 1), (4.5, 2), (1.0, 2)):
        out = pipeline(
            [refs_only] * batch,
            [frame_only] * batch,
            mask,
            text,
            num_inference_steps=2,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images
        assert out.shape == (batch, 4, 8, 12) and torch.isfinite(out).all()
