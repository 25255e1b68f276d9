"""The plan of a colorize run: the settings that decide the outputs, the chapters to colour, and per chapter the
pages still to do (read, fingerprinted, skipped when done, embedded and searched), each a `PageJob` for a worker."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inference.models import ModelPaths, SamplingOptions, files_token, read_export
from inference.pixart_models import LineArtPaths
from inference.sources import (
    ColorizeInputError,
    PageSource,
    decode_image,
    is_chapter_tree,
    open_source,
    output_stems,
    read_source,
)
from inference.styles import LINE_ART_STYLES, PageStyler
from pipelines.core.encoders import EncoderInfo
from pipelines.core.errors import PreconditionError
from pipelines.core.geometry import RANKS_PER_PATCH, RESAMPLE_BICUBIC, CompositeLayout, hires_size
from pipelines.core.page_references import ReferencePool, patch_preparer, query_patches, reference_patches
from pipelines.core.schemas import STATUS_ERROR
from pipelines.core.seeding import derive_seed
from pipelines.core.sources import list_chapters
from pipelines.core.storage import read_json, stable_hash
from screentone.lines import XDOG

COLORIZE_VERSION = 2  # bump when a page's pixels would change for the same settings: old outputs are then redone
SIZE_PRESETS = ((512, 800), (640, 640), (800, 512))
SHEETS_FOLDER = "contact_sheets"
STATUS_SKIPPED = "skipped"


# ---- settings ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColorizeOptions:
    """What decides the outputs. `models=None` retrieves and draws contact sheets only (no colouring)."""

    width: int = 512
    height: int = 800
    sr_scale: float = 1.5
    seed: int = 0
    encoder: str = "weightfree"
    max_per_page: int | None = None
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    models: ModelPaths | LineArtPaths | None = None
    style: str = "grey"  # how a page becomes the models' inputs (`inference.styles`)
    screenstyle_weights: str | None = None  # the ScreenStyle folder of style "screenstyle"
    line_extractor_weights: str | None = None  # erika.pth of styles sketch/shading (None: XDoG)

    def __post_init__(self) -> None:
        try:
            CompositeLayout(self.width, self.height)
            hires_size(self.width, self.height, self.sr_scale)
        except ValueError as exc:
            raise ColorizeInputError(f"--size {self.width}x{self.height} / --sr-scale {self.sr_scale}: {exc}") from None

    @property
    def layout(self) -> CompositeLayout:
        return CompositeLayout(self.width, self.height)

    @property
    def sr_size(self) -> tuple[int, int]:
        return hires_size(self.width, self.height, self.sr_scale)

    def record(self, info: EncoderInfo) -> dict[str, Any]:
        """The settings as fingerprinted and reported (paths of models become content tokens)."""
        return {
            "colorize_version": COLORIZE_VERSION,
            "size": [self.width, self.height],
            "sr_scale": self.sr_scale,
            "sr_size": list(self.sr_size),
            "seed": self.seed,
            "encoder": {"spec": info.spec, "fingerprint": info.fingerprint},
            "k_per_patch": RANKS_PER_PATCH,
            "style": self.style,
            "screenstyle_weights": files_token(self.screenstyle_weights) if self.style == "screenstyle" else None,
            "line_extractor": self.line_extractor_record(),
            "resample": RESAMPLE_BICUBIC,
            "max_per_page": self.max_per_page,
            "sampling": asdict(self.sampling) if self.models else None,
            "models": self.models.identity() if self.models else None,
            "mode": "colour" if self.models else "references-only",
            "family": self.models.family if self.models else None,
        }

    def line_extractor_record(self) -> dict[str, Any] | None:
        """Which extractor made the line art (styles sketch and shading): the network's weights token, or XDoG."""
        if self.style not in LINE_ART_STYLES:
            return None
        if self.line_extractor_weights is None:
            return {"name": XDOG}
        return {"name": Path(self.line_extractor_weights).stem, "weights": files_token(self.line_extractor_weights)}


def export_defaults(icp: str | None, gsrp: str | None) -> dict[str, Any]:
    """Defaults the exports record: the ICP trainer's prompt and frame size, the GSRP trainer's scale (and, when an
    export names them, inference steps, guidance scale and negative prompt)."""
    icp_meta, gsrp_meta = read_export(icp), read_export(gsrp)
    out: dict[str, Any] = {}
    for key, name in (
        ("prompt", "prompt"),
        ("negative_prompt", "negative_prompt"),
        ("num_inference_steps", "steps"),
        ("guidance_scale", "guidance_scale"),
    ):
        if icp_meta.get(key) is not None:
            out[name] = icp_meta[key]
    size = icp_meta.get("frame_size") or icp_meta.get("size")
    if size:
        out["size"] = (int(size[0]), int(size[1]))
    scale = gsrp_meta.get("sr_scale")
    if scale:
        out["sr_scale"] = float(scale)
    return out


def default_encoder(colorflow_weights: str | None) -> str:
    """The release's own retrieval tower when its weights are used, else the paper's open_clip ViT-H-14."""
    from inference.models import RELEASED_ENCODER_FOLDER
    from pipelines.core.encoders import DEFAULT_ENCODER
    from pipelines.core.page_references import CLIP_VISION

    if colorflow_weights and (Path(colorflow_weights) / RELEASED_ENCODER_FOLDER).is_dir():
        return f"{CLIP_VISION}:{Path(colorflow_weights) / RELEASED_ENCODER_FOLDER}"
    return DEFAULT_ENCODER


def default_dtype(device: str | None, local: bool) -> str:
    """float16 where the workers get a GPU (as the release runs), float32 on CPUs."""
    if device is not None:
        return "float16" if device.startswith("cuda") else "float32"
    if local:
        import torch

        return "float16" if torch.cuda.is_available() else "float32"
    from pipelines.runtime.ray import cluster_has_gpus, init_ray

    init_ray()
    return "float16" if cluster_has_gpus() else "float32"


# ---- what to colour ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChapterTask:
    """One chapter to colour: its pages, its reference pool and where its outputs go (relative to OUT)."""

    key: str  # "" for one PAGES/REFS chapter; "<series>/<chapter>" or the source's stem for several; a benchmark's id
    pages: PageSource
    refs: PageSource
    out_dir: str  # "" for one chapter, else the chapter's folder under OUT (its key)
    out_size: tuple[int, int] | None = None  # a benchmark's page size (outputs must match its ground truth)


def chapter_tasks_for_sources(pages: Sequence[str], refs: Sequence[str]) -> list[ChapterTask]:
    """What `--pages`/`--refs` name: one chapter (a folder of pages or an archive, outputs at the top of OUT); a
    `<series>/<chapter>` tree whose references are a tree of the same chapters (outputs in OUT/<series>/<chapter>);
    or several chapters given one by one, each paired with the references given in the same place (outputs in
    OUT/<name of the pages' folder or archive>)."""
    pages, refs = list(pages), list(refs)
    if len(pages) != len(refs):
        raise ColorizeInputError(
            f"--pages names {len(pages)} chapters and --refs {len(refs)}: give one reference folder or archive per "
            "chapter, in the same order (or one tree for each)"
        )
    if len(pages) == 1 and not is_chapter_tree(pages[0]):
        return [ChapterTask("", open_source(pages[0]), open_source(refs[0]), "")]
    if len(pages) == 1:
        return _tree_tasks(pages[0], refs[0])
    tasks = []
    for page_path, ref_path in zip(pages, refs, strict=True):
        source = open_source(page_path)
        tasks.append(ChapterTask(source.entry.chapter, source, open_source(ref_path), source.entry.chapter))
    seen: dict[str, str] = {}
    for task, page_path in zip(tasks, pages, strict=True):
        if task.key in seen:
            raise ColorizeInputError(
                f"--pages {seen[task.key]} and {page_path} would both write OUT/{task.key}: rename one of them"
            )
        seen[task.key] = page_path
    return tasks


def _tree_tasks(pages_root: str, refs_root: str) -> list[ChapterTask]:
    """One task per chapter of a `<series>/<chapter>` tree, its references the same chapter of the refs tree."""
    pages = {(c.series, c.chapter): c for c in list_chapters(pages_root) if not c.refused}
    if not pages:
        raise ColorizeInputError(f"--pages {pages_root}: no <series>/<chapter> folders or archives in it")
    if not is_chapter_tree(refs_root):
        raise ColorizeInputError(
            f"--refs {refs_root}: --pages is a <series>/<chapter> tree, so --refs must be one too (the same chapters)"
        )
    refs = {(c.series, c.chapter): c for c in list_chapters(refs_root) if not c.refused}
    missing = [f"{series}/{chapter}" for series, chapter in sorted(pages) if (series, chapter) not in refs]
    if missing:
        raise ColorizeInputError(
            f"--refs {refs_root}: no references for {len(missing)} chapter(s) of --pages, e.g. {missing[0]}"
        )
    return [
        ChapterTask(
            f"{series}/{chapter}",
            PageSource(pages_root, entry),
            PageSource(refs_root, refs[(series, chapter)]),
            f"{series}/{chapter}",
        )
        for (series, chapter), entry in sorted(pages.items())
    ]


def chapter_tasks_for_benchmark(root: str | Path, style: str) -> tuple[list[ChapterTask], dict[str, Any]]:
    """Every chapter of a benchmark folder, its B&W pages in `style`, coloured from its own references."""
    from pipelines.core.benchmark_format import read_benchmark, read_chapter_index

    root = Path(root)
    try:
        bench = read_benchmark(root)
    except (FileNotFoundError, ValueError) as exc:
        raise ColorizeInputError(str(exc)) from None
    tasks = []
    for chapter in bench["chapters"]:
        chapter_id = chapter["chapter_id"]
        try:
            index = read_chapter_index(root, chapter_id)
        except (FileNotFoundError, ValueError) as exc:
            raise ColorizeInputError(str(exc)) from None
        styles = index.get("styles", {})
        if style not in styles:
            raise ColorizeInputError(
                f"--style {style!r}: chapter {chapter_id} of {root} has the styles {sorted(styles)}; choose one"
            )
        folder = styles[style]["folder"]
        page_files = [entry["inputs"][style] for entry in index["bw"]]
        ref_files = [entry["file"] for entry in index["refs"]]
        _check_listed_files(root, chapter_id, [*page_files, *ref_files])
        pages = open_source(root / chapter_id / folder, tuple(_inside(f, folder) for f in page_files))
        refs = open_source(root / chapter_id / "refs", tuple(_inside(f, "refs") for f in ref_files))
        size = index.get("size") or bench.get("size")
        tasks.append(ChapterTask(chapter_id, pages, refs, chapter_id, tuple(size) if size else None))
    return tasks, {"benchmark": str(root), "style": style, "chapters": len(tasks)}


def _check_listed_files(root: Path, chapter_id: str, files: list[str]) -> None:
    """Every page and reference a chapter's index lists must exist: a missing one would be left out of the run
    (and of its score) without a word."""
    missing = [name for name in files if not (root / chapter_id / name).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PreconditionError(
            f"benchmark {root}: chapter {chapter_id} lists {missing[0]}{more} but {root / chapter_id / missing[0]} "
            "does not exist; copy the benchmark again or rebuild it with python -m jobs.shards --data OUT --rebuild"
        )


def _inside(path: str, folder: str) -> str:
    prefix = f"{folder}/"
    if not path.startswith(prefix):
        raise ColorizeInputError(f"benchmark index lists {path!r} outside its folder {folder!r}")
    return path[len(prefix) :]


# ---- one page's job ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PageJob:
    """A page to colour, with its retrievals; the worker reads the page and references from the sources itself."""

    chapter: str
    name: str  # the page's name inside its source
    page_id: str
    sha1: str
    pages: PageSource
    refs: PageSource
    grid: tuple[tuple[tuple[str, Any], ...], ...]  # 12 retrieval rows (as item tuples: hashable, picklable)
    fingerprint: str
    seed: int
    style_seed: int  # the page style's own noise (ScreenStyle's decoder, the halftone renderer)
    output: str  # OUT-relative path of the page, without extension
    sheet: str  # OUT-relative path of the contact sheet
    out_size: tuple[int, int]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [dict(row) for row in self.grid]


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker needs: the output folder, the settings and the encoder (all picklable)."""

    output: str
    settings: ColorizeOptions
    encoder: EncoderInfo
    settings_record: dict[str, Any]
    device: str | None = None
    threads: int = 0  # torch threads; 0 leaves torch's default (all cores)
    embed_batch: int = 32


# ---- planning a chapter ------------------------------------------------------------------------------------------


def page_is_done(output: Path, job_output: str, fingerprint: str, coloring: bool) -> bool:
    """A page is finished when its fingerprint file (written last) holds this fingerprint and its files exist."""
    record_path = output / f"{job_output}.json"
    if not record_path.is_file():
        return False
    try:
        record = read_json(record_path)
    except ValueError:
        return False
    if record.get("fingerprint") != fingerprint or not (output / record.get("contact_sheet", "")).is_file():
        return False
    return not coloring or (output / f"{job_output}.png").is_file()


@dataclass
class ChapterPlan:
    jobs: list[PageJob] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # skipped and failed pages, and failed references
    ref_failures: list[dict[str, Any]] = field(default_factory=list)
    refs_used: int = 0
    order: list[str] = field(default_factory=list)  # page names in reading order
    error: str | None = None  # the whole chapter could not be planned (its pages are then not listed)


def plan_chapter(
    task: ChapterTask,
    config: WorkerConfig,
    settings_hash: str,
    embed: Callable[[np.ndarray], np.ndarray],
    styler: Callable[[], PageStyler],
    *,
    rebuild: bool = False,
) -> ChapterPlan:
    """Read, fingerprint, skip what is done, embed and search what is not: the chapter's page jobs.

    `styler` gives the run's page styler (built on first use): query patches are cut from the styled frame."""
    settings = config.settings
    output = Path(config.output)
    plan = ChapterPlan()
    width, height = settings.width, settings.height
    prepare = patch_preparer(config.encoder)
    refs_listing, pages_listing = read_source(task.refs), read_source(task.pages)
    for listing in (refs_listing, pages_listing):
        if listing.error:
            raise ColorizeInputError(listing.error)

    ref_ids, ref_arrays, ref_tokens = [], [], []
    for ref in refs_listing.pages:
        try:
            if ref.error:
                raise OSError(ref.error)
            image = decode_image(ref.data, ref.entry.source)
            arrays = [prepare(patch) for patch in reference_patches(image, width, height)]
        except Exception as exc:  # noqa: BLE001 - a bad reference is reported; the pool goes on without it
            plan.ref_failures.append({"chapter": task.key, "reference": ref.entry.name, "error": str(exc)})
            continue
        ref_ids.append(ref.entry.name)
        ref_arrays.extend(arrays)
        ref_tokens.append([ref.entry.name, ref.sha1])
    plan.refs_used = len(ref_ids)
    pool_signature = stable_hash([config.encoder.encoder_id, sorted(ref_tokens)], 16)

    plan.order = [p.entry.name for p in pages_listing.pages]
    stems = output_stems(plan.order)
    out_dir = f"{task.out_dir}/" if task.out_dir else ""
    sheet_dir = f"{SHEETS_FOLDER}/{out_dir}"
    out_size = tuple(task.out_size) if task.out_size else settings.sr_size
    pending: list[tuple[Any, str, str, int, list[np.ndarray]]] = []
    for page in pages_listing.pages:
        stem = stems[page.entry.name]
        base = {"chapter": task.key, "page": page.entry.name}
        if page.error:
            plan.rows.append({**base, "output": None, "status": STATUS_ERROR, "error": page.error})
            continue
        fingerprint = stable_hash([settings_hash, page.sha1, pool_signature, list(out_size)], 20)
        if not rebuild and page_is_done(output, out_dir + stem, fingerprint, settings.models is not None):
            plan.rows.append({**base, "output": f"{out_dir}{stem}.png", "status": STATUS_SKIPPED})
            continue
        if not ref_ids:
            reason = f"no usable reference in {task.refs.label}"
            plan.rows.append({**base, "output": None, "status": STATUS_ERROR, "error": reason})
            continue
        style_seed = derive_seed(settings.seed, "style", task.key, page.entry.name)
        try:
            image = decode_image(page.data, page.entry.source)
            frame, _ = styler().frames(image, (width, height), settings.sr_size, style_seed)
            arrays = [prepare(patch) for patch in query_patches(frame)]
        except Exception as exc:  # noqa: BLE001 - a corrupt page is a row with its reason; the chapter goes on
            plan.rows.append({**base, "output": None, "status": STATUS_ERROR, "error": str(exc)})
            continue
        pending.append((page, stem, fingerprint, style_seed, arrays))
    if not pending:
        return plan

    vectors = embed(np.stack(ref_arrays + [a for *_, arrays in pending for a in arrays]))
    pool = ReferencePool(ref_ids, vectors[: len(ref_arrays)])
    try:
        grids = pool.search(vectors[len(ref_arrays) :], RANKS_PER_PATCH, settings.max_per_page)
    except ValueError as exc:
        raise ColorizeInputError(f"chapter {task.key or task.pages.label}: retrieval: {exc}") from None
    for (page, stem, fingerprint, style_seed, _), grid in zip(pending, grids, strict=True):
        plan.jobs.append(
            PageJob(
                chapter=task.key,
                name=page.entry.name,
                page_id=page.entry.page_id,
                sha1=page.sha1,
                pages=task.pages,
                refs=task.refs,
                grid=tuple(tuple(sorted(row.items())) for row in grid),
                fingerprint=fingerprint,
                seed=derive_seed(settings.seed, "colorize", task.key, page.entry.name),
                style_seed=style_seed,
                output=out_dir + stem,
                sheet=f"{sheet_dir}{stem}.jpg",
                out_size=out_size,
            )
        )
    return plan
