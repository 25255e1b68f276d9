"""The tiny SD1.5-shaped folder loads through diffusers' own loader and has SD1.5's structure."""

import torch
from diffusers import StableDiffusionPipeline

from model.tiny import build_tiny_sd15


def test_tiny_folder_loads_as_a_stable_diffusion_pipeline(tmp_path):
    folder = build_tiny_sd15(tmp_path / "sd15")
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / sub).is_dir()
    assert (folder / "model_index.json").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8
    assert pipe.unet.config.down_block_types[-1] == "DownBlock2D"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    ids = pipe.tokenizer("manga").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id and len(ids) == 7
    # Same seed, same weights: two builds are interchangeable.
    other = StableDiffusionPipeline.from_pretrained(build_tiny_sd15(tmp_path / "again"))
    for (name, a), (_, b) in zip(pipe.unet.state_dict().items(), other.unet.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_command_line_writes_the_same_folder(tmp_path, capsys):
    from model.tiny import main

    assert main([str(tmp_path / "cli"), "--seed", "3"]) == 0
    assert "written to" in capsys.readouterr().out
    built = StableDiffusionPipeline.from_pretrained(build_tiny_sd15(tmp_path / "api", seed=3))
    cli = StableDiffusionPipeline.from_pretrained(tmp_path / "cli")
    for (name, a), (_, b) in zip(built.vae.state_dict().items(), cli.vae.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
