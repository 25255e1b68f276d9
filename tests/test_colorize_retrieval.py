"""Colorize without models: reading sources, retrieval, the composite (against the trainer's), contact sheets."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from colorize_fixtures import CORRUPT_PAGE, save_tiny_clip_vision, write_chapter
from PIL import Image

from inference.plan import (
    ChapterTask,
    ColorizeOptions,
    WorkerConfig,
    plan_chapter,
)
from inference.sources import open_source, output_stems
from inference.styles import PageStyler
from inference.worker import ColorizeWorker
from jobs.colorize import cli as colorize_main
from pipelines.core.geometry import CompositeLayout
from pipelines.core.page_references import (
    CLIP_VISION,
    load_colorize_encoder,
    patch_preparer,
    resolve_colorize_encoder,
)
from pipelines.core.sample_inputs import DecodedSample, build_training_inputs
from pipelines.core.samples import ChapterPages, build_ring

SIZE = (64, 96)


@pytest.fixture(scope="module")
def chapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_chapter(tmp_path_factory.mktemp("chapter"))


def _run(args: list[str]) -> tuple[int, dict]:
    code = colorize_main(args)
    output = Path(args[args.index("--output") + 1])
    return code, json.loads((output / "colorize.summary.json").read_text())


def test_references_only_reads_in_natural_order_and_reports_a_corrupt_page(chapter, tmp_path: Path) -> None:
    pages, refs = chapter
    out = tmp_path / "out"
    args = ["--pages", str(pages), "--refs", str(refs), "--output", str(out), "--references-only"]
    code, summary = _run([*args, "--size", "64x96", "--encoder", "weightfree", "--local"])
    assert code == 1  # a page failed: the job says so
    assert [row["page"] for row in summary["page_rows"]] == ["1.png", "2.png", "3.png", "5.png", "10.png"]
    assert summary["pages_done"] == 4 and summary["pages_failed"] == 1
    failure = summary["failures"][0]
    assert failure["page"] == CORRUPT_PAGE and "not an image" in failure["error"]
    for stem in ("1", "2", "3", "10"):
        record = json.loads((out / f"{stem}.json").read_text())
        assert len(record["retrievals"]) == 12
        assert {row["ref_page_id"] for row in record["retrievals"]} <= {f"ref{i}.png" for i in range(1, 6)}
        assert Image.open(out / "contact_sheets" / f"{stem}.jpg").height > 400
    # the same run again: every finished page is skipped, the corrupt one is reported again
    code, again = _run([*args, "--size", "64x96", "--encoder", "weightfree", "--local"])
    assert again["pages_skipped"] == 4 and again["pages_done"] == 0 and again["pages_failed"] == 1
    # the retrieval job's cap: at most 3 of a page's 12 patches from one reference page; a new setting redoes
    code, capped = _run([*args, "--size", "64x96", "--encoder", "weightfree", "--local", "--max-per-page", "3"])
    assert capped["pages_done"] == 4
    for stem in ("1", "2", "3", "10"):
        used = [row["ref_page_id"] for row in json.loads((out / f"{stem}.json").read_text())["retrievals"]]
        assert max(used.count(ref) for ref in used) <= 3


def test_a_bad_reference_is_left_out_of_the_pool(chapter, tmp_path: Path) -> None:
    pages, refs = chapter
    pool = tmp_path / "refs"
    shutil.copytree(refs, pool)
    (pool / "ref9.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 40)
    code, summary = _run(["--pages", str(pages), "--refs", str(pool), "--output", str(tmp_path / "out"),
                          "--references-only", "--size", "64x96", "--encoder", "weightfree", "--local"])  # fmt: skip
    assert summary["references_used"] == 5 and summary["references_failed"] == 1
    assert summary["reference_failures"][0]["reference"] == "ref9.jpg"
    assert summary["pages_done"] == 4  # the pages are coloured from the other references


def test_archive_sources_and_output_names(chapter, tmp_path: Path) -> None:
    pages, refs = chapter
    archive = tmp_path / "pages.cbz"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("10.png", "2.png", "1.png"):
            zf.write(pages / name, f"chapter/{name}")
        zf.writestr("../escape.png", b"x")
    source = open_source(archive)
    with source.open() as reader:
        listed = [(p.name, p.refused) for p in source.pages(reader)]
    assert [name for name, _ in listed] == ["../escape.png", "chapter/1.png", "chapter/2.png", "chapter/10.png"]
    assert "escapes" in listed[0][1]
    code, summary = _run(["--pages", str(archive), "--refs", str(refs), "--output", str(tmp_path / "cbz"),
                          "--references-only", "--size", "64x96", "--encoder", "weightfree", "--local"])  # fmt: skip
    assert code == 1 and [row["status"] for row in summary["page_rows"]] == ["error", "ok", "ok", "ok"]
    assert "escapes" in summary["failures"][0]["error"]
    assert (tmp_path / "cbz" / "chapter" / "10.json").is_file()  # named after the member, folders kept
    assert output_stems(["a/1.jpg", "a/1.png", "b.png"]) == {"a/1.jpg": "a/1_jpg", "a/1.png": "a/1_png", "b.png": "b"}
    usage = ["--refs", str(refs), "--output", str(tmp_path / "o"), "--references-only", "--local"]
    assert colorize_main(["--pages", str(tmp_path / "missing"), *usage]) == 2  # one line on stderr, exit 2
    assert colorize_main(["--pages", str(pages), *usage, "--size", "65x96"]) == 2  # not multiples of 16


def test_composite_equals_the_trainers(chapter, tmp_path: Path) -> None:
    """Ring, C_bw, mask and the guider's canvases built by colorize equal the trainer's for the same page and
    retrievals: `samples.build_ring` from the reference bytes, then `build_training_inputs` (before any JPEG)."""
    pages, refs = chapter
    settings = ColorizeOptions(width=SIZE[0], height=SIZE[1], encoder="weightfree")
    info = resolve_colorize_encoder("weightfree")
    config = WorkerConfig(str(tmp_path), settings, info, settings.record(info), device="cpu")
    worker = ColorizeWorker(config)
    task = ChapterTask("", open_source(pages), open_source(refs), "")
    plan = plan_chapter(task, config, "settings", worker.embed, worker.styler)
    job = next(job for job in plan.jobs if job.name == "2.png")
    mine = worker.page_inputs(job)

    layout = CompositeLayout(*SIZE)
    encoded = {path.name: path.read_bytes() for path in refs.iterdir()}
    ring = build_ring(ChapterPages(encoded), job.rows, layout)
    grey = mine["bw"].convert("L")
    blank = Image.new("RGB", (96, 144))
    sample = DecodedSample(job.page_id, blank.resize(SIZE), grey, grey, ring, blank, blank.convert("L"),
                           blank.convert("L"), {})  # fmt: skip
    trainer = build_training_inputs(sample, "grey")
    for name in ("c_bw", "refs_only", "frame_only"):
        assert np.array_equal(np.asarray(getattr(mine["canvases"], name)), np.asarray(getattr(trainer, name))), name
    assert np.array_equal(mine["canvases"].mask, trainer.mask)
    assert mine["canvases"].c_bw.size == (2 * SIZE[0], 2 * SIZE[1])


def test_clip_vision_encoder_matches_the_release_preprocessing(chapter, tmp_path: Path) -> None:
    """`clip_vision:<folder>` embeds like the release: default CLIPImageProcessor, then projected image_embeds."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    folder = save_tiny_clip_vision(tmp_path / "image_encoder")
    info = resolve_colorize_encoder(f"{CLIP_VISION}:{folder}")
    assert info.dim == 16 and info.kind == CLIP_VISION
    patches = [Image.open(p).convert("RGB") for p in sorted(chapter[1].iterdir())[:3]]
    prepared = np.stack([patch_preparer(info)(p) for p in patches])
    ours = load_colorize_encoder(info).embed(prepared)
    model = CLIPVisionModelWithProjection.from_pretrained(folder).eval()
    with torch.no_grad():
        pixels = CLIPImageProcessor()(images=patches, return_tensors="pt").pixel_values
        theirs = torch.nn.functional.normalize(model(pixel_values=pixels).image_embeds, dim=-1).numpy()
    assert np.allclose(ours, theirs, atol=2e-2)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-4)


def _release_fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """The released app's `process_image`, written out with PIL alone (not `pipelines.core.geometry`)."""
    ratio, target = image.width / image.height, width / height
    if abs(ratio - target) / target < 0.15:
        return image.resize((width, height), Image.BICUBIC).convert("RGB")
    if ratio > target:
        new_width = int(image.height * target)
        left = int((image.width - new_width) / 2)
        box = (left, 0, left + new_width, image.height)
    else:
        new_height = int(image.width / target)
        top = int((image.height - new_height) / 2)
        box = (0, top, image.width, top + new_height)
    return image.crop(box).resize((width, height), Image.BICUBIC).convert("RGB")


def _release_patches(image: Image.Image, width: int, height: int) -> list[Image.Image]:
    """`process_image_ref_varres`: the whole image first, then the 3/4 crops row by row (stride 1/4)."""
    crop_w, crop_h = width // 4 * 3, height // 4 * 3
    crops = [image.resize((width, height))]
    for top in range(0, height - crop_h + 1, height // 4):
        for left in range(0, width - crop_w + 1, width // 4):
            crops.append(image.crop((left, top, left + crop_w, top + crop_h)))
    return crops


def test_composite_and_guide_follow_the_release_path(chapter, tmp_path: Path) -> None:
    """The page fitted at 1.5x, greyed, resized to W x H; references fitted and their patches resized into the
    ring bicubic: equal, pixel for pixel, to the app's code path written out with PIL (grey style)."""
    pages, refs = chapter
    width, height = SIZE
    settings = ColorizeOptions(width=width, height=height, encoder="weightfree")
    info = resolve_colorize_encoder("weightfree")
    worker = ColorizeWorker(WorkerConfig(str(tmp_path), settings, info, settings.record(info), device="cpu"))
    task = ChapterTask("", open_source(pages), open_source(refs), "")
    job = next(j for j in plan_chapter(task, WorkerConfig(str(tmp_path), settings, info, {}), "s", worker.embed,
                                       worker.styler).jobs if j.name == "3.png")  # fmt: skip
    mine = worker.page_inputs(job)

    hires = _release_fit(Image.open(pages / "3.png"), int(width * 1.5), int(height * 1.5))
    guide = hires.convert("L").convert("RGB")
    frame = _release_fit(guide, width, height)
    canvas = Image.new("RGB", (2 * width, 2 * height), "white")
    canvas.paste(frame.resize((width, height)), (width // 2, height // 2))
    cells = {0: [(1, 0), (0, 1), (0, 0)], 1: [(1, 3), (0, 2), (0, 3)], 2: [(2, 0), (3, 1), (3, 0)],
             3: [(2, 3), (3, 2), (3, 3)]}  # fmt: skip
    for row in job.rows:
        patches = _release_patches(_release_fit(Image.open(refs / row["ref_page_id"]), width, height), width, height)
        patch = patches[(row["ref_patch"] + 1) % 5]  # ours: 4 crops then the whole page; the app's: whole first
        y, x = cells[row["query_patch"]][row["rank"]]
        canvas.paste(patch.resize((width // 2 - 2, height // 2 - 2)), (width // 2 * x + 1, height // 2 * y + 1))
    assert np.array_equal(np.asarray(mine["hr_bw"]), np.asarray(guide))
    assert np.array_equal(np.asarray(mine["canvases"].c_bw), np.asarray(canvas))
    # a page far off the target aspect is centre-cropped with the app's truncated box
    wide = Image.open(refs / "ref1.png").resize((173, 97))
    assert np.array_equal(np.asarray(PageStyler("grey").frames(wide, SIZE, (96, 144), 0)[1]),
                          np.asarray(_release_fit(wide, 96, 144).convert("L").convert("RGB")))  # fmt: skip


def test_many_chapters_a_tree_or_several_sources_one_output_folder_each(chapter, tmp_path: Path) -> None:
    pages, refs = chapter
    good = ["1.png", "2.png", "3.png"]
    tree_pages, tree_refs = tmp_path / "pages", tmp_path / "refs"
    for root, files in ((tree_pages, [pages / n for n in good]), (tree_refs, sorted(refs.iterdir()))):
        (root / "series_a" / "ch1").mkdir(parents=True)  # one chapter a folder, the other an archive
        with zipfile.ZipFile(root / "series_a" / "ch2.cbz", "w") as zf:
            for path in files:
                shutil.copy(path, root / "series_a" / "ch1" / path.name)
                zf.write(path, path.name)
    common = ["--references-only", "--size", "64x96", "--encoder", "weightfree", "--local"]
    out = tmp_path / "tree_out"
    code, summary = _run(["--pages", str(tree_pages), "--refs", str(tree_refs), "--output", str(out), *common])
    assert code == 0 and summary["pages_done"] == 6
    for chapter_dir in ("series_a/ch1", "series_a/ch2"):
        assert sorted(p.name for p in (out / chapter_dir).glob("*.json")) == ["1.json", "2.json", "3.json"]
    again = _run(["--pages", str(tree_pages), "--refs", str(tree_refs), "--output", str(out), *common])[1]
    assert again["pages_done"] == 0 and again["pages_skipped"] == 6  # resumable per page, chapter by chapter

    several = tmp_path / "several_out"
    archive = tree_pages / "series_a" / "ch2.cbz"
    code, summary = _run(["--pages", str(tree_pages / "series_a" / "ch1"), str(archive), "--refs", str(refs),
                          str(refs), "--output", str(several), *common])  # fmt: skip
    assert code == 0 and (several / "ch1" / "1.json").is_file() and (several / "ch2" / "3.json").is_file()
    (tree_refs / "series_a" / "ch2.cbz").unlink()
    assert colorize_main(["--pages", str(tree_pages), "--refs", str(tree_refs), "--output", str(tmp_path / "x"),
                          *common]) == 2  # fmt: skip
    assert colorize_main(["--pages", str(pages), str(archive), "--refs", str(refs), "--output",
                          str(tmp_path / "y"), *common]) == 2  # fmt: skip
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
