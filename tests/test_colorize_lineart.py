"""Colorize in the line-art styles with tiny PixArt weights: our export (XDoG lines) and the released layout (the
line extractor network found in LE/), and the refusals when a style does not match the weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from colorize_fixtures import drawn_page
from PIL import Image

from jobs.colorize import cli as colorize_main

pytestmark = pytest.mark.usefixtures("frugal_threads")
SIZE, SR_SIZE = (64, 96), (96, 144)
COMMON = ["--size", "64x96", "--steps", "2", "--local", "--encoder", "weightfree", "--device", "cpu"]


@pytest.fixture(scope="module")
def lineart(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny PixArt folder, a text cache of its T5, our export (recording both) and a released ColorFlow layout
    (sketch/, shading/ without export.json, LE/erika.pth with random weights)."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel

    from model.colorguider_pixart import PixArtColorGuider
    from model.gsrp_fusion import GSRPFusion
    from model.line_extractor import MangaLineExtractor
    from model.lineart_weights import save_lineart_export
    from model.pixart_lora import add_pixart_lora
    from model.text_cache import build_text_cache, save_text_cache
    from model.tiny_pixart import build_tiny_pixart

    root = tmp_path_factory.mktemp("lineart")
    pixart = build_tiny_pixart(root / "pixart")
    cache = save_text_cache(build_text_cache(pixart, "manga"), root / "manga-t5.safetensors")
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel.from_pretrained(pixart, subfolder="transformer")
    guider = PixArtColorGuider.from_transformer(transformer)
    add_pixart_lora(transformer)
    fusion = GSRPFusion.from_vae_config(AutoencoderKL.from_pretrained(pixart, subfolder="vae").config)
    meta = {"base_model": str(pixart), "text_cache": str(cache), "frame_size": list(SIZE)}
    export = save_lineart_export(root / "run" / "export", guider, transformer, meta, fusion)
    release = root / "release"
    for style in ("sketch", "shading"):
        shutil.copytree(export, release / style)
        (release / style / "export.json").unlink()
    (release / "LE").mkdir()
    torch.save(MangaLineExtractor().state_dict(), release / "LE" / "erika.pth")
    return {"pixart": pixart, "cache": cache, "run": root / "run", "release": release}


@pytest.fixture(scope="module")
def chapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("chapter")
    pages, refs = root / "pages", root / "refs"
    pages.mkdir()
    refs.mkdir()
    drawn_page(7).convert("L").save(pages / "1.png")
    for i in range(3):
        drawn_page(i).save(refs / f"r{i}.png")
    return pages, refs


def _run(args: list[str]) -> tuple[int, dict]:
    code = colorize_main(args)
    output = Path(args[args.index("--output") + 1])
    return code, json.loads((output / "colorize.summary.json").read_text())


def test_the_line_art_styles_give_icp_the_styled_frame_and_gsrp_the_plain_lines(chapter) -> None:
    """By value, with the weight-free extractor: the page fitted at the GSRP size, its XDoG lines as the GSRP guide
    for both styles, and the ICP frame the (shaded) lines resized to W x H."""
    from inference.styles import PageStyler
    from pipelines.core.geometry import RESAMPLE_BICUBIC, fit_image
    from screentone.lines import extract_lines
    from screentone.shading import shade_lines

    page = Image.open(chapter[0] / "1.png")
    grey = np.asarray(fit_image(page.convert("RGB"), *SR_SIZE, resample=RESAMPLE_BICUBIC).convert("L"))
    lines = extract_lines(grey)
    for style, styled in (("sketch", lines), ("shading", shade_lines(lines, grey))):
        frame, guide = PageStyler(style).frames(page, SIZE, SR_SIZE, 0)
        assert np.array_equal(np.asarray(guide), np.repeat(lines[..., None], 3, axis=2))
        expected = fit_image(Image.fromarray(styled).convert("RGB"), *SIZE, resample=RESAMPLE_BICUBIC)
        assert np.array_equal(np.asarray(frame), np.asarray(expected))
    assert (shade_lines(lines, grey) == 125).any()  # the page has mid-grey fills, so shading differs from sketch


def test_sketch_with_our_export_uses_xdog_lines_and_the_releases_sampling(lineart, chapter, tmp_path) -> None:
    """Our training run folder as --icp: base model, text cache and frame size come from its export.json."""
    pages, refs = chapter
    out = tmp_path / "sketch"
    code, summary = _run(
        ["--pages", str(pages), "--refs", str(refs), "--output", str(out), "--style", "sketch", *COMMON,
         "--icp", str(lineart["run"])]
    )  # fmt: skip
    assert code == 0 and summary["pages_done"] == 1, summary["failures"]
    settings = summary["settings"]
    assert settings["family"] == "pixart" and settings["style"] == "sketch"
    assert settings["line_extractor"] == {"name": "xdog"}
    assert settings["sampling"]["guidance_scale"] == 4.5 and settings["sampling"]["prompt"] == "manga"
    assert settings["models"]["text_cache"] and settings["models"]["gsrp"]  # the export's own fusion net
    assert Image.open(out / "1.png").size == SR_SIZE


def test_shading_with_the_released_layout_finds_the_line_extractor_network(lineart, chapter, tmp_path) -> None:
    from inference.styles import PageStyler

    pages, refs = chapter
    out = tmp_path / "shading"
    code, summary = _run(
        ["--pages", str(pages), "--refs", str(refs), "--output", str(out), "--style", "shading", *COMMON,
         "--colorflow-weights", str(lineart["release"]), "--pixart", str(lineart["pixart"]),
         "--text-cache", str(lineart["cache"])]
    )  # fmt: skip
    assert code == 0 and summary["pages_done"] == 1, summary["failures"]
    settings = summary["settings"]
    assert settings["family"] == "pixart" and settings["style"] == "shading"
    assert settings["line_extractor"]["name"] == "erika" and settings["line_extractor"]["weights"]
    assert settings["sampling"]["gsrp_statistics"] == "page"  # a released MultiResNetModel.bin, as the app runs it
    assert Image.open(out / "1.png").size == SR_SIZE
    page = Image.open(pages / "1.png")
    shading_frame, shading_guide = PageStyler("shading").frames(page, SIZE, SR_SIZE, 0)
    sketch_frame, sketch_guide = PageStyler("sketch").frames(page, SIZE, SR_SIZE, 0)
    assert shading_frame.size == SIZE and shading_guide.size == SR_SIZE
    assert np.array_equal(np.asarray(shading_guide), np.asarray(sketch_guide))  # GSRP: the plain line art for both
    assert not np.array_equal(np.asarray(shading_frame), np.asarray(sketch_frame))  # the page's fills are shaded


def test_a_style_that_does_not_match_the_weights_is_refused_in_one_line(lineart, chapter, tmp_path, capsys) -> None:
    pages, refs = chapter
    base = ["--pages", str(pages), "--refs", str(refs), *COMMON]
    assert colorize_main([*base, "--output", str(tmp_path / "a"), "--style", "grey", "--icp", str(lineart["run"])]) == 2
    error = capsys.readouterr().err.strip()
    assert "--style grey with line-art (PixArt) weights" in error and "\n" not in error
    released_sketch = str(lineart["release"] / "sketch")
    assert colorize_main([*base, "--output", str(tmp_path / "b"), "--style", "shading", "--icp", released_sketch]) == 2
    assert "the release's sketch model" in capsys.readouterr().err
    empty = tmp_path / "not-lineart"
    empty.mkdir()
    assert colorize_main([*base, "--output", str(tmp_path / "c"), "--style", "sketch", "--icp", str(empty)]) == 2
    assert "line-art style" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abc")
    code, summary = _run([*base, "--output", str(tmp_path / "d"), "--style", "sketch", "--references-only"])
    assert code == 0 and summary["settings"]["mode"] == "references-only"  # a style alone needs no weights
    assert summary["settings"]["line_extractor"] == {"name": "xdog"} and summary["settings"]["family"] is None
