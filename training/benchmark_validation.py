"""Benchmark metrics while training: a fixed set of benchmark pages coloured with the current weights at each
validation step, scored with PSNR, SSIM and CLIP-IS as `jobs.evaluate` scores them.

The pages go through colorize's code path: each chapter's references are embedded once and each page searched
among them (`pipelines.core.page_references`, at the start of the run, then kept), the page styled
(`pipelines.core.page_styles`), its composite coloured by ICP at the training resolution, the centre crop brought
to the GSRP size (by a GSRP export when one is given, else bicubic, as colorize without GSRP) and to the ground
truth's size (bicubic, as colorize writes benchmark pages). The names and seeds of a page are colorize's, so a
page is the page `jobs.colorize --benchmark` gives with the same settings and weights.

Each validation writes ``<output_dir>/benchmark/step-<N>/<chapter_id>/<page_id>.png`` (the layout `jobs.evaluate
--pred` reads) and ``metrics.json`` beside them (per page and the means, written last).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.core.benchmark_format import read_benchmark, read_chapter_index
from pipelines.core.geometry import RANKS_PER_PATCH, CompositeLayout, hires_size
from pipelines.core.image_metrics import ImageEmbedder, clip_image_similarity, psnr, ssim
from pipelines.core.page_references import (
    ReferencePool,
    embed_prepared,
    fitted_reference,
    load_colorize_encoder,
    page_composite,
    patch_preparer,
    query_patches,
    reference_patches,
    resolve_colorize_encoder,
)
from pipelines.core.page_styles import tone_frames
from pipelines.core.pagestore import encode_page
from pipelines.core.sample_inputs import CompositeInputs
from pipelines.core.seeding import derive_seed
from pipelines.core.storage import atomic_write_bytes, atomic_write_json, read_json

BENCHMARK_STYLES = ("grey", "halftone", "screenstyle")  # the tone styles; screenstyle needs its weights
METRICS = ("psnr", "ssim", "clip_is")  # every one: higher is better
BENCHMARK_FOLDER = "benchmark"
METRICS_FILE = "metrics.json"
DEFAULT_SR_SCALE = 1.5  # colorize's, for a GSRP weight whose export records none


@dataclass
class BenchmarkPage:
    """One benchmark page ready to colour: its retrieval and composite are fixed for the whole run."""

    chapter_id: str
    page_id: str
    canvases: CompositeInputs
    guide: Image.Image  # the styled page at the GSRP size
    truth: Image.Image  # the colour ground truth at the benchmark's size
    seed: int  # colorize's noise seed of the page


def gsrp_scale(gsrp: str | None) -> float:
    """The GSRP size / ICP size an export was trained at (what colorize uses), else colorize's default."""
    from model.gsrp_weights import EXPORT_FILE, read_gsrp_export, run_export

    if gsrp is None:
        return DEFAULT_SR_SCALE
    folder = run_export(Path(gsrp))
    if not (folder / EXPORT_FILE).is_file():
        return DEFAULT_SR_SCALE
    return float(read_gsrp_export(folder).get("sr_scale") or DEFAULT_SR_SCALE)


def check_benchmark(root: str, style: str, pages: int, screenstyle_weights: str | None = None) -> None:
    """The benchmark folder, its style and page count, and the ScreenStyle weights of the screenstyle style, checked
    before a model loads: ValueError in one line."""
    if style == "screenstyle":
        from screentone.loader import find_screenstyle_files

        if screenstyle_weights is None:
            raise ValueError(
                "--benchmark_style screenstyle needs the ScreenStyle weights: give --benchmark_screenstyle_weights DIR"
            )
        try:
            find_screenstyle_files(screenstyle_weights)
        except FileNotFoundError as exc:
            raise ValueError(f"--benchmark_screenstyle_weights {screenstyle_weights}: {exc}") from None
    try:
        chapters = read_benchmark(root)["chapters"]
        available = 0
        for chapter in chapters:
            index = read_chapter_index(root, chapter["chapter_id"])
            if style not in index.get("styles", {}):
                raise ValueError(
                    f"--benchmark_style {style!r}: chapter {chapter['chapter_id']} of {root} has the styles "
                    f"{sorted(index.get('styles', {}))}"
                )
            available += len(index["bw"])
    except FileNotFoundError as exc:
        raise ValueError(f"--benchmark {root}: {exc}") from None
    if available < pages:
        raise ValueError(f"--benchmark_pages {pages}: the benchmark {root} has {available} pages")


def prepare_benchmark(
    root: str,
    style: str,
    count: int,
    size: tuple[int, int],
    sr_scale: float,
    encoder_spec: str,
    seed: int,
    device: str = "cpu",
    screenstyle_weights: str | None = None,
) -> list[BenchmarkPage]:
    """The first `count` pages of the benchmark (chapters and pages in index order) with their composites at
    `size`, retrieved as colorize retrieves (each chapter's whole reference pool, top 3 per query patch), styled as
    colorize styles them (screenstyle: ScreenStyle on `screenstyle_weights`, run on `device`)."""
    root_path = Path(root)
    info = resolve_colorize_encoder(encoder_spec)
    prepare = patch_preparer(info)
    encoder = load_colorize_encoder(info, device)
    renderer = _renderer(style, screenstyle_weights, device)
    layout = CompositeLayout(*size)
    sr_size = hires_size(*size, sr_scale)
    pages: list[BenchmarkPage] = []
    for chapter in read_benchmark(root_path)["chapters"]:
        if len(pages) == count:
            break
        chapter_id = chapter["chapter_id"]
        index = read_chapter_index(root_path, chapter_id)
        folder = root_path / chapter_id
        entries = index["bw"][: count - len(pages)]
        style_folder = index["styles"][style]["folder"]
        fitted = {}
        ref_arrays = []
        for ref in index["refs"]:
            name = Path(ref["file"]).relative_to("refs").as_posix()  # colorize's reference name
            image = _open_rgb(folder / ref["file"])
            fitted[name] = fitted_reference(image, *size)
            ref_arrays.extend(prepare(patch) for patch in reference_patches(image, *size))
        styled = []
        for entry in entries:
            name = Path(entry["inputs"][style]).relative_to(style_folder).as_posix()  # colorize's page name
            frame, guide = tone_frames(
                _open_rgb(folder / entry["inputs"][style]),
                size,
                sr_size,
                renderer,
                derive_seed(seed, "style", chapter_id, name),
            )
            styled.append((entry, name, frame, guide))
        queries = [prepare(patch) for *_, frame, _ in styled for patch in query_patches(frame)]
        vectors = embed_prepared(encoder, np.stack(ref_arrays + queries))
        pool = ReferencePool(list(fitted), vectors[: len(ref_arrays)])
        grids = pool.search(vectors[len(ref_arrays) :], RANKS_PER_PATCH)
        for (entry, name, frame, guide), grid in zip(styled, grids, strict=True):
            pages.append(
                BenchmarkPage(
                    chapter_id=chapter_id,
                    page_id=entry["page_id"],
                    canvases=page_composite(layout, entry["page_id"], frame, grid, fitted),
                    guide=guide,
                    truth=_open_rgb(folder / entry["gt"]),
                    seed=derive_seed(seed, "colorize", chapter_id, name),
                )
            )
    return pages


def _renderer(style: str, screenstyle_weights: str | None, device: str) -> Any:
    if style == "screenstyle":
        from screentone.render import renderer_for

        return renderer_for(f"screenstyle:{screenstyle_weights}", device)
    if style == "halftone":
        from screentone.render import HalftoneRenderer

        return HalftoneRenderer()
    return None


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def colour_benchmark(
    pipeline: Any,
    pages: list[BenchmarkPage],
    prompt: str,
    steps: int,
    finish: Callable[[Image.Image, BenchmarkPage], Image.Image],
) -> list[Image.Image]:
    """Every page through ICP (one at a time, seeded as colorize seeds it), its centre crop finished by `finish`
    (GSRP or bicubic to the guide's size) and brought to the ground truth's size."""
    import torch

    outputs = []
    for page in pages:
        canvas = pipeline(
            refs_only=page.canvases.refs_only,
            frame_only=page.canvases.frame_only,
            mask=page.canvases.mask,
            prompt=prompt,
            num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(page.seed),
        ).images[0]
        layout = CompositeLayout(canvas.width // 2, canvas.height // 2)
        final = finish(layout.crop_centre(canvas), page)
        if final.size != page.truth.size:
            final = final.resize(page.truth.size, Image.Resampling.BICUBIC)
        outputs.append(final.convert("RGB"))
    return outputs


def gsrp_finisher(vae: Any, fusion: Any | None, statistics: str) -> Callable[[Image.Image, BenchmarkPage], Image.Image]:
    """colorize's last step: GSRP on the centre crop and the page's guide, or bicubic to the guide's size."""
    import torch

    from model.gsrp_vae import super_resolve

    def finish(lowres: Image.Image, page: BenchmarkPage) -> Image.Image:
        if fusion is None:
            return lowres.resize(page.guide.size, Image.Resampling.BICUBIC)
        generator = torch.Generator("cpu").manual_seed(page.seed + 1)
        with torch.inference_mode():
            return super_resolve(vae, fusion, lowres, page.guide, generator=generator, statistics=statistics)

    return finish


def score_and_save(
    folder: Path, pages: list[BenchmarkPage], outputs: list[Image.Image], embedder: ImageEmbedder, device: str = "cpu"
) -> dict[str, Any]:
    """Each page's PSNR, SSIM (float64, on `device`: cheap on a GPU, seconds per page on a CPU) and CLIP-IS by the
    evaluator's functions, the pages written as PNG (what was scored, losslessly) and ``metrics.json`` last;
    returns that record."""
    rows = []
    for page, output in zip(pages, outputs, strict=True):
        atomic_write_bytes(folder / page.chapter_id / f"{page.page_id}.png", encode_page(output, "png"))
        prediction, truth = np.asarray(output), np.asarray(page.truth)
        rows.append(
            {
                "chapter_id": page.chapter_id,
                "page_id": page.page_id,
                "psnr": psnr(prediction, truth),
                "ssim": ssim(prediction, truth, device=device),
                "clip_is": clip_image_similarity(embedder, output, page.truth),
            }
        )
    record = {"pages": rows, "mean": {m: float(np.mean([row[m] for row in rows])) for m in METRICS}}
    atomic_write_json(folder / METRICS_FILE, record)
    return record


def step_folder(output_dir: Path, step: int) -> Path:
    return output_dir / BENCHMARK_FOLDER / f"step-{step}"


def best_step(output_dir: Path, metric: str, last_step: int) -> dict[str, Any] | None:
    """The validation step with the highest mean `metric` among those written (an earlier run's too, when resumed;
    none after `last_step`, which a run stopped and resumed from an earlier checkpoint may have left); the earliest
    on a tie."""
    means = {}
    for path in (output_dir / BENCHMARK_FOLDER).glob(f"step-*/{METRICS_FILE}"):
        step = int(path.parent.name.removeprefix("step-"))
        if step <= last_step:
            means[step] = read_json(path)["mean"]
    if not means:
        return None
    step = max(sorted(means), key=lambda s: means[s][metric])
    return {"metric": metric, "step": step, "mean": means[step], "steps": {str(s): means[s] for s in sorted(means)}}
