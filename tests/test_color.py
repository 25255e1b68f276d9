"""The colour classifier: tints, fringes and screentone are B&W; small or one-family colour areas are colour."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw, ImageOps

from pipelines.core.decode import DecodeError, decode_for_analysis
from pipelines.core.schemas import COLOR_FEATURE_FIELDS
from pipelines.core.sources import ChapterReader, InputRoot, list_chapters
from pipelines.ingest.color import (
    FEATURE_NAMES,
    ColorThresholds,
    classify,
    classify_features,
    color_score,
    page_features,
    rgb_to_lab,
)

SIZE = (300, 420)


def _line_art() -> Image.Image:
    """A grey manga-like page: panel borders, a figure with grey fills, speech bubble, a gradient sky."""
    page = Image.new("L", SIZE, 255)
    draw = ImageDraw.Draw(page)
    for box in ((15, 15, 285, 200), (15, 215, 140, 405), (155, 215, 285, 405)):
        draw.rectangle(box, outline=0, width=3)
    for y in range(18, 90):
        draw.line((18, y, 282, y), fill=170 + (y - 18))
    draw.ellipse((100, 60, 160, 130), fill=220, outline=0, width=2)
    draw.rectangle((95, 130, 165, 195), fill=110, outline=0, width=2)
    draw.ellipse((190, 240, 270, 300), fill=255, outline=0, width=2)
    for x in range(30, 130, 6):
        draw.line((x, 230, x + 40, 390), fill=0, width=1)
    draw.rectangle((170, 320, 270, 395), fill=60, outline=0, width=2)
    return page


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _through_jpeg(rgb: np.ndarray, subsampling: int = 2, quality: int = 75) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return decode_for_analysis(buf.getvalue(), "page.jpg")[0]


def _screentone(grey: np.ndarray, period: float = 4.0) -> np.ndarray:
    yy, xx = np.mgrid[0 : grey.shape[0], 0 : grey.shape[1]].astype(np.float32)
    spot = (np.cos(2 * np.pi * xx / period) + np.cos(2 * np.pi * yy / period)) / 4 + 0.5
    return np.where(1.0 - spot < 1.0 - grey / 255.0, 0, 255).astype(np.uint8)


def _negatives() -> dict[str, np.ndarray]:
    grey = np.asarray(_line_art())
    g = grey.astype(np.float32)
    paper = np.array([244, 231, 198], np.float32)
    ink = np.array([40, 32, 26], np.float32)
    misregistered = np.stack([0.6 * g + 0.4 * np.roll(g, 1, axis=1), g, 0.6 * g + 0.4 * np.roll(g, -1, axis=0)], -1)
    noise = np.random.default_rng(0).normal(0, 3, misregistered.shape)
    return {
        "grey as RGB": _rgb(_line_art()),
        "yellowed paper": (g[..., None] * paper / 255.0).round().astype(np.uint8),
        "sepia ramp": (ink + (paper - ink) * g[..., None] / 255.0).round().astype(np.uint8),
        "chroma fringes, JPEG 4:2:0": _through_jpeg(np.clip(misregistered + noise, 0, 255).astype(np.uint8)),
        "screentone, JPEG 4:2:0": _through_jpeg(np.repeat(_screentone(g)[..., None], 3, axis=2)),
        "blue-tinted ink": _rgb(ImageOps.colorize(_line_art(), black=(15, 25, 80), white=(255, 255, 255))),
    }


def _positives() -> dict[str, np.ndarray]:
    full = _line_art().convert("RGB")
    draw = ImageDraw.Draw(full)
    draw.rectangle((18, 18, 282, 90), fill=(120, 180, 235))  # sky
    draw.ellipse((100, 60, 160, 130), fill=(250, 215, 190), outline=(0, 0, 0), width=2)  # skin
    draw.rectangle((95, 130, 165, 195), fill=(200, 40, 60), outline=(0, 0, 0), width=2)  # red jacket
    draw.rectangle((170, 320, 270, 395), fill=(60, 150, 70), outline=(0, 0, 0), width=2)  # green
    mostly_white = Image.new("RGB", SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(mostly_white)
    draw.rectangle((15, 15, 285, 405), outline=(0, 0, 0), width=3)
    draw.rectangle((40, 300, 62, 322), fill=(230, 60, 60), outline=(0, 0, 0))  # ~0.4% of the page each
    draw.rectangle((80, 300, 102, 322), fill=(50, 90, 220), outline=(0, 0, 0))
    warm = Image.new("RGB", SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(warm)
    draw.rectangle((15, 15, 285, 405), fill=(250, 190, 120), outline=(0, 0, 0), width=3)  # one hue family,
    draw.rectangle((90, 150, 210, 380), fill=(210, 140, 40), outline=(0, 0, 0), width=2)  # but vivid and large
    return {"full colour": _rgb(full), "mostly white, two small patches": _rgb(mostly_white), "warm, vivid": _rgb(warm)}


def test_feature_names_are_the_schema_columns() -> None:
    assert list(FEATURE_NAMES) == [f.name for f in COLOR_FEATURE_FIELDS]
    assert set(page_features(_rgb(_line_art()))) == set(FEATURE_NAMES)


def test_lab_reference_values() -> None:
    lab = rgb_to_lab(np.array([[255, 255, 255], [255, 0, 0], [0, 0, 255], [0, 0, 0]], np.uint8))
    np.testing.assert_allclose(lab[0], [100.0, 0.0, 0.0], atol=0.1)
    np.testing.assert_allclose(lab[1], [53.24, 80.09, 67.20], atol=0.2)
    np.testing.assert_allclose(lab[2], [32.30, 79.19, -107.86], atol=0.2)
    np.testing.assert_allclose(lab[3], [0.0, 0.0, 0.0], atol=0.1)


@pytest.mark.parametrize("name", list(_negatives()))
def test_black_and_white_pages_are_not_color(name: str) -> None:
    features = page_features(_negatives()[name])
    score, is_color = classify(features)
    assert not is_color, (name, score, features)


def test_yellowed_paper_tint_is_measured_and_removed() -> None:
    features = page_features(_negatives()["yellowed paper"])
    assert features["tint_b"] > 10  # the paper is clearly yellow...
    assert features["chromatic_fraction"] < 1e-4  # ...and after white balance nothing is chromatic


@pytest.mark.parametrize("name", list(_positives()))
def test_color_pages_are_color(name: str) -> None:
    features = page_features(_positives()[name])
    score, is_color = classify(features)
    assert is_color, (name, score, features)


def test_thresholds_recut_from_stored_features() -> None:
    pages = {**_negatives(), **_positives()}
    rows = [page_features(rgb) for rgb in pages.values()]
    table = pa.Table.from_pylist([*rows, dict.fromkeys(FEATURE_NAMES)], schema=pa.schema(COLOR_FEATURE_FIELDS))
    scores, decisions = classify_features(table)
    assert decisions.tolist() == [classify(r)[1] for r in rows] + [False]
    np.testing.assert_allclose(scores[:-1], [color_score(r) for r in rows], rtol=1e-5)
    assert np.isnan(scores[-1])
    strict = ColorThresholds(min_chromatic_fraction=0.05)
    _, strict_decisions = classify_features({name: table.column(name).to_pylist() for name in FEATURE_NAMES}, strict)
    small_patches = list(pages).index("mostly white, two small patches")
    assert decisions[small_patches] and not strict_decisions[small_patches]
    assert strict_decisions.sum() < decisions.sum()


def test_precision_and_recall_on_the_small_corpus(tmp_path) -> None:
    from pipelines.sample_corpus.generate import generate_corpus

    info = generate_corpus(tmp_path / "small", preset="small", seed=3)
    labels = {
        lb["source"]: lb for lb in (json.loads(x) for x in info.labels_path.read_text().splitlines() if x.strip())
    }
    root = InputRoot(info.root)
    truth, predicted, styles = [], [], []
    for chapter in list_chapters(root):
        with ChapterReader(root, chapter) as reader:
            for page in reader.pages:
                try:
                    small, _ = decode_for_analysis(reader.read(page), page.source)
                except DecodeError:
                    assert labels[page.source]["broken"] is not None
                    continue
                truth.append(labels[page.source]["is_color"])
                predicted.append(classify(page_features(small))[1])
                styles.append(labels[page.source]["style"])
    truth_arr, predicted_arr = np.array(truth), np.array(predicted)
    true_positives = int((truth_arr & predicted_arr).sum())
    precision = true_positives / max(1, int(predicted_arr.sum()))
    recall = true_positives / max(1, int(truth_arr.sum()))
    assert {"sepia", "screentone", "chroma_noise", "grey"} <= set(styles)
    assert precision >= 0.98 and recall >= 0.98, (precision, recall)
    hard_negatives = [p for p, s in zip(predicted, styles, strict=True) if s in ("sepia", "screentone", "chroma_noise")]
    assert len(hard_negatives) >= 30 and not any(hard_negatives)
