"""Encoders: a tiny open_clip model loaded through the real-weights path, and the weight-free encoder."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipelines.core.encoders import (
    DEFAULT_ENCODER,
    WEIGHT_FREE,
    WeightFreeEncoder,
    grey_version,
    load_encoder,
    resolve_encoder,
)
from pipelines.core.storage import stable_hash
from screentone.augment import to_grey

# A ViT small enough to build in a test: 64-px input, 2 layers, 32-d embedding (and the text tower open_clip needs).
TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}


def make_tiny_open_clip(folder: Path, seed: int = 0, name: str = "tiny-vit-test") -> tuple[Path, Path]:
    """Write a tiny ViT config and a checkpoint of a seeded random model built from it: (config, checkpoint)."""
    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{name}.json"
    config.write_text(json.dumps(TINY_VIT))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    checkpoint = folder / f"{name}-seed{seed}.pt"
    torch.save(model.state_dict(), checkpoint)
    return config, checkpoint


def drawn_page(seed: int, size: tuple[int, int] = (160, 240)) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, size[0] - 20)), int(rng.integers(0, size[1] - 20))
        x1, y1 = x0 + int(rng.integers(10, 60)), y0 + int(rng.integers(10, 80))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color, outline=(0, 0, 0))
    return image


def test_tiny_open_clip_loads_through_the_checkpoint_path(tmp_path: Path) -> None:
    import open_clip
    import torch

    config, checkpoint = make_tiny_open_clip(tmp_path)
    info = resolve_encoder(f"open_clip:{config}:{checkpoint}")
    assert info.kind == "open_clip" and info.dim == 32
    assert info.fingerprint["weights"].startswith("sha256:") and len(info.fingerprint["weights"]) == 7 + 64
    assert info.fingerprint["preprocessing"]["size"] == [64, 64]
    assert info.encoder_id.startswith("open_clip-tiny-vit-test-ckpt-")

    page = drawn_page(1)
    prepared = info.preparer()(page)
    assert prepared.shape == (64, 64, 3) and prepared.dtype == np.uint8
    vectors = load_encoder(info).embed(np.stack([prepared, info.preparer()(drawn_page(2))]))
    assert vectors.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    # the same numbers as open_clip's own inference path on the in-memory model
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-vit-test", pretrained=str(checkpoint))
    with torch.no_grad():
        expected = model.encode_image(preprocess(page)[None], normalize=True).numpy()
    np.testing.assert_allclose(vectors[0], expected[0], atol=1e-5)


def test_another_checkpoint_gets_another_id(tmp_path: Path) -> None:
    config, first = make_tiny_open_clip(tmp_path, seed=0)
    _, second = make_tiny_open_clip(tmp_path, seed=1)
    a, b = resolve_encoder(f"open_clip:{config}:{first}"), resolve_encoder(f"open_clip:{config}:{second}")
    assert a.encoder_id != b.encoder_id
    assert resolve_encoder(f"open_clip:{config}:{first}").encoder_id == a.encoder_id  # stable


def test_default_encoder_is_fingerprinted_without_downloading() -> None:
    info = resolve_encoder(DEFAULT_ENCODER)
    assert info.dim == 1024
    assert info.fingerprint["model"] == "ViT-H-14" and info.fingerprint["weights"] == "tag:laion2b_s32b_b79k"
    assert info.fingerprint["preprocessing"]["size"] == [224, 224]
    assert info.fingerprint["preprocessing"]["resize_mode"] == "shortest"
    assert info.preparer()(drawn_page(3, (300, 500))).shape == (224, 224, 3)


def test_bad_specs_fail_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown encoder spec"):
        resolve_encoder("clip-please")
    with pytest.raises(ValueError, match="without weights"):
        resolve_encoder("open_clip:ViT-B-32")
    with pytest.raises(FileNotFoundError, match="known: .*openai"):
        resolve_encoder("open_clip:ViT-B-32:no_such_tag")
    with pytest.raises(ValueError, match="has no model"):
        resolve_encoder("open_clip:ViT-Nope-1:openai")
    shadow = tmp_path / "ViT-B-32.json"
    shadow.write_text(json.dumps(TINY_VIT))
    checkpoint = tmp_path / "w.pt"
    checkpoint.write_bytes(b"x")
    with pytest.raises(ValueError, match="rename the file"):
        resolve_encoder(f"open_clip:{shadow}:{checkpoint}")


def test_weight_free_encoder_is_deterministic_and_normalised() -> None:
    info = resolve_encoder(WEIGHT_FREE)
    assert info.dim == WeightFreeEncoder.dim
    prepare = info.preparer()
    batch = np.stack([prepare(drawn_page(s)) for s in range(5)])
    first = load_encoder(info).embed(batch)
    second = load_encoder(resolve_encoder(WEIGHT_FREE)).embed(batch[::-1].copy())[::-1]
    assert first.shape == (5, info.dim) and first.dtype == np.float32
    np.testing.assert_array_equal(first, second)  # batch order and instances do not matter
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-6)
    assert np.abs(first @ first.T - np.eye(5)).max() < 0.99  # different pages, different vectors
    assert resolve_encoder(WEIGHT_FREE).encoder_id == info.encoder_id


def test_weight_free_encoder_matches_grey_queries_to_color_references() -> None:
    info = resolve_encoder(WEIGHT_FREE)
    encoder, prepare = load_encoder(info), info.preparer()
    color = drawn_page(7)
    grey = grey_version(color)
    np.testing.assert_array_equal(prepare(color), prepare(grey))  # colour is ignored by design
    buf = io.BytesIO()
    color.save(buf, format="JPEG", quality=60)
    resaved = Image.open(io.BytesIO(buf.getvalue()))
    others = [drawn_page(s) for s in (8, 9, 10)]
    vectors = encoder.embed(np.stack([prepare(im) for im in [grey, resaved, *others]]))
    scores = vectors[1:] @ vectors[0]
    assert scores[0] > 0.95 and scores[0] > scores[1:].max() + 0.05


def test_patch_geometry_joins_the_id() -> None:
    info = resolve_encoder(WEIGHT_FREE)
    a = info.with_patch_geometry({"page_size": "512x800"})
    b = info.with_patch_geometry({"page_size": "640x640"})
    assert a.encoder_id != b.encoder_id != info.encoder_id
    assert "-512x800-" in a.encoder_id and a.fingerprint["patches"] == {"page_size": "512x800"}
    # the id's hash is the project's shared canonical-JSON hash of the whole fingerprint
    assert a.encoder_id == f"weightfree-512x800-{stable_hash(a.fingerprint, 10)}"


def test_grey_version_is_the_project_luma_and_keeps_grey_images() -> None:
    color = drawn_page(11)
    grey = grey_version(color)
    assert grey.mode == "L" and grey.size == color.size
    np.testing.assert_array_equal(np.asarray(grey), to_grey(np.asarray(color)))
    assert grey_version(grey) is grey
    palette = color.convert("P")
    np.testing.assert_array_equal(np.asarray(grey_version(palette)), to_grey(np.asarray(palette.convert("RGB"))))
