"""Colour whole chapters: retrieval from a reference pool, ICP on the composite, GSRP, page by page on Ray.

Per chapter (a PAGES/REFS pair, or each chapter of a benchmark folder):

1. The driver plans the chapter (`inference.plan`): it reads every reference and page through the ingestion's
   reader (`inference.sources`), refusing bad files with their reason. Each page gets a fingerprint: the run's
   settings, the page's bytes and the reference pool's bytes. A page whose output exists with the same fingerprint
   is skipped; any change (weights, size, steps, seed, encoder, a reference added...) redoes it.
2. The pool's reference patches and the remaining pages' query patches are embedded once, in a worker (it holds
   the encoder), and searched with FAISS: top 3 per query patch (`pipelines.core.page_references`).
3. Pages go to workers (`inference.worker`) in batches: Ray actors, one per GPU (or CPU actors without GPUs), each
   loading the encoder and the models once; `local=True` runs one worker in this process. A worker rebuilds a page's
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

import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from inference.plan import (
    STATUS_SKIPPED,
    ChapterPlan,
    ChapterTask,
    ColorizeOptions,
    WorkerConfig,
    plan_chapter,
)
from inference.sources import ColorizeInputError
from inference.styles import PageStyler
from inference.worker import LocalPool, RayPool, RunOptions
from pipelines.core.page_references import resolve_colorize_encoder
from pipelines.core.schemas import STATUS_ERROR, STATUS_OK
from pipelines.core.storage import atomic_write_json, stable_hash, sweep_tmp

SUMMARY_FILE = "colorize.summary.json"


def run_colorize(
    tasks: list[ChapterTask],
    output: str | Path,
    settings: ColorizeOptions,
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

    styler: PageStyler | None = None

    def page_styler() -> PageStyler:
        nonlocal styler
        styler = styler or PageStyler(
            settings.style, settings.screenstyle_weights, options.device, settings.line_extractor_weights
        )
        return styler

    plans = []
    try:
        for task in tasks:
            try:
                plans.append(plan_chapter(task, config, settings_hash, embed, page_styler, rebuild=options.rebuild))
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
