"""The line-art family's modules on tiny real diffusers/peft models: layouts against the reference listings, the
after_proj alias, the zero-init identity, strict loading, the LoRA spellings, the line extractor and the text cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel

from model.colorguider_pixart import PixArtColorGuider
from model.guided_pixart import GuidedPixArtTransformer, guided_pixart_forward
from model.line_extractor import MangaLineExtractor, extract_lines
from model.lineart_weights import check_lineart_folder, load_lineart_weights, save_lineart_export
from model.pixart_lora import PIXART_LORA_TARGETS, add_pixart_lora, load_pixart_lora, save_pixart_lora
from model.pixart_walk import micro_conditions
from model.text_cache import build_text_cache, load_text_cache, save_text_cache
from model.tiny_pixart import PIXART_XL_TRANSFORMER_CONFIG, build_tiny_pixart, build_tiny_pixart_transformer

pytestmark = pytest.mark.usefixtures("frugal_threads")
REFERENCE = Path(__file__).resolve().parent / "reference"


def _listing(name: str) -> dict:
    return json.loads((REFERENCE / name).read_text())


def _tiny() -> tuple[PixArtTransformer2DModel, PixArtColorGuider]:
    torch.manual_seed(0)
    transformer = build_tiny_pixart_transformer().eval()
    return transformer, PixArtColorGuider.from_transformer(transformer).eval()


def _inputs(batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, 7)
    mask[0, 3:] = 0
    return {
        "sample": torch.randn(batch, 4, 8, 12, generator=generator),
        "cond": torch.randn(batch, 9, 8, 12, generator=generator),
        "timestep": torch.tensor([999, 17][:batch]),
        "text": torch.randn(batch, 7, 32, generator=generator),
        "mask": mask,
        "conditions": micro_conditions(64, 96, batch, "cpu", torch.float32),
    }


def test_the_full_size_guider_has_the_released_layout_and_config() -> None:
    listing = _listing("colorflow_guider_pixart.json")
    with torch.device("meta"):
        guider = PixArtColorGuider.from_config(listing["config"])
        base = PixArtTransformer2DModel(**PIXART_XL_TRANSFORMER_CONFIG)
        built = PixArtColorGuider.from_config({**dict(PIXART_XL_TRANSFORMER_CONFIG), "cond_channels": 9})
    expected = {key: tuple(shape) for key, shape in listing["keys"].items() if not key.startswith("after_proj.")}
    assert {k: tuple(v.shape) for k, v in guider.state_dict().items()} == expected
    assert list(guider.state_dict()) == list(expected)  # the file's order
    assert guider.num_residuals == 14 and sum(p.numel() for p in guider.parameters()) == 251_938_944
    assert built.state_dict().keys() == guider.state_dict().keys() and len(base.transformer_blocks) == 28
    assert PixArtColorGuider().config.cond_channels == 9  # the released value is our default


def test_the_released_state_dict_carries_the_alias_where_the_release_has_it() -> None:
    listing = list(_listing("colorflow_guider_pixart.json")["keys"])
    _, guider = _tiny()
    keys = list(guider.released_state_dict())
    assert keys.index("after_proj.weight") + 2 == keys.index("adapter_linear.0.weight")
    assert listing.index("after_proj.weight") + 2 == listing.index("adapter_linear.0.weight")
    state = guider.released_state_dict()
    assert state["after_proj.weight"] is state["adapter_linear.1.weight"]  # one tensor under two names


def test_the_lora_reaches_the_releases_291_modules() -> None:
    listing = _listing("colorflow_pixart_lora_keys.json")
    assert tuple(listing["target_modules"]) == PIXART_LORA_TARGETS
    with torch.device("meta"):
        transformer = PixArtTransformer2DModel(**PIXART_XL_TRANSFORMER_CONFIG)
        add_pixart_lora(transformer)
    lora = {k: tuple(v.shape) for k, v in transformer.state_dict().items() if ".lora_" in k}
    assert lora == {key: tuple(shape) for key, shape in listing["keys"].items()}
    assert list(lora) == list(listing["keys"])
    assert not any(p.requires_grad for n, p in transformer.named_parameters() if ".lora_" not in n)


def test_a_zero_init_guider_leaves_the_transformer_exactly_unchanged() -> None:
    transformer, guider = _tiny()
    x = _inputs()
    with torch.no_grad():
        stock = transformer(
            x["sample"],
            encoder_hidden_states=x["text"],
            encoder_attention_mask=x["mask"],
            timestep=x["timestep"],
            added_cond_kwargs=x["conditions"],
        ).sample
        guided = GuidedPixArtTransformer(transformer, guider)(
            x["sample"], x["timestep"], x["text"], x["mask"], x["conditions"], guider_cond=x["cond"]
        )
        assert stock.shape == (2, 8, 8, 12) and torch.equal(stock, guided)
        base = transformer.pos_embed.proj.weight
        assert torch.equal(guider.pos_embed.proj.weight[:, :4], base)
        assert not guider.pos_embed.proj.weight[:, 4:].any()
        guider.adapter_linear[0].bias.fill_(0.1)
        changed = GuidedPixArtTransformer(transformer, guider)(
            x["sample"], x["timestep"], x["text"], x["mask"], x["conditions"], guider_cond=x["cond"]
        )
    assert not torch.equal(stock, changed)
    with pytest.raises(ValueError, match=r"cond must be \(2, 9, 8, 12\)"):
        guider(x["sample"], x["timestep"], x["cond"][:, :5], x["conditions"])
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        guider(x["sample"], x["timestep"], x["cond"], None)


def test_gradient_checkpointing_changes_neither_outputs_nor_gradients() -> None:
    transformer, guider = _tiny()
    add_pixart_lora(transformer, rank=2, alpha=2)
    model = GuidedPixArtTransformer(transformer, guider).train()
    x = _inputs()
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.zero_grad()
        out = model(x["sample"], x["timestep"], x["text"], x["mask"], x["conditions"], guider_cond=x["cond"])
        out.square().mean().backward()
        results.append((out.detach(), guider.transformer_blocks[0].attn1.to_q.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


def test_the_guider_loads_strictly_and_checks_the_alias(tmp_path: Path) -> None:
    _, guider = _tiny()
    with torch.no_grad():
        for parameter in guider.parameters():
            parameter.add_(0.01)
    folder = guider.save_released(tmp_path / "sketch")
    loaded = PixArtColorGuider.from_pretrained(folder)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in guider.state_dict().items())
    state = torch.load(folder / "diffusion_pytorch_model.bin", weights_only=True)

    def rewrite(name: str, changed: dict) -> Path:
        target = tmp_path / name
        target.mkdir()
        (target / "config.json").write_text((folder / "config.json").read_text())
        torch.save(changed, target / "diffusion_pytorch_model.bin")
        return target

    without_alias = {k: v for k, v in state.items() if not k.startswith("after_proj.")}
    assert torch.equal(
        PixArtColorGuider.from_pretrained(rewrite("plain", without_alias)).adapter_linear[1].bias,
        guider.adapter_linear[1].bias,
    )
    wrong_alias = {**state, "after_proj.bias": state["after_proj.bias"] + 1}
    with pytest.raises(ValueError, match="'after_proj.bias' differs from 'adapter_linear.1.bias'"):
        PixArtColorGuider.from_pretrained(rewrite("wrong-alias", wrong_alias))
    missing = {k: v for k, v in state.items() if k != "adaln_single.linear.bias"}
    with pytest.raises(ValueError, match="missing key 'adaln_single.linear.bias'"):
        PixArtColorGuider.from_pretrained(rewrite("missing", missing))
    with pytest.raises(ValueError, match="unexpected key 'extra.weight'"):
        PixArtColorGuider.from_pretrained(rewrite("extra", {**state, "extra.weight": torch.zeros(1)}))
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "five").mkdir()
    (tmp_path / "five" / "config.json").write_text(json.dumps({**config, "cond_channels": 5}))
    torch.save(state, tmp_path / "five" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="'pos_embed.proj.weight' has shape"):  # the release's class default
        PixArtColorGuider.from_pretrained(tmp_path / "five")


def test_the_lora_loads_with_and_without_default_and_fails_when_nothing_matches(tmp_path: Path) -> None:
    transformer, _ = _tiny()
    add_pixart_lora(transformer, rank=2, alpha=2)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if ".lora_B." in name:
                parameter.normal_()
    path = save_pixart_lora(transformer, tmp_path / "transformer_lora.bin")
    state = torch.load(path, weights_only=True)
    assert all(".lora_A.default.weight" in k or ".lora_B.default.weight" in k for k in state)
    plain = {k.replace(".default.weight", ".weight"): v for k, v in state.items()}
    torch.save(plain, tmp_path / "plain.bin")
    for file in (path, tmp_path / "plain.bin"):
        fresh, _ = _tiny()
        load_pixart_lora(fresh, file)
        got = {k: v for k, v in fresh.state_dict().items() if ".lora_" in k}
        assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    torch.save({k.replace("lora_", "adapter_"): v for k, v in state.items()}, tmp_path / "foreign.bin")
    with pytest.raises(ValueError, match="unexpected key"):
        load_pixart_lora(_tiny()[0], tmp_path / "foreign.bin")
    torch.save({f"other.{k}": v for k, v in plain.items()}, tmp_path / "nothing.bin")
    with pytest.raises(ValueError, match="no key matches a LoRA module"):
        load_pixart_lora(_tiny()[0], tmp_path / "nothing.bin")
    torch.save({k: v for k, v in plain.items() if not k.startswith("proj_out.")}, tmp_path / "partial.bin")
    with pytest.raises(ValueError, match="missing key 'proj_out.lora_A.weight'"):
        load_pixart_lora(_tiny()[0], tmp_path / "partial.bin")


def test_a_style_folder_round_trips_and_names_what_it_lacks(tmp_path: Path) -> None:
    transformer, guider = _tiny()
    add_pixart_lora(transformer, rank=2, alpha=2)
    folder = save_lineart_export(tmp_path / "sketch", guider, transformer, {"note": "test"})
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "diffusion_pytorch_model.bin", "export.json", "transformer_lora.bin",
    ]  # fmt: skip
    fresh, _ = _tiny()
    loaded, fresh, meta = load_lineart_weights(fresh, folder)
    assert meta["note"] == "test" and meta["lora"]["rank"] == 2
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in guider.state_dict().items())
    (folder / "transformer_lora.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no transformer_lora.bin"):
        check_lineart_folder(folder)


def _release_style_lines(model: MangaLineExtractor, page: np.ndarray) -> np.ndarray:
    """The release's extract_lines, page by page: pad with ones to multiples of 16, clip, crop, truncate."""
    rows, cols = -(-page.shape[0] // 16) * 16, -(-page.shape[1] // 16) * 16
    patch = np.ones((1, 1, rows, cols), dtype=np.float32)
    patch[0, 0, : page.shape[0], : page.shape[1]] = page
    with torch.no_grad():
        out = model(torch.from_numpy(patch)).numpy()[0, 0]
    return np.clip(out, 0, 255)[: page.shape[0], : page.shape[1]].astype(np.uint8)


def test_the_line_extractor_has_the_released_layout_and_batches_like_page_by_page(tmp_path: Path) -> None:
    listing = _listing("colorflow_line_extractor.json")
    torch.manual_seed(0)
    model = MangaLineExtractor()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(s) for k, s in listing["keys"].items()
    }
    assert sum(p.numel() for p in model.parameters()) == 43_100_147
    with torch.no_grad():  # random BatchNorm statistics so that the output spans 0..255
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
                module.running_mean.uniform_(-1, 1)
    model.eval()
    rng = np.random.default_rng(0)
    pages = [rng.integers(0, 256, size, dtype=np.uint8) for size in ((40, 24), (33, 20), (40, 24))]
    lines = extract_lines(model, pages, max_batch=2)
    for page, got in zip(pages, lines, strict=True):
        assert got.shape == page.shape and got.dtype == np.uint8
        assert np.array_equal(got, _release_style_lines(model, page))
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.zeros(1, 1, 40, 24))
    state = model.state_dict()
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, tmp_path / "erika.pth")
    loaded = MangaLineExtractor.from_released(tmp_path)  # old files without the counters load
    assert torch.equal(loaded.state_dict()["conv15.model.2.weight"], state["conv15.model.2.weight"])
    torch.save({k: v for k, v in state.items() if k != "block4.model.3.conv1.model.0.weight"}, tmp_path / "erika.pth")
    with pytest.raises(ValueError, match="missing key 'block4.model.3.conv1.model.0.weight'"):
        MangaLineExtractor.from_released(tmp_path / "erika.pth")


def test_the_text_cache_round_trips_without_loading_the_encoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = build_tiny_pixart(tmp_path / "tiny-pixart")
    cache = build_text_cache(folder, "manga")
    assert cache.prompt_embeds.shape == (1, 120, 32) and int(cache.prompt_attention_mask.sum()) == 6  # 5 + </s>
    assert int(cache.negative_prompt_attention_mask.sum()) == 1 and cache.meta["attention_mask_used"]
    path = save_text_cache(cache, tmp_path / "cache" / "manga-t5")
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert (
        sidecar["max_length"] == 120
        and sidecar["prompt"] == "manga"
        and sidecar["text_encoder_class"] == "T5EncoderModel"
    )
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder was loaded")

    monkeypatch.setattr(transformers.T5EncoderModel, "from_pretrained", refuse)
    loaded = load_text_cache(path)
    assert torch.equal(loaded.prompt_embeds, cache.prompt_embeds)
    assert torch.equal(loaded.negative_prompt_attention_mask, cache.negative_prompt_attention_mask)
    transformer = build_tiny_pixart_transformer().eval()
    embeds, mask = loaded.for_batch(2)
    with torch.no_grad():
        out = guided_pixart_forward(
            transformer, torch.randn(2, 4, 8, 8), 500, embeds, mask, micro_conditions(64, 64, 2, "cpu", torch.float32)
        )
    assert out.shape == (2, 8, 8, 8)
    path.write_bytes(path.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="checksum differs"):
        load_text_cache(path)


def test_the_text_cache_format_serves_sd15_clip_too(tmp_path: Path) -> None:
    from model.tiny import build_tiny_sd15

    cache = build_text_cache(build_tiny_sd15(tmp_path / "sd15"), "manga")
    assert cache.prompt_embeds.shape[:2] == (1, 77) and not cache.meta["attention_mask_used"]
    assert (
        load_text_cache(save_text_cache(cache, tmp_path / "clip.safetensors")).meta["text_encoder_class"]
        == "CLIPTextModel"
    )
