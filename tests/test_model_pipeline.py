"""The ICP sampling pipeline on the tiny SD1.5 folder, and ICP weight exports / released layouts round-tripping."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.icp_weights import describe_weights, load_icp_pipeline, save_icp_export, write_released_icp_layout
from model.tiny import build_tiny_sd15
from pipelines.core.geometry import CompositeLayout
from pipelines.core.sample_inputs import composite_inputs

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("tiny") / "sd15")


@pytest.fixture(scope="module")
def trained_pipeline(sd15):
    """A fresh pipeline whose guider outputs and LoRA are non-zero, as after some training."""
    pipe = load_icp_pipeline(sd15)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in pipe.guider.named_parameters():
            if name.startswith("brushnet_"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
        for name, parameter in pipe.unet.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return pipe


def _composite(width, height, seed=0):
    layout = CompositeLayout(width, height)
    rng = np.random.default_rng(seed)
    ring = Image.fromarray(rng.integers(0, 256, (2 * height, 2 * width, 3), dtype=np.uint8))
    bw = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return layout, composite_inputs(layout, ring, bw)


def _run(pipe, inputs, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 2, "output_type": "np", **kwargs}
    generator = torch.Generator().manual_seed(seed)
    return pipe(inputs.refs_only, inputs.frame_only, inputs.mask, generator=generator, **kwargs).images


def test_returns_the_requested_size_and_is_seeded(trained_pipeline):
    pipe = trained_pipeline
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert pipe.vae_scale_factor == 8
    for width, height in ((48, 80), (64, 32)):  # 48x80: latent 12x20, not a multiple of the UNet's 8
        layout, inputs = _composite(width, height)
        images = pipe(inputs.refs_only, inputs.frame_only, inputs.mask, num_inference_steps=2).images
        assert images[0].size == (2 * width, 2 * height)
        assert layout.crop_centre(images[0]).size == (width, height)
    _, inputs = _composite(48, 80)
    first, again, other = _run(pipe, inputs, 3), _run(pipe, inputs, 3), _run(pipe, inputs, 4)
    assert first.shape == (1, 160, 96, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    no_guidance = _run(pipe, inputs, 3, guidance_scale=1.0)
    assert not np.array_equal(first, no_guidance)


def test_batches_and_conditioning(trained_pipeline):
    pipe = trained_pipeline
    _, a = _composite(48, 80, seed=1)
    _, b = _composite(48, 80, seed=2)
    images = pipe(
        [a.refs_only, b.refs_only], [a.frame_only, b.frame_only], a.mask, num_inference_steps=2, output_type="np"
    ).images
    assert images.shape == (2, 160, 96, 3)
    cond = pipe.prepare_guider_cond([a.refs_only], [a.frame_only], [a.mask], torch.Generator().manual_seed(0))
    assert cond.shape == (1, 9, 20, 12)
    expected_mask = F.interpolate(torch.from_numpy(a.mask)[None, None], size=(20, 12), mode="bilinear")
    assert torch.allclose(cond[:, 4:5], expected_mask)
    assert cond[0, 4, 0, 0] == 1.0 and cond[0, 4, 10, 6] == 0.0  # ring known, centre to generate
    with pytest.raises(ValueError, match="not a multiple of the VAE factor"):
        pipe(a.refs_only.crop((0, 0, 92, 160)), a.frame_only.crop((0, 0, 92, 160)), a.mask[:, :92])


def test_export_and_released_layout_reload_to_the_same_outputs(tmp_path, sd15, trained_pipeline):
    _, inputs = _composite(48, 80)
    expected = _run(trained_pipeline, inputs)
    run_root = tmp_path / "run"
    (run_root / "checkpoint-2").mkdir(parents=True)
    meta = {"step": 2, "mu": 1.5}
    for _ in range(2):  # a second export replaces the first in place
        save_icp_export(run_root, trained_pipeline.guider, trained_pipeline.unet, meta)
    assert (run_root / "checkpoint-2").is_dir()
    assert (run_root / "unet_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (run_root / "colorguider" / "config.json").is_file()
    record = json.loads((run_root / "export.json").read_text())
    assert record["step"] == 2 and record["lora"]["rank"] == 64 and record["lora"]["alpha"] == 64
    assert not [path for path in run_root.iterdir() if ".tmp-" in path.name]
    assert describe_weights(run_root) == "export"
    exported = load_icp_pipeline(sd15, run_root)
    exported.set_progress_bar_config(disable=True)
    assert np.allclose(_run(exported, inputs), expected, atol=1e-5)

    released = write_released_icp_layout(tmp_path / "GraySD", trained_pipeline.guider, trained_pipeline.unet)
    assert json.loads((released / "config.json").read_text())["_class_name"] == "ColorGuiderSDModel"
    lora_keys = torch.load(released / "unet_lora.bin", weights_only=True)
    assert all(key.endswith((".lora_A.default.weight", ".lora_B.default.weight")) for key in lora_keys)
    assert describe_weights(released) == "released"
    reloaded = load_icp_pipeline(sd15, released)
    reloaded.set_progress_bar_config(disable=True)
    assert np.allclose(_run(reloaded, inputs), expected, atol=1e-5)

    with pytest.raises(FileNotFoundError, match="not ICP weights"):
        load_icp_pipeline(sd15, tmp_path / "run" / "checkpoint-2")


def test_tiled_decode_tiles_only_the_decode(trained_pipeline):
    pipe = trained_pipeline
    _, inputs = _composite(48, 80)
    vae = pipe.vae
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 4  # force several tiles on this small canvas
    try:
        plain, tiled = _run(pipe, inputs, 5), _run(pipe, inputs, 5, tiled_decode=True)
        assert not vae.use_tiling  # the canvases were encoded whole: the guider saw its training-time latents
        latents = _run(pipe, inputs, 5, output_type="latent")
        assert torch.equal(latents, _run(pipe, inputs, 5, output_type="latent", tiled_decode=True))
    finally:
        vae.tile_sample_min_size, vae.tile_latent_min_size = saved
    assert tiled.shape == plain.shape == (1, 160, 96, 3)
    assert not np.array_equal(plain, tiled)  # the decode really ran in tiles
    assert np.abs(plain.astype(np.float32) - tiled.astype(np.float32)).mean() < 0.1  # blended tiles, same picture


def test_latents_and_posterior_noise_reproduce_a_seeded_run(trained_pipeline):
    """The generator draws the initial noise, then the refs-only and the frame-only posterior noise: given those
    three tensors, a run without a generator is the same run, bit for bit."""
    from diffusers.utils.torch_utils import randn_tensor

    _, inputs = _composite(48, 80)
    seeded = _run(trained_pipeline, inputs, 5)
    generator = torch.Generator().manual_seed(5)
    latents = randn_tensor((1, 4, 20, 12), generator=generator)
    refs_noise, frame_noise = (
        randn_tensor((1, 4, 20, 12), generator=generator),
        randn_tensor((1, 4, 20, 12), generator=generator),
    )
    given = trained_pipeline(
        inputs.refs_only,
        inputs.frame_only,
        inputs.mask,
        num_inference_steps=2,
        output_type="np",
        latents=latents,
        posterior_noise=(refs_noise, frame_noise),
    ).images
    assert np.array_equal(seeded, given)
    with pytest.raises(ValueError, match="latents have shape"):
        trained_pipeline(inputs.refs_only, inputs.frame_only, inputs.mask, latents=latents[:, :, :8])


def test_tiny_folder_has_the_real_sd15_schedule(sd15):
    """No timestep_spacing key, as in stable-diffusion-v1-5: UniPC spaces 10 steps 999..100 (not 901..91)."""
    from diffusers import UniPCMultistepScheduler

    config = json.loads((sd15 / "scheduler" / "scheduler_config.json").read_text())
    assert "timestep_spacing" not in config
    scheduler = UniPCMultistepScheduler.from_pretrained(sd15, subfolder="scheduler")
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist()[0] == 999 and scheduler.timesteps.tolist()[-1] == 100
