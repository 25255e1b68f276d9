"""GSRP model: fusion layout (released and ours), the guided VAE's taps and add points, checkpointing, inference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from model.gsrp_fusion import GSRPFusion, released_key, vae_fusion_channels
from model.gsrp_vae import GuidedVAE, pil_to_tensor, super_resolve, tensor_to_pil
from model.gsrp_weights import load_gsrp, read_gsrp_export, save_gsrp_export
from model.tiny import SD15_VAE_CONFIG, build_tiny_vae

REFERENCE = Path(__file__).parent / "reference" / "colorflow_gsrp_fusion.json"
pytestmark = pytest.mark.usefixtures("frugal_threads")


def reference_listing() -> dict[str, list[int]]:
    return json.loads(REFERENCE.read_text())["keys"]


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return build_tiny_vae().requires_grad_(False).eval()


def tiny_fusion(vae: AutoencoderKL, seed: int = 1, **kwargs) -> GSRPFusion:
    torch.manual_seed(seed)
    return GSRPFusion.from_vae_config(vae.config, **kwargs)


def test_released_layout_equals_the_reference_listing():
    with torch.device("meta"):
        fusion = GSRPFusion()
    listing = reference_listing()
    state = fusion.released_state_dict()
    assert list(state) == list(listing)  # same keys, same order, BatchNorm buffers included
    for key, shape in listing.items():
        assert list(state[key].shape) == shape, key
    assert sum(p.numel() for p in fusion.parameters()) == 84_974_592
    assert (
        released_key("branches.3.blocks.0.shortcut.1.running_var")
        == "two_layer_resnets.3.block1.shortcut.1.running_var"
    )


@pytest.mark.parametrize("layout", ["tiny", "sd15"])
def test_shapes_through_every_level(layout):
    """Taps, fused maps and output for the tiny VAE (real values) and SD1.5's VAE (meta device, shapes only)."""
    if layout == "sd15":
        with torch.device("meta"):
            vae = AutoencoderKL(**SD15_VAE_CONFIG)
            fusion = GSRPFusion.from_vae_config(vae.config)
        images = torch.empty(2, 3, 64, 96, device="meta")
        assert vae_fusion_channels(vae.config) == ((128, 128, 256, 512, 512), (256, 512, 512, 512, 512))
        assert tuple(fusion.config.encoder_channels) == (128, 128, 256, 512, 512)
    else:
        vae = tiny_vae()
        fusion = tiny_fusion(vae).eval()
        images = torch.rand(2, 3, 64, 96) * 2 - 1
    guided = GuidedVAE(vae)
    enc, dec = vae_fusion_channels(vae.config)
    posterior, taps = guided.encode_features(images)
    strides = [1, 2, 4, 8, 8]
    assert [tuple(t.shape) for t in taps] == [(2, c, 64 // s, 96 // s) for c, s in zip(enc, strides, strict=True)]
    fused = fusion(taps, taps)
    assert [tuple(t.shape) for t in fused] == [(2, c, 64 // s, 96 // s) for c, s in zip(dec, strides, strict=True)]
    latents = posterior.sample()
    assert tuple(latents.shape) == (2, 4, 8, 12)
    assert tuple(guided.decode_fused(latents, fused).shape) == (2, 3, 64, 96)
    if layout == "tiny":  # every fused map is non-negative (each block ends in ReLU)
        assert all(bool((f >= 0).all()) for f in fused)


def test_guided_vae_is_the_stock_vae_without_fusion():
    vae = tiny_vae()
    guided = GuidedVAE(vae)
    images = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        posterior, _ = guided.encode_features(images)
        stock = vae.encode(images).latent_dist
        assert torch.allclose(posterior.mean, stock.mean, atol=1e-6)
        assert torch.allclose(posterior.logvar, stock.logvar, atol=1e-6)
        latents = stock.mean
        assert torch.allclose(guided.decode_fused(latents, None), vae.decode(latents).sample, atol=1e-6)
        zeros = [
            torch.zeros(1, c, 32 // s, 48 // s) for c, s in zip(guided.decoder_channels, [1, 2, 4, 8, 8], strict=True)
        ]
        assert torch.allclose(guided.decode_fused(latents, zeros), vae.decode(latents).sample, atol=1e-6)
        with pytest.raises(ValueError, match="fused map 4"):
            guided.decode_fused(latents, [*zeros[:4], torch.zeros(1, 16, 2, 2)])


def test_gradients_reach_only_the_fusion():
    vae = tiny_vae()
    fusion = tiny_fusion(vae, norm="group").train()
    guided = GuidedVAE(vae)
    color, bw, target = (torch.rand(2, 3, 32, 48) * 2 - 1 for _ in range(3))
    output = guided.restore(fusion, color, bw, torch.Generator().manual_seed(0))
    (output - target).abs().mean().backward()
    assert all(p.grad is None for p in vae.parameters())
    assert all(p.grad is not None for p in fusion.parameters())
    assert sum(float(p.grad.abs().sum()) for p in fusion.parameters()) > 0
    for p in fusion.branches[0].parameters():  # the full-resolution branch, added last, gets its share too
        assert p.grad is not None


def _step(guided: GuidedVAE, fusion: GSRPFusion, color, bw, target):
    fusion.zero_grad(set_to_none=True)
    output = guided.restore(fusion, color, bw, torch.Generator().manual_seed(3))
    (output - target).abs().mean().backward()
    return output.detach(), {name: p.grad.clone() for name, p in fusion.named_parameters()}


def test_gradient_checkpointing_keeps_the_fusion_and_its_gradients():
    """The released fork drops the fused maps when checkpointing is on; here outputs and gradients are equal
    (VAE and fusion checkpointed)."""
    vae = tiny_vae()
    fusion = tiny_fusion(vae, norm="group").train()
    guided = GuidedVAE(vae)
    color, bw, target = (torch.rand(1, 3, 32, 48) * 2 - 1 for _ in range(3))
    calls = []
    # a pre-hook: checkpoint's recomputation stops early, before a block's forward hooks would run
    vae.decoder.up_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))

    fusion.branches[0].blocks[0].register_forward_pre_hook(lambda *_: calls.append(2))

    plain_output, plain_grads = _step(guided, fusion, color, bw, target)
    assert sorted(calls) == [1, 2]
    vae.enable_gradient_checkpointing()
    fusion.enable_gradient_checkpointing()
    calls.clear()
    ckpt_output, ckpt_grads = _step(guided, fusion, color, bw, target)
    assert sorted(calls) == [1, 1, 2, 2]  # the VAE and the fusion blocks really were recomputed in backward
    assert torch.allclose(plain_output, ckpt_output, atol=1e-6)
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, ckpt_grads[name], atol=1e-6, rtol=1e-5), name
    with torch.no_grad():  # and the fusion is really in there: not the plain decode
        latents = guided.encode_features(color)[0].sample(torch.Generator().manual_seed(3))
        assert (ckpt_output - guided.decode_fused(latents, None)).abs().max() > 1e-3


def _fake_release(listing: dict[str, list[int]], path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {
        key: torch.tensor(7, dtype=torch.int64) if not shape else torch.randn(shape, generator=generator)
        for key, shape in listing.items()
    }
    torch.save(state, path)
    return state


def test_released_file_loads_strictly(tmp_path):
    """A file built from the reference listing with random values loads, every tensor in its place."""
    state = _fake_release(reference_listing(), tmp_path / "MultiResNetModel.bin")
    fusion = load_gsrp(tmp_path)  # a GraySD/-like folder
    assert not fusion.training and fusion.config.norm == "batch"
    assert tuple(fusion.config.decoder_channels) == (256, 512, 512, 512, 512)
    loaded = fusion.released_state_dict()
    for key in ("two_layer_resnets.0.block1.conv1.weight", "two_layer_resnets.4.block4.bn2.running_var"):
        assert torch.equal(loaded[key], state[key])
    assert int(loaded["two_layer_resnets.3.block1.shortcut.1.num_batches_tracked"]) == 7


def _tiny_listing() -> dict[str, list[int]]:
    with torch.device("meta"):
        fusion = GSRPFusion.from_vae_config(build_tiny_vae().config)
    return {key: list(value.shape) for key, value in fusion.released_state_dict().items()}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("drop", "missing key 'two_layer_resnets.2.block3.conv2.weight'"),
        ("extra", "unexpected key 'two_layer_resnets.2.block3.conv3.weight'"),
        ("shape", "key 'two_layer_resnets.2.block3.conv2.weight' has shape"),
        ("order", "key order differs at position"),
    ],
)
def test_mismatched_released_file_fails_naming_the_key(tmp_path, edit, message):
    listing = _tiny_listing()
    key = "two_layer_resnets.2.block3.conv2.weight"
    if edit == "drop":
        del listing[key]
    elif edit == "extra":
        listing["two_layer_resnets.2.block3.conv3.weight"] = [16, 16, 3, 3]
    elif edit == "shape":
        listing[key] = [16, 16, 1, 1]
    else:
        listing = dict(reversed(list(listing.items())))
    _fake_release(listing, tmp_path / "MultiResNetModel.bin")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        GSRPFusion.from_released(tmp_path / "MultiResNetModel.bin")


def test_released_file_of_other_widths_fails_against_a_given_layout(tmp_path):
    """A tiny release checked against SD1.5's widths fails by name (SD1.5 has a projection where tiny has none)."""
    _fake_release(_tiny_listing(), tmp_path / "MultiResNetModel.bin")
    encoder, decoder = vae_fusion_channels(SD15_VAE_CONFIG)
    with pytest.raises(ValueError, match="missing key 'two_layer_resnets.1.block1.shortcut.0.weight'"):
        GSRPFusion.from_released(tmp_path / "MultiResNetModel.bin", encoder_channels=encoder, decoder_channels=decoder)
    (tmp_path / "broken.bin").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="broken.bin: not a readable torch state dict"):
        load_gsrp(tmp_path / "broken.bin")


def test_save_released_round_trip_and_our_export(tmp_path):
    vae = tiny_vae()
    fusion = tiny_fusion(vae).eval()
    with torch.no_grad():  # non-trivial running statistics, so the buffers are checked too
        taps = [torch.rand(2, c, 4, 4) for c in fusion.config.encoder_channels]
        fusion.train()(taps, taps)
        fusion.eval()
    released = load_gsrp(fusion.save_released(tmp_path / "rel" / "MultiResNetModel.bin"))
    export = save_gsrp_export(tmp_path / "export", fusion, {"base_model": "tiny", "sr_scale": 1.5})
    assert read_gsrp_export(export)["sr_scale"] == 1.5
    assert not list(tmp_path.glob("export.*"))  # no temporary or old folder left behind
    again = save_gsrp_export(tmp_path / "export", fusion, {"base_model": "tiny", "sr_scale": 2.0})
    assert read_gsrp_export(again)["sr_scale"] == 2.0
    exported = load_gsrp(export)
    run_folder = load_gsrp(tmp_path)  # a training run folder stands for its export/ subfolder
    taps = [torch.rand(1, c, 8, 8) for c in fusion.config.encoder_channels]
    with torch.no_grad():
        want = fusion(taps, taps)
        for other in (released, exported, run_folder):
            for a, b in zip(want, other(taps, taps), strict=True):
                assert torch.equal(a, b)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no GSRP weights"):
        load_gsrp(tmp_path / "empty")


def test_frozen_batchnorm_statistics_and_group_norm_batch_independence():
    vae = tiny_vae()
    taps = [torch.rand(2, c, 8, 8) for c in vae_fusion_channels(vae.config)[0]]
    fusion = tiny_fusion(vae).train()
    fusion.freeze_batchnorm_statistics()
    before = {k: v.clone() for k, v in fusion.state_dict().items() if "running" in k}
    train_out = fusion(taps, taps)
    assert all(torch.equal(before[k], v) for k, v in fusion.state_dict().items() if "running" in k)
    fusion.eval()
    eval_out = fusion(taps, taps)
    assert all(torch.equal(a, b) for a, b in zip(train_out, eval_out, strict=True))
    fusion.freeze_batchnorm_statistics(False)
    fusion.train()
    fusion.enable_gradient_checkpointing()  # not applied while statistics update: they would be updated twice
    fusion(taps, taps)[0].sum().backward()
    assert int(fusion.branches[0].blocks[0].norm1.num_batches_tracked) == 1
    assert any(not torch.equal(before[k], v) for k, v in fusion.state_dict().items() if "running_mean" in k)

    group = tiny_fusion(vae, norm="group").train()  # no batch statistics: a sample's output ignores its batch
    alone = group([t[:1] for t in taps], [t[:1] for t in taps])
    together = group(taps, taps)
    for a, b in zip(alone, together, strict=True):
        assert torch.allclose(a[0], b[0], atol=1e-5)


def test_super_resolve_matches_the_tensor_path_and_keeps_the_size():
    vae = tiny_vae()
    fusion = tiny_fusion(vae).train()
    lowres = Image.fromarray((torch.rand(40, 30, 3) * 255).to(torch.uint8).numpy())
    hr_bw = Image.fromarray((torch.rand(60, 45) * 255).to(torch.uint8).numpy())
    result = super_resolve(vae, fusion, lowres, hr_bw, generator=torch.Generator().manual_seed(5))
    assert result.size == (45, 60) and result.mode == "RGB"
    assert fusion.training  # its mode is restored
    again = super_resolve(vae, fusion, lowres, hr_bw, generator=torch.Generator().manual_seed(5))
    assert np.array_equal(np.asarray(result), np.asarray(again))

    hr_bw = hr_bw.resize((48, 64))  # multiples of 8: no padding, so the tensor path gives the same pixels
    result = super_resolve(vae, fusion, lowres, hr_bw, generator=torch.Generator().manual_seed(5))
    color = pil_to_tensor(lowres.resize((48, 64), Image.BICUBIC))[None]
    fusion.eval()
    with torch.no_grad():
        output = GuidedVAE(vae).restore(fusion, color, pil_to_tensor(hr_bw)[None], torch.Generator().manual_seed(5))
    assert np.array_equal(np.asarray(result), np.asarray(tensor_to_pil(output[0])))

    other = GSRPFusion(encoder_channels=(8, 8, 8, 16), decoder_channels=(8, 16, 16, 16), norm="group")
    with pytest.raises(ValueError, match="do not fit this VAE"):
        super_resolve(vae, other, lowres, hr_bw)


def _image_taps(vae: AutoencoderKL, batch: int, size: int = 64, seed: int = 3) -> list[torch.Tensor]:
    """Encoder taps of random images: full size, /2, /4, /8, /8 (a 64x64 image keeps every map at least 8x8:
    per-sample statistics need more than one value per channel)."""
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        return GuidedVAE(vae).encode_features(images)[1]


def test_page_statistics_are_each_pages_own_alone_and_in_a_batch():
    vae = tiny_vae()
    fusion = tiny_fusion(vae).eval()
    with torch.no_grad():  # stored statistics that differ from any page's, so the two modes must disagree
        for module in fusion.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    color, bw = _image_taps(vae, 2, seed=3), _image_taps(vae, 2, seed=4)
    stored = {k: v.clone() for k, v in fusion.state_dict().items() if "running" in k or "num_batches" in k}
    with torch.no_grad():
        together = fusion(color, bw, statistics="page")
        alone = [fusion([t[i : i + 1] for t in color], [t[i : i + 1] for t in bw], statistics="page") for i in (0, 1)]
        running = fusion(color, bw)
        fusion.train()  # the released app's mode: train-mode BatchNorm on a batch of one page
        released = fusion([t[:1] for t in color], [t[:1] for t in bw])
        fusion.eval()
    for level, fused in enumerate(together):
        for i in (0, 1):
            assert torch.allclose(fused[i], alone[i][level][0], atol=1e-5), (level, i)
        assert torch.allclose(fused[0], released[level][0], atol=1e-5), level
        assert not torch.allclose(fused, running[level], atol=1e-3), level
    fusion.load_state_dict({**fusion.state_dict(), **stored})  # undo the train-mode update above
    with torch.no_grad():
        fusion(color, bw, statistics="page")
    assert all(torch.equal(stored[k], v) for k, v in fusion.state_dict().items() if k in stored)
    with pytest.raises(ValueError, match="statistics"):
        fusion(color, bw, statistics="batch")


def test_export_statistics_default_to_running_and_the_release_to_page(tmp_path):
    from model.gsrp_weights import STATISTICS_KEY, default_statistics

    fusion = tiny_fusion(tiny_vae())
    assert default_statistics(save_gsrp_export(tmp_path / "old", fusion, {})) == "running"  # no field: eval mode
    assert default_statistics(save_gsrp_export(tmp_path / "new", fusion, {STATISTICS_KEY: "page"})) == "page"
    released = fusion.save_released(tmp_path / "GraySD" / "MultiResNetModel.bin")
    assert default_statistics(released) == default_statistics(released.parent) == "page"
