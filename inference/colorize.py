"""Colour whole chapters: retrieval from a reference pool, ICP on the composite, GSRP, page by page on Ray.

Per chapter (a PAGES/REFS pair, or each chapter of a benchmark folder):

1. The driver reads every reference and page through the ingestion's reader (`inference.sources`),
   refusing bad files with their reason. Each page gets a fingerprint: the run's settings, the page's bytes and
   the reference pool's bytes. A page whose output exists with the same fingerprint is skipped; any change
   (weights, size, steps, seed, encoder, a reference added...) redoes it.
2. The pool's reference patches and the remaining pages' query patches are embedded once, in a worker (it holds
   the encoder), and searched with FAISS: top 3 per query patch (`inference.references`).
3. Pages go to workers in batches: Ray actors, one per GPU (or CPU actors without GPUs), each loading the
   encoder and the models once; `local=True` runs one worker in this process. A worker rebuilds a page's
   composite with `pipelines.core.sample_inputs.composite_inputs` (the trainer's function), runs ICP and GSRP
   (`inference.models`), and writes the page, its contact sheet and, last, its fingerprint file, each
   atomically. A page that fails is a row with its cause; the others go on.

Outputs (PAGES/REFS run; a benchmark run writes `<chapter_id>/` folders of `<page_id>.png` instead)::

    OUT/<page name>.png                    the coloured page (GSRP size), named after its source file
    OUT/<page name>.json                   its fingerprint, settings and 12 retrievals (written last)
    OUT/contact_sheets/<page name>.jpg     input with query boxes, the 12 references, the output
    OUT/colorize.summary.json              counts, rates, settings, failures (written at the end of every run)
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from inference.models import ModelPaths, PageBatchItem, SamplingSettings, read_export
from inference.references import (
    ReferencePool,
    bw_frame,
    embed_prepared,
    load_colorize_encoder,
    page_composite,
    patch_preparer,
    query_patches,
    reference_patches,
    resolve_colorize_encoder,
)
from inference.sheets import colorize_sheet
from inference.sources import (
    ColorizeInputError,
    PageSource,
    decode_image,
    open_source,
    output_stems,
    read_page,
    read_source,
)
from pipelines.core.encoders import EncoderInfo
from pipelines.core.geometry import RANKS_PER_PATCH, CompositeLayout, hires_size
from pipelines.core.pagestore import encode_page
from pipelines.core.patches import fitted_page
from pipelines.core.schemas import STATUS_ERROR, STATUS_OK
from pipelines.core.seeding import derive_seed
from pipelines.core.storage import atomic_write_bytes, atomic_write_json, read_json, stable_hash, sweep_tmp

log = logging.getLogger(__name__)

COLORIZE_VERSION = 1  # bump when a page's pixels would change for the same settings: old outputs are then redone
SIZE_PRESETS = ((512, 800), (640, 640), (800, 512))
SUMMARY_FILE = "colorize.summary.json"
SHEETS_FOLDER = "contact_sheets"
STATUS_SKIPPED = "skipped"
SHEET_QUALITY = 90


# ---- settings ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColorizeSettings:
    """What decides the outputs. `models=None` retrieves and draws contact sheets only (no colouring)."""

    width: int = 512
    height: int = 800
    sr_scale: float = 1.5
    seed: int = 0
    encoder: str = "weightfree"
    max_per_page: int | None = None
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    models: ModelPaths | None = None

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
            "max_per_page": self.max_per_page,
            "sampling": asdict(self.sampling) if self.models else None,
            "models": self.models.identity() if self.models else None,
            "mode": "colour" if self.models else "references-only",
        }


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
    from inference.references import CLIP_VISION
    from pipelines.core.encoders import DEFAULT_ENCODER

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

    key: str  # "" for a PAGES/REFS run, the chapter id in a benchmark
    pages: PageSource
    refs: PageSource
    out_dir: str  # "" or "<chapter_id>"
    out_size: tuple[int, int] | None = None  # a benchmark's page size (outputs must match its ground truth)


def chapter_tasks_for_sources(pages: str, refs: str) -> list[ChapterTask]:
    return [ChapterTask("", open_source(pages), open_source(refs), "")]


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
        pages = open_source(root / chapter_id / folder, tuple(_inside(f, folder) for f in page_files))
        refs = open_source(root / chapter_id / "refs", tuple(_inside(f, "refs") for f in ref_files))
        size = index.get("size") or bench.get("size")
        tasks.append(ChapterTask(chapter_id, pages, refs, chapter_id, tuple(size) if size else None))
    return tasks, {"benchmark": str(root), "style": style, "chapters": len(tasks)}


def _inside(path: str, folder: str) -> str:
    prefix = f"{folder}/"
    if not path.startswith(prefix):
        raise ColorizeInputError(f"benchmark index lists {path!r} outside its folder {folder!r}")
    return path[len(prefix) :]


# ---- one page's work ---------------------------------------------------------------------------------------------


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
    settings: ColorizeSettings
    encoder: EncoderInfo
    settings_record: dict[str, Any]
    device: str | None = None
    threads: int = 0  # torch threads; 0 leaves torch's default (all cores)
    embed_batch: int = 32


class ColorizeWorker:
    """Holds the encoder and the models (loaded on first use); as a Ray actor, one per GPU or CPU slot."""

    def __init__(self, config: WorkerConfig) -> None:
        import torch

        from pipelines.runtime.ray import torch_device

        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        self.device = torch_device(config.device)
        self._encoder = None
        self._colorizer = None
        self._readers: OrderedDict[str, Any] = OrderedDict()
        self._refs: OrderedDict[tuple[str, str], Image.Image] = OrderedDict()

    def ready(self) -> str:
        """Load the models now (so a run's page rate excludes loading, and a bad weight fails at once)."""
        if self.config.settings.models is not None:
            self.colorizer()
        return self.device

    def embed(self, prepared: np.ndarray) -> np.ndarray:
        if self._encoder is None:
            self._encoder = load_colorize_encoder(self.config.encoder, self.device)
        return embed_prepared(self._encoder, prepared, self.config.embed_batch)

    def close(self) -> None:
        """Close the archives this worker holds open."""
        while self._readers:
            self._readers.popitem()[1].close()

    def colorizer(self):
        if self._colorizer is None:
            from inference.models import Colorizer

            settings = self.config.settings
            self._colorizer = Colorizer(settings.models, settings.sampling, self.device)
        return self._colorizer

    # -- reading, with small caches: a batch's pages share their chapter's references

    def _reader(self, source: PageSource):
        reader = self._readers.get(source.label)
        if reader is None:
            reader = source.open().__enter__()
            self._readers[source.label] = reader
            while len(self._readers) > 4:
                self._readers.popitem(last=False)[1].close()
        return reader

    def _image(self, source: PageSource, name: str, sha1: str | None = None) -> Image.Image:
        reader = self._reader(source)
        entry = next((p for p in reader.pages if p.name == name), None)
        if entry is None:
            raise FileNotFoundError(f"{source.label}/{name}: no longer in its source")
        read = read_page(reader, entry)
        if read.error:
            raise OSError(read.error)
        if sha1 is not None and read.sha1 != sha1:
            raise RuntimeError(f"{entry.source}: the file changed since the run listed it; run again")
        return decode_image(read.data, entry.source)

    def _fitted_ref(self, source: PageSource, name: str) -> Image.Image:
        settings = self.config.settings
        key = (source.label, name)
        if key not in self._refs:
            self._refs[key] = fitted_page(self._image(source, name), settings.width, settings.height)
            while len(self._refs) > 64:
                self._refs.popitem(last=False)
        return self._refs[key]

    # -- colouring

    def colorize(self, jobs: list[PageJob]) -> list[dict[str, Any]]:
        """Colour and write a batch of pages; every page gets a result row (ok or error with its cause)."""
        prepared: list[tuple[PageJob, dict[str, Any]]] = []
        results: dict[str, dict[str, Any]] = {}
        for job in jobs:
            try:
                prepared.append((job, self.page_inputs(job)))
            except Exception as exc:  # noqa: BLE001 - a page that cannot be read or composed is its own failure
                results[job.output] = _error_row(job, "preparing", exc)
        if prepared:
            if self.config.settings.models is None:
                outputs: list[Image.Image | None] = [None] * len(prepared)
            else:
                outputs = self._run_models(prepared, results)
            for (job, inputs), final in zip(prepared, outputs, strict=True):
                if job.output in results:
                    continue
                try:
                    results[job.output] = self._write(job, inputs, final)
                except Exception as exc:  # noqa: BLE001 - e.g. a full disk: this page fails, its row says why
                    results[job.output] = _error_row(job, "writing", exc)
        return [results[job.output] for job in jobs]

    def page_inputs(self, job: PageJob) -> dict[str, Any]:
        """The page read and checked, its references fitted, its composite canvases and its B&W at the GSRP size."""
        settings = self.config.settings
        page = self._image(job.pages, job.name, job.sha1)
        rows = job.rows
        fitted_refs = {name: self._fitted_ref(job.refs, name) for name in {row["ref_page_id"] for row in rows}}
        bw, canvases = page_composite(settings.layout, job.page_id, page, rows, fitted_refs)
        hr_bw = bw_frame(page, *settings.sr_size)
        return {"bw": bw, "canvases": canvases, "hr_bw": hr_bw, "fitted_refs": fitted_refs}

    def _run_models(
        self, prepared: list[tuple[PageJob, dict[str, Any]]], results: dict[str, dict[str, Any]]
    ) -> list[Image.Image | None]:
        """The batch through ICP + GSRP; if the batch fails, each page alone, so a failure names its page."""
        colorizer = self.colorizer()
        layout = self.config.settings.layout
        items = [
            PageBatchItem(inputs["canvases"].refs_only, inputs["canvases"].frame_only, inputs["canvases"].mask,
                          inputs["hr_bw"], job.seed)
            for job, inputs in prepared
        ]  # fmt: skip
        try:
            return colorizer.colorize(items, layout)
        except Exception as exc:  # noqa: BLE001 - a batch's failure is retried page by page below
            if len(items) == 1:
                results[prepared[0][0].output] = _error_row(prepared[0][0], "colouring", exc)
                return [None]
            log.warning("a batch of %d pages failed (%s); colouring its pages one by one", len(items), exc)
        outputs = []
        for (job, _), item in zip(prepared, items, strict=True):
            try:
                outputs.append(colorizer.colorize([item], layout)[0])
            except Exception as exc:  # noqa: BLE001 - this page's failure, the batch goes on
                results[job.output] = _error_row(job, "colouring", exc)
                outputs.append(None)
        return outputs

    def _write(self, job: PageJob, inputs: dict[str, Any], final: Image.Image | None) -> dict[str, Any]:
        out = Path(self.config.output)
        if final is not None and final.size != tuple(job.out_size):
            final = final.resize(tuple(job.out_size), Image.Resampling.BICUBIC)
        if final is not None:
            atomic_write_bytes(out / f"{job.output}.png", encode_page(final.convert("RGB"), "png"))
        sheet = colorize_sheet(inputs["bw"], job.rows, inputs["fitted_refs"], final, title=job.name)
        atomic_write_bytes(out / job.sheet, encode_page(sheet, "jpeg", SHEET_QUALITY))
        record = {
            "fingerprint": job.fingerprint,
            "page": job.name,
            "page_sha1": job.sha1,
            "seed": job.seed,
            "output": f"{job.output}.png" if final is not None else None,
            "contact_sheet": job.sheet,
            "size": list(final.size) if final is not None else None,
            "retrievals": job.rows,
            "settings": self.config.settings_record,
        }
        atomic_write_json(out / f"{job.output}.json", record)  # the page's completion marker: written last
        return {
            "chapter": job.chapter,
            "page": job.name,
            "output": record["output"],
            "contact_sheet": job.sheet,
            "status": STATUS_OK,
        }


def _error_row(job: PageJob, stage: str, exc: BaseException) -> dict[str, Any]:
    return {
        "chapter": job.chapter,
        "page": job.name,
        "output": None,
        "status": STATUS_ERROR,
        "error": f"{job.pages.label}/{job.name}: {stage} failed: {type(exc).__name__}: {exc}",
    }


# ---- the driver --------------------------------------------------------------------------------------------------


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
    *,
    rebuild: bool = False,
) -> ChapterPlan:
    """Read, fingerprint, skip what is done, embed and search what is not: the chapter's page jobs."""
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
    pending: list[tuple[Any, str, str, list[np.ndarray]]] = []
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
        try:
            image = decode_image(page.data, page.entry.source)
            arrays = [prepare(patch) for patch in query_patches(image, width, height)]
        except Exception as exc:  # noqa: BLE001 - a corrupt page is a row with its reason; the chapter goes on
            plan.rows.append({**base, "output": None, "status": STATUS_ERROR, "error": str(exc)})
            continue
        pending.append((page, stem, fingerprint, arrays))
    if not pending:
        return plan

    vectors = embed(np.stack(ref_arrays + [a for *_, arrays in pending for a in arrays]))
    pool = ReferencePool(ref_ids, vectors[: len(ref_arrays)])
    try:
        grids = pool.search(vectors[len(ref_arrays) :], RANKS_PER_PATCH, settings.max_per_page)
    except ValueError as exc:
        raise ColorizeInputError(f"chapter {task.key or task.pages.label}: retrieval: {exc}") from None
    for (page, stem, fingerprint, _), grid in zip(pending, grids, strict=True):
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
                output=out_dir + stem,
                sheet=f"{sheet_dir}{stem}.jpg",
                out_size=out_size,
            )
        )
    return plan


@dataclass(frozen=True)
class RunOptions:
    """Where and how the work runs (never part of a fingerprint)."""

    batch_size: int = 1
    local: bool = False
    actors: int | None = None  # default: one per GPU, else 1
    cpus_per_actor: int | None = None  # CPU actors: default all CPUs split across the actors
    device: str | None = None
    rebuild: bool = False


class LocalPool:
    """One worker in this process (`--local`)."""

    def __init__(self, config: WorkerConfig) -> None:
        self.worker = ColorizeWorker(config)
        self.devices = [self.worker.ready()]

    def embed(self, prepared: np.ndarray) -> np.ndarray:
        return self.worker.embed(prepared)

    def run(self, batches: list[list[PageJob]], bar: tqdm) -> list[dict[str, Any]]:
        results = []
        for batch in batches:
            results.extend(self.worker.colorize(batch))
            bar.update(len(batch))
        return results

    def close(self) -> None:
        self.worker.close()


class RayPool:
    """Colorize actors: one per GPU (the models loaded once in each), or CPU actors on a cluster without GPUs."""

    def __init__(self, config: WorkerConfig, options: RunOptions) -> None:
        import ray

        from pipelines.runtime.ray import cluster_has_gpus, init_ray

        init_ray()
        resources = ray.cluster_resources()
        gpus = cluster_has_gpus()
        cpus = max(1, int(resources.get("CPU", 1)))
        n_actors = options.actors or (max(1, int(resources.get("GPU", 0))) if gpus else 1)
        cpus_per_actor = options.cpus_per_actor or (1 if gpus else max(1, cpus // n_actors))
        actor = ray.remote(ColorizeWorker).options(
            num_gpus=1 if gpus else 0, num_cpus=cpus_per_actor, max_restarts=1, max_task_retries=0
        )
        self.actors = [actor.remote(replace(config, threads=cpus_per_actor)) for _ in range(n_actors)]
        try:
            self.devices = ray.get([a.ready.remote() for a in self.actors])
        except Exception as exc:
            raise RuntimeError(f"colorize workers could not start: {exc}") from exc
        log.info("colorize workers on %s", self.devices)

    def embed(self, prepared: np.ndarray) -> np.ndarray:
        import ray

        return ray.get(self.actors[0].embed.remote(prepared))

    def run(self, batches: list[list[PageJob]], bar: tqdm) -> list[dict[str, Any]]:
        """Two batches in flight per actor; a crashed actor fails its batch's pages, Ray restarts it once."""
        import ray

        queue = deque(batches)
        load = [0] * len(self.actors)
        running: dict[Any, tuple[list[PageJob], int]] = {}
        results = []
        while queue or running:
            while queue and min(load) < 2:
                slot = int(np.argmin(load))
                batch = queue.popleft()
                running[self.actors[slot].colorize.remote(batch)] = (batch, slot)
                load[slot] += 1
            ready, _ = ray.wait(list(running), num_returns=1)
            batch, slot = running.pop(ready[0])
            load[slot] -= 1
            try:
                results.extend(ray.get(ready[0]))
            except Exception as exc:  # noqa: BLE001 - a crashed actor (OOM, lost node) fails this batch only
                results.extend(_error_row(job, "the worker", exc) for job in batch)
            bar.update(len(batch))
        return results

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


def run_colorize(
    tasks: list[ChapterTask],
    output: str | Path,
    settings: ColorizeSettings,
    options: RunOptions | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Colour every chapter task into `output`; returns (and writes) the run summary."""
    options = options or RunOptions()
    if settings.models is not None and settings.sampling.memory == "offload":
        _check_offload_device(options)
    started = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    sweep_tmp(output)
    try:
        info = resolve_colorize_encoder(settings.encoder)
    except (FileNotFoundError, ValueError) as exc:
        raise ColorizeInputError(f"--encoder: {exc}") from None
    record = settings.record(info)
    settings_hash = stable_hash(record, 20)
    config = WorkerConfig(str(output), settings, info, record, device=options.device)
    pool: LocalPool | RayPool | None = None

    def embed(prepared: np.ndarray) -> np.ndarray:
        nonlocal pool
        pool = pool or _start_pool(config, options)
        return pool.embed(prepared)

    plans = []
    try:
        for task in tasks:
            try:
                plans.append(plan_chapter(task, config, settings_hash, embed, rebuild=options.rebuild))
            except ColorizeInputError as exc:  # an unreadable source or a pool the cap cannot fill: this chapter
                if len(tasks) == 1:
                    raise
                plans.append(ChapterPlan(error=str(exc)))
        jobs = [job for plan in plans for job in plan.jobs]
        batches = [jobs[i : i + max(1, options.batch_size)] for i in range(0, len(jobs), max(1, options.batch_size))]
        color_started = time.perf_counter()
        results: list[dict[str, Any]] = []
        if jobs:
            pool = pool or _start_pool(config, options)
            bar = tqdm(total=len(jobs), desc="colorize", unit="page", dynamic_ncols=True, mininterval=1.0)
            results = pool.run(batches, bar)
            bar.close()
        color_seconds = time.perf_counter() - color_started
        devices = pool.devices if pool else []
    finally:
        if pool is not None:
            pool.close()

    rows = _ordered_rows(plans, results, tasks)
    colored = sum(row["status"] == STATUS_OK for row in rows)
    failures = [row for row in rows if row["status"] == STATUS_ERROR]
    chapter_failures = [
        {"chapter": task.key, "error": plan.error} for task, plan in zip(tasks, plans, strict=True) if plan.error
    ]
    ref_failures = [failure for plan in plans for failure in plan.ref_failures]
    summary = {
        "stage": "colorize",
        "complete": not failures and not chapter_failures,
        **(extra or {}),
        "output": str(output),
        "settings": record,
        "settings_fingerprint": settings_hash,
        "chapters": len(tasks),
        "pages": len(rows),
        "pages_done": colored,
        "pages_skipped": sum(row["status"] == STATUS_SKIPPED for row in rows),
        "pages_failed": len(failures),
        "references_used": sum(plan.refs_used for plan in plans),
        "references_failed": len(ref_failures),
        "pages_per_second": round(colored / color_seconds, 4) if colored and color_seconds > 0 else None,
        "devices": devices,
        "batch_size": options.batch_size,
        "failures": [{"chapter": r["chapter"], "page": r["page"], "error": r["error"]} for r in failures],
        "reference_failures": ref_failures,
        "chapter_failures": chapter_failures,
        "page_rows": rows,
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_json(output / SUMMARY_FILE, summary)
    return summary


def _check_offload_device(options: RunOptions) -> None:
    """`--memory offload` moves models between CPU and GPU: refuse it up front where the workers have no GPU."""
    if options.device is not None:
        has_gpu = options.device.startswith("cuda")
    elif options.local:
        import torch

        has_gpu = torch.cuda.is_available()
    else:
        from pipelines.runtime.ray import cluster_has_gpus, init_ray

        init_ray()
        has_gpu = cluster_has_gpus()
    if not has_gpu:
        raise ColorizeInputError("--memory offload needs CUDA workers; use --memory vae-slicing on CPUs")


def _start_pool(config: WorkerConfig, options: RunOptions) -> LocalPool | RayPool:
    return LocalPool(config) if options.local else RayPool(config, options)


def _ordered_rows(plans: list[ChapterPlan], results: list[dict[str, Any]], tasks: list[ChapterTask]) -> list[dict]:
    """Every page's row in chapter order, then reading order within the chapter."""
    by_key = {(row["chapter"], row["page"]): row for plan in plans for row in plan.rows}
    by_key.update({(row["chapter"], row["page"]): row for row in results})
    order = [(task.key, name) for task, plan in zip(tasks, plans, strict=True) for name in plan.order]
    return [by_key[key] for key in order if key in by_key]
