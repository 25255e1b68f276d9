"""Inputs the colorize tests build themselves: a small generated chapter and a tiny CLIP vision tower."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CORRUPT_PAGE = "5.png"


def drawn_page(seed: int, width: int = 120, height: int = 180) -> Image.Image:
    """A colour 'page': outlined ellipses in seeded colours on paper white (what retrieval and ICP can chew on)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (250, 250, 245))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        left, top = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        box = (left, top, left + int(rng.integers(10, 50)), top + int(rng.integers(10, 50)))
        draw.ellipse(box, fill=color, outline=(0, 0, 0), width=2)
    return image


def write_chapter(root: Path, *, refs: int = 5, corrupt: bool = True) -> tuple[Path, Path]:
    """(pages folder, refs folder): B&W pages 1, 2, 3, 10 (natural order differs from name order), colour refs,
    and with `corrupt` a page 5.png whose bytes are not an image."""
    pages, references = root / "pages", root / "refs"
    pages.mkdir(parents=True)
    references.mkdir(parents=True)
    for i in range(refs):
        drawn_page(i).save(references / f"ref{i + 1}.png")
    for number in (1, 2, 3, 10):
        drawn_page(100 + number).convert("L").save(pages / f"{number}.png")
    if corrupt:
        (pages / CORRUPT_PAGE).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)
    return pages, references


def save_tiny_clip_vision(folder: Path, projection_dim: int = 16) -> Path:
    """A random CLIPVisionModelWithProjection in the release's `image_encoder/` form (save_pretrained, no processor
    config: the release builds the default CLIPImageProcessor)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        patch_size=32,
        projection_dim=projection_dim,
    )
    CLIPVisionModelWithProjection(config).eval().save_pretrained(folder)
    return folder


def save_random_screenstyle(folder: Path) -> Path:
    """Random ScreenStyle weights in the released layout (`color2manga/`, `ScreenVAE/`), published key names."""
    import torch

    from screentone.color2manga import ColorToScreenMapGenerator, to_published_state_dict
    from screentone.loader import DECODER_FILE, GENERATOR_FILE
    from screentone.screenvae import ScreenVAEDecoder

    torch.manual_seed(1)
    (folder / "color2manga").mkdir(parents=True)
    (folder / "ScreenVAE").mkdir(parents=True)
    torch.save(to_published_state_dict(ColorToScreenMapGenerator()), folder / "color2manga" / GENERATOR_FILE)
    torch.save(ScreenVAEDecoder().state_dict(), folder / "ScreenVAE" / DECODER_FILE)
    return folder
