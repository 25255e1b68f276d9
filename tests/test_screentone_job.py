"""The screentone Ray job on a real ingestion of the sample corpus."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image

from jobs.screentone import main as screentone_main
from pipelines.core.geometry import hires_size
from pipelines.core.layout import DataLayout
from pipelines.core.pagestore import encode_page, kept_chapter_ids
from pipelines.core.schemas import SCREENTONE, STATUS_OK
from pipelines.core.storage import read_parquet, read_parquet_parts
from pipelines.ingest.stage import run_ingest
from pipelines.screentone.stage import ScreentoneOptions, render_frame, render_frames, run_screentone
from screentone.color2manga import ColorToScreenMapGenerator
from screentone.loader import ScreenStyleModels
from screentone.render import ScreenStyleRenderer
from screentone.screenvae import ScreenVAEDecoder
from screentone.synthetic import synthetic_color_page

SIZE = (128, 192)


@pytest.fixture(scope="module")
def ingested(tiny_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("screentone") / "data"
    run_ingest(tiny_corpus.root, out, local=True, verbose=False)
    return out


@pytest.mark.usefixtures("ray_local")
def test_renders_every_frame_at_both_sizes_and_resumes(ingested: Path) -> None:
    layout = DataLayout.at(ingested)
    argv = ["--data", str(ingested), "--size", f"{SIZE[0]}x{SIZE[1]}", "--seed", "3"]
    summary = screentone_main(argv)
    assert summary["chapters"] == len(kept_chapter_ids(layout)) >= 1
    assert summary["chapters_rendered"] == summary["chapters"] and summary["frame_errors"] == 0

    folder = layout.root / summary["folder"]
    table = read_parquet_parts(folder, SCREENTONE)
    frames = set(table.column("frame_id").to_pylist())
    assert summary["frames_rendered"] == len(frames) >= 21
    assert table.num_rows == 5 * len(frames)  # tone at two sizes, and the line art: sketch, shading, hires_sketch
    assert set(table.column("status").to_pylist()) == {STATUS_OK}
    hires = hires_size(*SIZE, 1.5)
    expected = {"train": SIZE, "hires": hires, "sketch": SIZE, "shading": SIZE, "hires_sketch": hires}
    rows = [row for row in table.to_pylist() if row["frame_id"] == min(frames)]
    assert sorted(row["variant"] for row in rows) == sorted(expected)
    for row in rows:
        image = Image.open(io.BytesIO(row["image"]))
        assert image.format == "PNG" and image.mode == "L"
        assert image.size == expected[row["variant"]] == (row["width"], row["height"])
        values = set(np.unique(np.asarray(image)).tolist())
        line_art = row["variant"] in ("sketch", "shading", "hires_sketch")
        assert row["renderer"] == ("xdog" if line_art else summary["renderer_id"])
        if row["variant"] in ("train", "hires", "hires_sketch"):
            assert values <= {0, 255}  # made at its size, never resampled: still bitonal
        assert line_art or values != {255}
    shading = next(row for row in rows if row["variant"] == "shading")
    assert 125 in np.asarray(Image.open(io.BytesIO(shading["image"])))  # the flat mid-grey of the shading rules
    assert summary["line_extractor_id"] == "xdog" and summary["sizes"]["hires_sketch"] == list(hires)

    before = {p.name: p.read_bytes() for p in folder.glob("*.parquet")}
    again = screentone_main(argv)
    assert again["chapters_rendered"] == 0 and again["chapters_reused"] == summary["chapters"]
    assert {p.name: p.read_bytes() for p in folder.glob("*.parquet")} == before


def test_another_seed_renders_again_and_the_same_seed_reproduces(ingested: Path) -> None:
    layout = DataLayout.at(ingested)
    chapter = kept_chapter_ids(layout)[0]

    def train_tones(seed: int) -> tuple[dict, list[bytes]]:
        summary = run_screentone(str(ingested), ScreentoneOptions(width=SIZE[0], height=SIZE[1], seed=seed), local=True)
        table = read_parquet(layout.root / summary["folder"] / f"{chapter}.parquet", SCREENTONE)
        return summary, table.filter(pc.field("variant") == "train").column("image").to_pylist()

    first, seed5 = train_tones(5)
    second, seed6 = train_tones(6)
    third, seed5_again = train_tones(5)
    assert second["chapters_rendered"] == second["chapters"]  # the seed is part of what "done" means
    assert seed6 != seed5 and seed5_again == seed5
    assert first["renderer_id"] == second["renderer_id"] == third["renderer_id"]
    options = ScreentoneOptions(width=SIZE[0], height=SIZE[1], seed=5, batch_size=1)
    other_batch = run_screentone(str(ingested), options, local=True)
    assert other_batch["chapters_rendered"] == 0  # the batch size does not change the output: nothing to redo


def test_batched_frames_equal_single_frames_and_a_broken_frame_is_an_error() -> None:
    torch.manual_seed(3)
    models = ScreenStyleModels(ColorToScreenMapGenerator(width=16).eval(), ScreenVAEDecoder(width=16).eval())
    renderer = ScreenStyleRenderer(models, device="cpu")
    images = {f"f{i}": Image.fromarray(synthetic_color_page(100, 70, seed=i)) for i in range(3)}
    pages = {frame_id: encode_page(image, "png") for frame_id, image in images.items()} | {"f9": b"not an image"}
    options = ScreentoneOptions(width=64, height=96, hires_scale=1.25, seed=2, batch_size=3)
    tones, errors = render_frames(pages, options, renderer)
    assert sorted(tones) == ["f0", "f1", "f2"] and list(errors) == ["f9"]
    assert "UnidentifiedImageError" in errors["f9"]
    for frame_id, image in images.items():  # batches of 3 pages per size give what one page at a time gives
        assert tones[frame_id] == render_frame(image, frame_id, options, renderer)
    sizes = {v: Image.open(io.BytesIO(png)).size for v, png in tones["f0"].items()}
    assert sizes == {"train": (64, 96), "hires": hires_size(64, 96, 1.25)}

    # A batch that fails is retried page by page: every frame gets its own error, none is lost silently.
    small = ScreenStyleRenderer(models, device="cpu", max_pixels=64 * 96)  # the hires size (80 x 120) is refused
    tones, errors = render_frames({k: v for k, v in pages.items() if k != "f9"}, options, small)
    assert tones == {} and sorted(errors) == ["f0", "f1", "f2"]
    assert all(e.startswith("hires: ValueError: page of 80 x 120 px exceeds max_pixels") for e in errors.values())


def test_the_line_extractor_network_makes_the_line_art_and_its_contents_name_it(tmp_path: Path) -> None:
    """With erika.pth (random weights, the released layout) the network makes the line art (its batching is tested
    in test_model_pixart); its id is the file's contents, and it is part of what "done" means, so another extractor
    renders again."""
    from model.line_extractor import LineExtractor, MangaLineExtractor
    from pipelines.core.page_styles import line_extractor_id
    from pipelines.screentone.stage import _done_options
    from screentone.render import renderer_for

    torch.manual_seed(0)
    torch.save(MangaLineExtractor().state_dict(), tmp_path / "erika.pth")
    lines_id = line_extractor_id(str(tmp_path / "erika.pth"))
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "erika.pth").write_bytes((tmp_path / "erika.pth").read_bytes())
    assert lines_id.startswith("erika-") and line_extractor_id(str(tmp_path / "copy" / "erika.pth")) == lines_id
    pages = {"f0": encode_page(Image.fromarray(synthetic_color_page(100, 70, seed=0)), "png")}
    options = ScreentoneOptions(width=64, height=96, line_extractor_weights=str(tmp_path / "erika.pth"))
    halftone = renderer_for("halftone")
    made, errors = render_frames(pages, options, halftone, LineExtractor(options.line_extractor_weights, "cpu"))
    xdog, _ = render_frames(pages, options, halftone, LineExtractor())
    assert not errors
    assert {v: Image.open(io.BytesIO(png)).size for v, png in made["f0"].items()} == {
        "train": (64, 96), "hires": (96, 144), "sketch": (64, 96), "shading": (64, 96), "hires_sketch": (96, 144)
    }  # fmt: skip
    assert made["f0"]["train"] == xdog["f0"]["train"] and made["f0"]["hires_sketch"] != xdog["f0"]["hires_sketch"]
    renderer_id = halftone.id
    assert _done_options(options, renderer_id, lines_id) != _done_options(options, renderer_id, "xdog")


def test_requires_ingestion(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run the ingestion job"):
        run_screentone(str(tmp_path), local=True)
