"""The Colorization Guider and the guided UNet: released layout, strict loading, residual order, checkpointing."""

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from model.colorguider import ColorGuider, GuiderOutput
from model.guided_unet import GuidedUNet
from model.lora import add_icp_lora
from model.tiny import build_tiny_unet

REFERENCE = Path(__file__).parent / "reference" / "colorflow_guider_sd.json"
SD15_UNET = {
    "sample_size": 64,
    "cross_attention_dim": 768,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": 8,
}

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return build_tiny_unet().eval()


def _randomise(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def _inputs(batch=2, height=16, width=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, height, width, generator=generator)
    text = torch.randn(batch, 7, 32, generator=generator)
    cond = torch.randn(batch, 9, height, width, generator=generator)
    return sample, torch.tensor([10, 700][:batch]), text, cond


def test_sd15_guider_on_meta_matches_the_released_listing():
    reference = json.loads(REFERENCE.read_text())
    with torch.device("meta"):
        from_config = ColorGuider.from_config(reference["config"])
        unet = UNet2DConditionModel(**SD15_UNET)
        from_unet = ColorGuider.from_unet(unet, load_weights_from_unet=False)
    listing = [(key, tuple(shape)) for key, shape in reference["keys"].items()]
    for guider in (from_config, from_unet):
        assert [(key, tuple(value.shape)) for key, value in guider.state_dict().items()] == listing
        assert guider.residual_counts == (12, 1, 15)
    for key, value in reference["config"].items():
        if not key.startswith("_"):
            mine = from_unet.config[key]
            assert (list(mine) if isinstance(mine, tuple) else mine) == value, key
    channels = [conv.out_channels for conv in from_unet.brushnet_down_blocks]
    assert channels == [entry["channels"] for entry in reference["residuals"]["down"]]
    channels = [conv.out_channels for conv in from_unet.brushnet_up_blocks]
    assert channels == [entry["channels"] for entry in reference["residuals"]["up"]]


def test_residual_resolutions_follow_the_released_listing(tiny_unet):
    # The tiny UNet has SD1.5's structure, so its 28 residuals sit at the listing's scales (32x40 latent, as there).
    residuals = json.loads(REFERENCE.read_text())["residuals"]
    guider = ColorGuider.from_unet(tiny_unet)
    with torch.no_grad():
        out = guider(torch.zeros(1, 4, 32, 40), 1, torch.zeros(1, 9, 32, 40))
    for produced, listed in ((out.down_residuals, residuals["down"]), (out.up_residuals, residuals["up"])):
        assert [(32 // r.shape[2], 40 // r.shape[3]) for r in produced] == [
            (entry["downscale_vs_latent"],) * 2 for entry in listed
        ]
    assert out.mid_residual.shape[2:] == (32 // residuals["mid"]["downscale_vs_latent"], 40 // 8)


def test_from_unet_copies_weights_and_starts_with_zero_outputs(tiny_unet):
    guider = ColorGuider.from_unet(tiny_unet)
    weight = guider.conv_in_condition.weight
    assert weight.shape[1] == 13
    assert torch.equal(weight[:, :4], tiny_unet.conv_in.weight)
    assert torch.equal(weight[:, 4:8], tiny_unet.conv_in.weight)
    assert not weight[:, 8:].any()
    assert torch.equal(guider.conv_in_condition.bias, tiny_unet.conv_in.bias)
    unet_state = tiny_unet.state_dict()
    for key, value in guider.state_dict().items():
        if key.startswith(("time_embedding.", "down_blocks.", "mid_block.", "up_blocks.")):
            assert torch.equal(value, unet_state[key]), key
        if key.startswith("brushnet_"):
            assert not value.any(), key
    assert not any(".attn2." in key or "transformer_blocks.0.norm2." in key for key in guider.state_dict())
    out = guider(*_inputs()[:2], _inputs()[3])
    assert len(out.down_residuals) == 12 and len(out.up_residuals) == 15
    assert all(not residual.any() for residual in out.down_residuals + out.up_residuals)


def test_zero_initialised_guider_leaves_the_unet_output_unchanged(tiny_unet):
    unet = add_icp_lora(copy.deepcopy(tiny_unet), rank=4, alpha=4)
    _randomise(unet, seed=1)  # non-trivial LoRA too: the walk must equal the stock forward with adapters active
    guided = GuidedUNet(unet, ColorGuider.from_unet(tiny_unet)).eval()
    for height, width in ((16, 12), (20, 12), (22, 14)):  # 22x14 is not a multiple of 8: upsample sizes forwarded
        sample, timesteps, text, cond = _inputs(height=height, width=width)
        with torch.no_grad():
            expected = unet(sample, timesteps, text).sample
            got = guided(sample, timesteps, text, cond)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-6


def _captures(unet):
    records, handles = {}, []

    def keep(name, use_input):
        def hook(module, args, output):
            value = args[0] if use_input else output
            records[name] = (value[0] if isinstance(value, tuple) else value).detach().clone()

        return hook

    points = {
        "conv_in": (unet.conv_in, False),
        "down0.resnet0.in": (unet.down_blocks[0].resnets[0], True),
        "down0.attn0.out": (unet.down_blocks[0].attentions[0], False),
        "down0.resnet1.in": (unet.down_blocks[0].resnets[1], True),
        "mid.out": (unet.mid_block, False),
        "up0.resnet0.in": (unet.up_blocks[0].resnets[0], True),
        "up0.resnet0.out": (unet.up_blocks[0].resnets[0], False),
        "up0.resnet1.in": (unet.up_blocks[0].resnets[1], True),
        "up0.upsampler.out": (unet.up_blocks[0].upsamplers[0], False),
        "up1.resnet0.in": (unet.up_blocks[1].resnets[0], True),
        "last.resnet1.in": (unet.up_blocks[-1].resnets[1], True),
        "last.resnet2.in": (unet.up_blocks[-1].resnets[2], True),
    }
    for name, (module, use_input) in points.items():
        handles.append(module.register_forward_hook(keep(name, use_input)))
    return records, handles


def test_residuals_enter_where_and_in_the_order_the_release_adds_them(tiny_unet):
    guider = ColorGuider.from_unet(tiny_unet)
    sample, timesteps, text, cond = _inputs(batch=1)
    with torch.no_grad():
        shapes = guider(sample, timesteps, cond)
    generator = torch.Generator().manual_seed(3)
    down = tuple(torch.randn(r.shape, generator=generator) for r in shapes.down_residuals)
    up = tuple(torch.randn(r.shape, generator=generator) for r in shapes.up_residuals)
    mid = torch.randn(shapes.mid_residual.shape, generator=generator)
    residuals = GuiderOutput(down_residuals=down, mid_residual=mid, up_residuals=up)
    records, handles = _captures(tiny_unet)
    try:
        with torch.no_grad():
            GuidedUNet(tiny_unet, guider)(sample, timesteps, text, None, guider_output=residuals)
    finally:
        for handle in handles:
            handle.remove()
    channels0 = records["conv_in"].shape[1]
    # conv_in: the stream gets down[0], the decoder's last skip does not.
    assert torch.allclose(records["down0.resnet0.in"], records["conv_in"] + down[0])
    assert torch.allclose(records["last.resnet2.in"][:, -channels0:], records["conv_in"])
    # down layer 0: added after resnet+attention, and the saved skip carries it.
    assert torch.allclose(records["down0.resnet1.in"], records["down0.attn0.out"] + down[1])
    assert torch.allclose(records["last.resnet1.in"][:, -channels0:], records["down0.attn0.out"] + down[1])
    # mid: after the mid block.
    mid_channels = records["mid.out"].shape[1]
    assert torch.allclose(records["up0.resnet0.in"][:, :mid_channels], records["mid.out"] + mid)
    # up path: after each layer, and after the upsampler (4th residual of a 2-layer-per-block UNet's first up block).
    assert torch.allclose(records["up0.resnet1.in"][:, :mid_channels], records["up0.resnet0.out"] + up[0])
    assert torch.allclose(records["up1.resnet0.in"][:, :mid_channels], records["up0.upsampler.out"] + up[3])


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(tiny_unet):
    unet = add_icp_lora(copy.deepcopy(tiny_unet), rank=4, alpha=4)
    guider = ColorGuider.from_unet(tiny_unet)
    _randomise(guider, seed=2)
    _randomise(unet, seed=4)
    unet.requires_grad_(False)
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(".lora_" in name)
    guided = GuidedUNet(unet, guider).train()
    sample, timesteps, text, cond = _inputs()

    def run():
        guided.zero_grad(set_to_none=True)
        out = guided(sample, timesteps, text, cond)
        out.square().mean().backward()
        grads = {name: p.grad.clone() for name, p in guided.named_parameters() if p.requires_grad}
        return out.detach(), grads

    plain_out, plain_grads = run()
    guided.enable_gradient_checkpointing()
    assert guided.unet.is_gradient_checkpointing and guided.guider.is_gradient_checkpointing
    ckpt_out, ckpt_grads = run()
    guided.disable_gradient_checkpointing()
    assert torch.allclose(plain_out, ckpt_out, atol=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys()
    assert any(name.startswith("guider.brushnet_") for name in plain_grads)
    assert any(".lora_" in name for name in plain_grads)
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, ckpt_grads[name], atol=1e-6, rtol=1e-4), name
    assert any(grad.abs().sum() > 0 for name, grad in plain_grads.items() if name.startswith("guider.brushnet_up"))


def test_only_guider_and_lora_parameters_train(tiny_unet):
    unet = add_icp_lora(copy.deepcopy(tiny_unet))
    guided = GuidedUNet(unet, ColorGuider.from_unet(tiny_unet))
    trainable = {name for name, parameter in guided.named_parameters() if parameter.requires_grad}
    assert trainable
    assert all(name.startswith("guider.") or ".lora_" in name for name in trainable)
    assert {name for name, _ in guided.guider.named_parameters()} == {
        n[len("guider.") :] for n in trainable if n.startswith("guider.")
    }
    assert sum(".lora_A." in name for name in trainable) == sum(".lora_B." in name for name in trainable) > 0


def test_guider_mismatched_with_the_unet_is_refused(tiny_unet):
    other = ColorGuider.from_config({**ColorGuider.from_unet(tiny_unet).config, "layers_per_block": 1})
    with pytest.raises(ValueError, match="residuals"):
        GuidedUNet(tiny_unet, other)
    with pytest.raises(ValueError, match="cond must be"):
        ColorGuider.from_unet(tiny_unet)(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 5, 8, 8))


def _released_folder(folder: Path, guider: ColorGuider, state: dict, fmt: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {key: list(value) if isinstance(value, tuple) else value for key, value in guider.config.items()}
    config.update({"_class_name": "ColorGuiderSDModel", "_diffusers_version": "0.31.0.dev0"})
    (folder / "config.json").write_text(json.dumps(config))
    if fmt == "bin":
        torch.save(state, folder / "diffusion_pytorch_model.bin")
    else:
        save_file(
            {key: value.contiguous() for key, value in state.items()}, folder / "diffusion_pytorch_model.safetensors"
        )
    return folder


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_released_layout_loads_and_bad_files_fail_naming_the_key(tmp_path, tiny_unet, fmt):
    guider = ColorGuider.from_unet(tiny_unet)
    _randomise(guider, seed=5)
    state = guider.state_dict()
    loaded = ColorGuider.from_pretrained(_released_folder(tmp_path / "ok", guider, state, fmt))
    for (key, value), (other_key, other) in zip(state.items(), loaded.state_dict().items(), strict=True):
        assert key == other_key and torch.equal(value, other), key

    missing = dict(state)
    del missing["brushnet_up_blocks.7.weight"]
    with pytest.raises(ValueError, match=r"missing key 'brushnet_up_blocks\.7\.weight'"):
        ColorGuider.from_pretrained(_released_folder(tmp_path / "missing", guider, missing, fmt))
    extra = {**state, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight": torch.zeros(16, 16)}
    with pytest.raises(
        ValueError, match=r"unexpected key 'down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2"
    ):
        ColorGuider.from_pretrained(_released_folder(tmp_path / "extra", guider, extra, fmt))
    misshaped = {**state, "conv_in_condition.weight": torch.zeros(16, 9, 3, 3)}
    with pytest.raises(ValueError, match=r"key 'conv_in_condition\.weight' has shape \(16, 9, 3, 3\)"):
        ColorGuider.from_pretrained(_released_folder(tmp_path / "shape", guider, misshaped, fmt))


def test_save_pretrained_round_trip(tmp_path, tiny_unet):
    guider = ColorGuider.from_unet(tiny_unet)
    _randomise(guider, seed=6)
    guider.save_pretrained(tmp_path / "colorguider")
    loaded = ColorGuider.from_pretrained(tmp_path / "colorguider")
    sample, timesteps, _, cond = _inputs()
    with torch.no_grad():
        a, b = guider(sample, timesteps, cond, conditioning_scale=0.5), loaded(sample, timesteps, cond, 0.5)
        full = guider(sample, timesteps, cond)
    assert all(torch.equal(x, y) for x, y in zip(a.up_residuals, b.up_residuals, strict=True))
    assert torch.allclose(a.mid_residual * 2, full.mid_residual, atol=1e-6)
    assert a.mid_residual.abs().sum() > 0
