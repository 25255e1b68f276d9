"""ScreenStyle modules: published layouts (tests/reference), strict loading, forward shapes, determinism, options."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from screentone.color2manga import (
    ColorToScreenMapGenerator,
    SpectralNormFoldedConv2d,
    fold_spectral_norm,
    spectral_norm_prefixes,
    to_published_state_dict,
)
from screentone.lines import erode_lines
from screentone.loader import (
    CheckpointMismatchError,
    ScreenStyleModels,
    load_decoder,
    load_encoder,
    load_generator,
    load_screenstyle,
)
from screentone.render import HalftoneRenderer, ScreenStyleRenderer, make_renderer
from screentone.screenvae import ScreenVAEDecoder, ScreenVAEEncoder, decode_tone_binarised, encode_screenmap
from screentone.synthetic import synthetic_color_page

REFERENCE = Path(__file__).resolve().parent / "reference"  # published key layouts, copied into the tests


def _reference_layout(name: str) -> list[tuple[str, list[int]]]:
    keys = json.loads((REFERENCE / name).read_text())["keys"]
    return [(key, list(shape)) for key, shape in keys.items()]


def _layout(state_dict: dict[str, torch.Tensor]) -> list[tuple[str, list[int]]]:
    return [(key, list(value.shape)) for key, value in state_dict.items()]


@pytest.fixture(scope="module")
def generator() -> ColorToScreenMapGenerator:
    torch.manual_seed(0)
    return ColorToScreenMapGenerator().eval()


@pytest.fixture(scope="module")
def decoder() -> ScreenVAEDecoder:
    torch.manual_seed(1)
    return ScreenVAEDecoder().eval()


def _torch_spectral_norm_copy(generator: ColorToScreenMapGenerator) -> ColorToScreenMapGenerator:
    """The generator as the published code builds it: PyTorch's own spectral norm on every 3x3 conv."""
    published = copy.deepcopy(generator).train()
    for prefix in spectral_norm_prefixes(published):
        parent_name, _, child = prefix.rpartition(".")
        parent = published.get_submodule(parent_name)
        setattr(parent, child, nn.utils.spectral_norm(getattr(parent, child)))
    with torch.no_grad():  # power iterations, as training would have run them
        for _ in range(3):
            published(torch.rand(1, 4, 256, 256) * 2 - 1)
    return published.eval()


def test_decoder_and_encoder_state_dicts_equal_the_published_layouts(decoder):
    assert _layout(decoder.state_dict()) == _reference_layout("screenstyle_dec.json")
    assert _layout(ScreenVAEEncoder().state_dict()) == _reference_layout("screenstyle_enc.json")


def test_generator_published_state_dict_equals_the_published_layout(generator):
    reference = _reference_layout("screenstyle_g_rgb2intscr.json")
    assert _layout(to_published_state_dict(generator)) == reference
    # The module itself holds the folded form: same keys with each spectral-norm triple replaced by `weight`.
    folded = fold_spectral_norm({key: torch.zeros(shape) for key, shape in reference})
    assert {k: list(v.shape) for k, v in folded.items()} == dict(_layout(generator.state_dict()))
    assert len(spectral_norm_prefixes(generator)) == 16


def test_torch_spectral_norm_module_saves_the_published_layout(generator):
    published = _torch_spectral_norm_copy(generator)
    assert _layout(published.state_dict()) == _reference_layout("screenstyle_g_rgb2intscr.json")


def test_published_format_files_load_through_the_user_loader(generator, decoder, tmp_path):
    """A file saved by PyTorch's spectral norm (the release's format) gives the same output once folded."""
    published = _torch_spectral_norm_copy(generator)
    g_path, dec_path = tmp_path / "latest_net_G_RGB2INTSCR.pth", tmp_path / "latest_net_dec.pth"
    torch.save(published.state_dict(), g_path)
    torch.save(decoder.state_dict(), dec_path)

    models = load_screenstyle(g_path, dec_path, device="cpu")
    assert not models.generator.training and not models.decoder.training
    assert all(not p.requires_grad for p in models.generator.parameters())
    x = torch.rand(1, 4, 256, 256, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.inference_mode():
        expected, loaded = published(x), models.generator(x)
        torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-5)
        noise_a, noise_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        torch.testing.assert_close(models.decoder(loaded, noise_a), decoder(expected, noise_b), rtol=1e-4, atol=1e-4)


def test_fold_uses_pytorch_eval_spectral_norm_formula():
    torch.manual_seed(4)
    conv = nn.utils.spectral_norm(nn.Conv2d(6, 10, 3))
    for _ in range(5):
        conv(torch.randn(1, 6, 8, 8))
    conv.eval()
    conv(torch.randn(1, 6, 8, 8))  # eval forward recomputes .weight from the stored u, v without iterating
    folded = fold_spectral_norm(conv.state_dict())
    assert set(folded) == {"bias", "weight"}
    torch.testing.assert_close(folded["weight"], conv.weight.detach())


def test_our_published_export_round_trips_and_folds_back(generator, tmp_path):
    path = tmp_path / "g.pth"
    torch.save(to_published_state_dict(generator), path)
    loaded = load_generator(path)
    for key, value in generator.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=1e-5, atol=1e-7)
    # An already folded file (the module's own state dict) loads too.
    torch.save(generator.state_dict(), tmp_path / "folded.pth")
    assert torch.equal(load_generator(tmp_path / "folded.pth").model.model[1].weight, generator.model.model[1].weight)


def test_missing_file_error_names_the_path(tmp_path, decoder):
    torch.save(decoder.state_dict(), tmp_path / "dec.pth")
    missing = tmp_path / "nowhere" / "latest_net_G_RGB2INTSCR.pth"
    with pytest.raises(FileNotFoundError, match=str(missing).replace("\\", "\\\\")):
        load_screenstyle(missing, tmp_path / "dec.pth")


def test_shape_mismatch_error_names_file_key_and_shapes(decoder, tmp_path):
    state = decoder.state_dict()
    state["model.model.2.model.6.weight"] = torch.zeros(192, 48, 3, 3)
    path = tmp_path / "bad_dec.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as error:
        load_decoder(path)
    message = str(error.value)
    assert str(path) in message
    assert "'model.model.2.model.6.weight' has shape (192, 48, 3, 3), expected (192, 48, 4, 4)" in message


def test_wrong_network_file_reports_first_key_and_counts(decoder, tmp_path):
    path = tmp_path / "dec_as_g.pth"
    torch.save(decoder.state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match=r"'model\.noiseblock\.weight' has shape \(1,\), expected \(4,\)"):
        load_generator(path)
    state = decoder.state_dict()
    del state["model.model.8.bias"]
    state["module.extra"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=r"missing key 'model\.model\.8\.bias'.*1 missing, 1 unexpected"):
        load_decoder(path)


def test_broken_spectral_norm_triple_and_non_checkpoint_files_are_clear_errors(generator, tmp_path):
    state = to_published_state_dict(generator)
    del state["model.model.9.weight_u"]
    torch.save(state, tmp_path / "g.pth")
    with pytest.raises(CheckpointMismatchError, match=r"g\.pth: spectral-norm weight 'model\.model\.9\.weight_orig'"):
        load_generator(tmp_path / "g.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="text.pth: not a readable torch state dict"):
        load_encoder(tmp_path / "text.pth")


def test_forward_shapes_and_ranges(generator, decoder):
    torch.manual_seed(7)
    x = torch.rand(1, 4, 256, 256) * 2 - 1
    lines = torch.rand(1, 1, 256, 256) * 2 - 1
    encoder = ScreenVAEEncoder().eval()
    with torch.inference_mode():
        screenmap = generator(x)
        tone = decode_tone_binarised(decoder, screenmap, lines, torch.Generator().manual_seed(0))
        mean, logvar = encode_screenmap(encoder, x[:, :1], lines)
    assert screenmap.shape == (1, 4, 256, 256)
    assert screenmap.abs().max() <= 1 and screenmap.std() > 0.01
    assert tone.shape == (1, 1, 256, 256) and tone.min() >= -1 and tone.max() <= 1
    assert torch.all(tone[torch.sign(lines) < 0] == -1)  # binarised: every pixel of the line below 0 is black
    assert mean.shape == logvar.shape == (1, 4, 256, 256)


def test_encoder_pads_arbitrary_pages_and_crops_back():
    encoder = ScreenVAEEncoder().eval()
    manga, lines = torch.rand(1, 1, 200, 136) * 2 - 1, torch.ones(1, 1, 200, 136)
    with torch.inference_mode():
        mean, logvar = encode_screenmap(encoder, manga, lines)
    assert mean.shape == logvar.shape == (1, 4, 200, 136)
    assert torch.isfinite(mean).all() and torch.isfinite(logvar).all()


def test_renderer_output_is_deterministic_in_eval_and_seeded(generator, decoder):
    renderer = ScreenStyleRenderer(ScreenStyleModels(generator, decoder), device="cpu")
    page = synthetic_color_page(100, 150, seed=2)  # not a multiple of 256: padded and cropped back
    first, second = renderer.render(page, seed=11), renderer.render(page, seed=11)
    other = renderer.render(page, seed=12)
    assert first.shape == (100, 150) and first.dtype == np.uint8
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)  # the decoder noise is live and comes from the seed
    screenmap = renderer.screenmap(page)
    assert screenmap.shape == (4, 100, 150) and np.abs(screenmap).max() <= 1
    lines = renderer.line_map(page)
    assert np.array_equal(lines, np.asarray(Image.fromarray(page).convert("L")))  # the grey page, not eroded
    assert np.all(first <= lines)  # multiplied twice by the grey line map: never lighter than the grey page


def test_eroded_binarised_path_keeps_the_first_version(generator, decoder):
    """The first version stays available by name: eroded line map, sign-binarised line (ink is black), v1 id."""
    renderer = ScreenStyleRenderer(ScreenStyleModels(generator, decoder), device="cpu", path="eroded-binarised")
    page = synthetic_color_page(100, 150, seed=2)
    tone = renderer.render(page, seed=11)
    lines = renderer.line_map(page)
    grey = np.asarray(Image.fromarray(page).convert("L"))
    assert np.array_equal(lines, erode_lines(grey, 3)) and np.any(lines < grey)
    assert tone.shape == (100, 150) and np.all(tone[lines < 128] == 0)
    assert renderer.id.startswith("screenstyle-v1-") and renderer.id.endswith("-grey-x2")
    assert "colorflow" not in renderer.id


def test_renderer_line_options_and_id(generator, decoder):
    models = ScreenStyleModels(generator, decoder)
    colorflow = ScreenStyleRenderer(models, device="cpu")
    single = ScreenStyleRenderer(models, device="cpu", line_passes=1)
    xdog = ScreenStyleRenderer(models, device="cpu", line_source="xdog")
    page = synthetic_color_page(128, 128, seed=3)
    twice, once = colorflow.render(page, 0), single.render(page, 0)
    assert np.all(twice <= once) and np.any(twice < once)  # the second grey multiplication only darkens
    assert set(np.unique(xdog.line_map(page))) <= {0, 255}
    assert len({colorflow.id, single.id, xdog.id}) == 3
    assert colorflow.id.startswith("screenstyle-v2-") and colorflow.id.endswith("-colorflow-grey-x2")
    with pytest.raises(ValueError, match="line_passes"):
        ScreenStyleRenderer(models, line_passes=3)
    with pytest.raises(ValueError, match="max_pixels"):
        ScreenStyleRenderer(models, device="cpu", max_pixels=100).render(page, 0)


def test_make_renderer_finds_colorflow_weight_folders(generator, decoder, tmp_path):
    assert isinstance(make_renderer(None), HalftoneRenderer)
    assert isinstance(make_renderer("halftone"), HalftoneRenderer)
    (tmp_path / "color2manga").mkdir()
    (tmp_path / "ScreenVAE").mkdir()
    torch.save(to_published_state_dict(generator), tmp_path / "color2manga" / "latest_net_G_RGB2INTSCR.pth")
    torch.save(decoder.state_dict(), tmp_path / "ScreenVAE" / "latest_net_dec.pth")
    renderer = make_renderer(f"screenstyle:{tmp_path}", device="cpu")
    assert isinstance(renderer, ScreenStyleRenderer)
    explicit = make_renderer(
        f"screenstyle:{tmp_path / 'color2manga' / 'latest_net_G_RGB2INTSCR.pth'},"
        f"{tmp_path / 'ScreenVAE' / 'latest_net_dec.pth'}",
        device="cpu",
    )
    assert explicit.id == renderer.id
    legacy = make_renderer(f"screenstyle:{tmp_path}; path=eroded-binarised; passes=1", device="cpu")
    assert (legacy.path, legacy.line_passes) == ("eroded-binarised", 1)
    assert legacy.id == renderer.id.replace("-v2-", "-v1-").replace("-colorflow-grey-x2", "-grey-x1")
    with pytest.raises(ValueError, match="bad option 'colour=red'"):
        make_renderer(f"screenstyle:{tmp_path};colour=red")
    with pytest.raises(FileNotFoundError, match="latest_net_dec.pth not found"):
        make_renderer(f"screenstyle:{tmp_path / 'color2manga'}")
    with pytest.raises(ValueError, match="unknown screentone renderer spec"):
        make_renderer("bayer")
    with pytest.raises(ValueError, match="needs the ScreenStyle weights"):
        make_renderer("screenstyle:")


def test_spectral_norm_marker_covers_exactly_the_3x3_convs(generator):
    for module in generator.modules():
        if isinstance(module, nn.Conv2d):
            assert isinstance(module, SpectralNormFoldedConv2d) == (module.kernel_size == (3, 3))
