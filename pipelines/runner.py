"""The whole data pipeline in order: ingest -> retrieval -> screentone -> shards, then an optional report.

A stage is skipped when its summary exists and the pipeline's record says it completed with the same settings
(and, for ingestion, the same chapters in the input); when a stage runs again, every later stage runs too. Each
stage is itself resumable unit by unit, so even a stage that runs again redoes only what is missing. A stage that
ends with failed units blocks the stages that read its outputs (`NEEDS`): they do not run, their old completion
marker is removed, and the record says why, so nothing is ever marked complete over partial input.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pipelines.core.cli import faults_text, summary_failures, summary_faults
from pipelines.core.geometry import RESAMPLE_LANCZOS, CompositeLayout
from pipelines.core.layout import DataLayout
from pipelines.core.sources import ChapterEntry, ChapterListing, chapter_signatures, input_signature
from pipelines.core.storage import atomic_write_json, read_json, stable_hash
from pipelines.ingest.stage import DEFAULT_MIN_COLOR_PAGES, IngestOptions
from pipelines.retrieval.stage import RetrievalOptions
from pipelines.runtime.distributor import map_in_tasks
from pipelines.runtime.heap import runs_with_frozen_heap
from pipelines.runtime.preconditions import (
    check_chapters,
    check_encoder,
    check_input_root,
    check_output_creatable,
    created_folder,
)
from pipelines.screentone.stage import ScreentoneOptions
from pipelines.shards.stage import ShardOptions
from screentone.lines import XDOG

log = logging.getLogger(__name__)

STAGES = ("ingest", "retrieval", "screentone", "shards")
NEEDS = {"ingest": (), "retrieval": ("ingest",), "screentone": ("ingest",), "shards": ("retrieval", "screentone")}
RECORD = "pipeline.summary.json"


@dataclass(frozen=True)
class PipelineOptions:
    """Settings of every stage; each stage's slice of it decides whether that stage's outputs are current.

    Sizes, seed and screentone renderer live in `shards` and are shared by every stage that uses them (the
    retrieval options' own size and seed are replaced by them).
    """

    shards: ShardOptions = ShardOptions()
    retrieval: RetrievalOptions = RetrievalOptions()
    min_color_pages: int = DEFAULT_MIN_COLOR_PAGES
    chapters_per_task: int = 4
    rebuild: bool = False  # rewrite the shards and the benchmark from scratch (a new sample format needs it)
    verify: bool = False  # run every stage as after a killed run: no summary or ledger trusted, every marker read

    def stage_options(self, stage: str) -> Any:
        """The one options dataclass `stage`'s ``run_<stage>`` takes."""
        shards = self.shards
        width, height = shards.size
        by_stage = {
            "ingest": IngestOptions(min_color_pages=self.min_color_pages),
            "retrieval": replace(
                self.retrieval, width=width, height=height, seed=shards.seed, fit_resample=shards.fit_resample
            ),
            "screentone": ScreentoneOptions(
                renderer=shards.renderer,
                width=width,
                height=height,
                hires_scale=shards.hires_scale,
                seed=shards.seed,
                fit_resample=shards.fit_resample,
                line_extractor_weights=shards.line_extractor_weights,
            ),
            "shards": shards,
        }
        return by_stage[stage]

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """What decides whether `stage`'s outputs are current (recorded in the pipeline record)."""
        shards = self.shards
        retrieval = self.retrieval
        # named only when not the original Lanczos, so records written before it was an option stay current
        fit = {} if shards.fit_resample == RESAMPLE_LANCZOS else {"fit_resample": shards.fit_resample}
        by_stage = {
            "ingest": {"min_color_pages": self.min_color_pages},
            "retrieval": {
                "encoder": retrieval.encoder,
                "refs": retrieval.refs,
                "min_refs": retrieval.min_refs,
                "k_per_patch": retrieval.k_per_patch,
                **({"max_per_page": retrieval.max_per_page} if retrieval.max_per_page is not None else {}),
                "size": list(shards.size),
                "seed": shards.seed,
                **fit,
            },
            "screentone": {
                "renderer": shards.renderer,
                "size": list(shards.size),
                "hires_scale": shards.hires_scale,
                "seed": shards.seed,
                **fit,
                "line_extractor": shards.line_extractor_weights or XDOG,  # the line art (sample format 3)
            },
            "shards": {**shards.recorded(), **({"rebuild": True} if self.rebuild else {})},
        }
        return by_stage[stage]


def stage_runner(stage: str) -> Callable[..., dict[str, Any]]:
    """``pipelines.<stage>.stage.run_<stage>``, imported on first use (Ray, torch and FAISS load with the stage).

    Every stage runs as ``run_<stage>(data, options, local=...)``; ingestion also takes its input root first.
    """
    return getattr(importlib.import_module(f"pipelines.{stage}.stage"), f"run_{stage}")


def _run_stage(
    stage: str,
    input_root: str,
    layout: DataLayout,
    options: PipelineOptions,
    local: bool,
    listing: ChapterListing | None,
) -> dict:
    run = stage_runner(stage)
    inputs = (input_root, layout.root) if stage == "ingest" else (layout.root,)
    stage_options = options.stage_options(stage)
    verify = options.verify
    if stage == "ingest":
        # the listing and signatures the pipeline just took: ingestion keys its ledger on them, not taken again
        per_task = options.chapters_per_task
        return run(*inputs, stage_options, chapters_per_task=per_task, local=local, listing=listing, verify=verify)
    if stage == "shards":  # never rebuilt implicitly: new chapters append a generation, other settings refuse
        return run(*inputs, stage_options, local=local, rebuild=options.rebuild, verify=verify)
    return run(*inputs, stage_options, local=local, verify=verify)


@runs_with_frozen_heap
def run_pipeline(
    input_root: str | os.PathLike,
    output: str | os.PathLike,
    options: PipelineOptions = PipelineOptions(),
    *,
    local: bool = False,
    ray_address: str | None = None,
    num_cpus: int | None = None,
) -> dict[str, Any]:
    """Run every stage that is not current; returns the per-stage summaries and what was skipped.

    Preconditions (input root and its layout, output folder, encoder weights) are checked before Ray starts or
    any folder is created; a failed first run removes the output folder it created if it is still empty.
    """
    input_root = check_input_root(input_root)
    chapters = check_chapters(input_root)
    output = check_output_creatable(output)
    width, height = options.shards.size
    CompositeLayout(width, height)  # the training size must suit the composite: refused before any work
    options.stage_options("retrieval")  # validates the retrieval settings at the pipeline's size, before any work
    check_encoder(options.retrieval.encoder)
    with created_folder(output):
        return _run_pipeline(input_root, chapters, DataLayout.at(output), options, local, ray_address, num_cpus)


def _run_pipeline(
    input_root: str,
    chapters: list[ChapterEntry],
    layout: DataLayout,
    options: PipelineOptions,
    local: bool,
    ray_address: str | None,
    num_cpus: int | None,
) -> dict[str, Any]:
    if not local:
        from pipelines.runtime.ray import init_ray

        init_ray(ray_address, num_cpus=num_cpus)
    record_path = layout.root / RECORD
    previous = read_json(record_path).get("stages", {}) if record_path.exists() else {}
    record: dict[str, Any] = {"input": input_root, "stages": {}}
    rerun_downstream = False
    incomplete: set[str] = set()
    listing: ChapterListing | None = None
    started = time.perf_counter()
    for stage in STAGES:
        unfinished = [needed for needed in NEEDS[stage] if needed in incomplete]
        if unfinished:
            record["stages"][stage] = _blocked(stage, unfinished, layout)
            incomplete.add(stage)
            atomic_write_json(record_path, record)
            continue
        settings = options.stage_settings(stage)
        if stage == "ingest":
            # the chapters' signatures (a stat of every page) are taken in Ray tasks; the driver lists the folders
            mapper = functools.partial(map_in_tasks, desc="input signatures", local=local)
            listing = chapter_signatures(input_root, mapper, chapters)
            settings = {**settings, "input": input_root, "chapters": input_signature(listing)}
        settings_hash = stable_hash(settings, 16)
        before = previous.get(stage, {})
        current = (
            not options.verify
            and not rerun_downstream
            and before.get("fingerprint") == settings_hash
            and layout.summary(stage).exists()
            and read_json(layout.summary(stage)).get("complete") is True
        )
        stage_started = time.perf_counter()
        if current:
            summary, skipped = read_json(layout.summary(stage)), True
        else:
            summary, skipped = _run_stage(stage, input_root, layout, options, local, listing), False
            rerun_downstream = True
        if summary.get("complete") is not True:
            incomplete.add(stage)
        record["stages"][stage] = {
            "fingerprint": settings_hash,
            "skipped": skipped,
            "seconds": round(time.perf_counter() - stage_started, 3),
            "summary": summary,
        }
        # Saved after every stage: a kill between stages keeps what finished.
        atomic_write_json(record_path, record)
    record["complete"] = all(entry["summary"].get("complete") is True for entry in record["stages"].values())
    record["blocked"] = {stage: entry["blocked"] for stage, entry in record["stages"].items() if "blocked" in entry}
    record["faults_per_stage"] = {stage: summary_faults(entry["summary"]) for stage, entry in record["stages"].items()}
    record["seconds"] = round(time.perf_counter() - started, 3)
    atomic_write_json(record_path, record)
    return record


def _blocked(stage: str, unfinished: list[str], layout: DataLayout) -> dict[str, Any]:
    """The record of a stage not run because a stage it reads ended with failed units; its old completion marker
    goes, since its outputs no longer match what is upstream."""
    layout.summary(stage).unlink(missing_ok=True)
    reason = f"needs complete {' and '.join(unfinished)} outputs"
    log.warning("%s not run: it %s", stage, reason)
    return {"skipped": False, "blocked": reason, "seconds": 0.0, "summary": {"stage": stage, "complete": False}}


def stage_lines(record: dict[str, Any]) -> list[str]:
    """One line per stage for the final console summary, with the lost work each stage retried."""
    lines = []
    for stage, entry in record["stages"].items():
        if "blocked" in entry:
            lines.append(f"{stage:<11} not run: it {entry['blocked']}")
            continue
        state = "skipped (outputs current)" if entry["skipped"] else f"ran in {entry['seconds']:.1f} s"
        faults = summary_faults(entry["summary"])
        retried = f"; retried {faults_text(faults)}" if any(faults.values()) else ""
        failed = len(summary_failures(entry["summary"]))
        failures = f"; {failed} unit{'s' if failed != 1 else ''} FAILED" if failed else ""
        lines.append(f"{stage:<11} {state}: {_headline(stage, entry['summary'])}{failures}{retried}")
    return lines


def _headline(stage: str, summary: dict[str, Any]) -> str:
    if stage == "ingest":
        c, p = summary["chapters"], summary["pages"]
        return (
            f"chapters {c['kept']} kept / {c['dropped']} dropped; pages {p['color']} colour, {p['bw']} B&W, "
            f"{p['error']} error"
        )
    if stage == "retrieval":
        e = summary["embeddings"]
        distinct = summary.get("distinct_ref_pages_per_frame", {})
        pages = (
            f"; distinct reference pages per frame min {distinct['min']} / median {distinct['median']} / max "
            f"{distinct['max']}"
            if distinct.get("frames")
            else ""
        )
        pool = summary.get("pool_refs_per_frame") or {}
        pages += f"; references per pool {pool['min']}-{pool['max']}" if pool else ""
        return (
            f"{summary['frames_ok']} frames with retrievals ({summary['frames_short']} short pools, "
            f"{summary['frames_excluded']} excluded, {summary['frames_error']} error); pages embedded "
            f"{e['pages_embedded']}, reused {e['pages_reused']}{pages}"
        )
    if stage == "screentone":
        return f"{summary['frames_rendered']} frames rendered, {summary['chapters_reused']} chapters reused"
    splits = ", ".join(
        f"{name} {split['nsamples']} samples in {split['nshards']} shards" for name, split in summary["splits"].items()
    )
    bench = summary["benchmark"]
    return (
        f"{splits}; benchmark {bench['chapters']} chapters; {summary['leakage']['duplicates']} leaked duplicates "
        "removed from train"
    )
