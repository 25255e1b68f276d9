"""The whole data pipeline in order: ingest -> retrieval -> screentone -> shards, then an optional report.

A stage is skipped when its summary exists and the pipeline's record says it completed with the same settings
(and, for ingestion, the same chapters in the input); when a stage runs again, every later stage runs too. Each
stage is itself resumable unit by unit, so even a stage that runs again redoes only what is missing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from pipelines.core.encoders import DEFAULT_ENCODER
from pipelines.core.geometry import CompositeLayout
from pipelines.core.layout import DataLayout
from pipelines.core.sources import input_signature
from pipelines.core.storage import atomic_write_json, read_json, stable_hash
from pipelines.ingest.stage import DEFAULT_MIN_COLOR_PAGES
from pipelines.retrieval.stage import RetrievalParams
from pipelines.runtime.preconditions import (
    check_chapters,
    check_encoder,
    check_input_root,
    check_output_creatable,
    created_folder,
)
from pipelines.shards.stage import ShardJobOptions, run_shards

log = logging.getLogger(__name__)

STAGES = ("ingest", "retrieval", "screentone", "shards")
RECORD = "pipeline.summary.json"


@dataclass(frozen=True)
class PipelineOptions:
    """Settings of every stage; each stage's slice of it decides whether that stage's outputs are current.

    Sizes, seed and screentone renderer live in `shards` and are shared by every stage that uses them.
    """

    shards: ShardJobOptions = ShardJobOptions()
    # ingestion
    min_color_pages: int = DEFAULT_MIN_COLOR_PAGES
    chapters_per_task: int = 4
    # retrieval
    encoder: str = DEFAULT_ENCODER
    refs: int = 20
    min_refs: int = 10
    k_per_patch: int = 3
    max_per_page: int | None = None  # retrieval diversity cap (beyond the paper); None: independent top-k

    def stage_settings(self, stage: str) -> dict[str, Any]:
        shards = self.shards
        by_stage = {
            "ingest": {"min_color_pages": self.min_color_pages},
            "retrieval": {
                "encoder": self.encoder,
                "refs": self.refs,
                "min_refs": self.min_refs,
                "k_per_patch": self.k_per_patch,
                **({"max_per_page": self.max_per_page} if self.max_per_page is not None else {}),
                "size": list(shards.size),
                "seed": shards.seed,
            },
            "screentone": {
                "renderer": shards.renderer,
                "size": list(shards.size),
                "hires_scale": shards.hires_scale,
                "seed": shards.seed,
            },
            "shards": asdict(shards),
        }
        return by_stage[stage]


def _run_stage(stage: str, input_root: str, layout: DataLayout, options: PipelineOptions, local: bool) -> dict:
    shards = options.shards
    width, height = shards.size
    if stage == "ingest":
        from pipelines.ingest.stage import IngestOptions, run_ingest

        return run_ingest(
            input_root,
            layout.root,
            options=IngestOptions(min_color_pages=options.min_color_pages),
            chapters_per_task=options.chapters_per_task,
            local=local,
        )
    if stage == "retrieval":
        from pipelines.retrieval.stage import run_retrieval

        return run_retrieval(
            layout.root,
            encoder=options.encoder,
            refs=options.refs,
            min_refs=options.min_refs,
            k_per_patch=options.k_per_patch,
            max_per_page=options.max_per_page,
            seed=shards.seed,
            width=width,
            height=height,
            local=local,
        )
    if stage == "screentone":
        from pipelines.screentone.stage import ScreentoneOptions, run_screentone

        screentone = ScreentoneOptions(
            renderer=shards.renderer, width=width, height=height, hires_scale=shards.hires_scale, seed=shards.seed
        )
        return run_screentone(str(layout.root), screentone, local=local)
    from pipelines.shards.writer import PlanMismatchError

    try:
        return run_shards(layout.root, shards, local=local)
    except PlanMismatchError as exc:
        # Upstream outputs changed (new chapters, another encoder...): the old shards describe other data.
        log.warning("shards were planned for other inputs; rebuilding them (%s)", exc)
        return run_shards(layout.root, shards, local=local, rebuild=True)


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
    check_chapters(input_root)
    output = check_output_creatable(output)
    width, height = options.shards.size
    CompositeLayout(width, height)  # the training size must suit the composite: refused before any work
    retrieval = {"k_per_patch": options.k_per_patch, "max_per_page": options.max_per_page}
    RetrievalParams(options.refs, options.min_refs, width=width, height=height, **retrieval)  # validates early
    check_encoder(options.encoder)
    with created_folder(output):
        return _run_pipeline(input_root, DataLayout.at(output), options, local, ray_address, num_cpus)


def _run_pipeline(
    input_root: str,
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
    started = time.perf_counter()
    for stage in STAGES:
        settings = options.stage_settings(stage)
        if stage == "ingest":
            settings = {**settings, "input": input_root, "chapters": input_signature(input_root)}
        settings_hash = stable_hash(settings, 16)
        before = previous.get(stage, {})
        current = (
            not rerun_downstream
            and before.get("fingerprint") == settings_hash
            and layout.summary(stage).exists()
            and read_json(layout.summary(stage)).get("complete") is True
        )
        stage_started = time.perf_counter()
        if current:
            summary, skipped = read_json(layout.summary(stage)), True
        else:
            summary, skipped = _run_stage(stage, input_root, layout, options, local), False
            rerun_downstream = True
        record["stages"][stage] = {
            "fingerprint": settings_hash,
            "skipped": skipped,
            "seconds": round(time.perf_counter() - stage_started, 3),
            "summary": summary,
        }
        # Saved after every stage: a kill between stages keeps what finished.
        atomic_write_json(record_path, record)
    record["complete"] = all(entry["summary"].get("complete") is True for entry in record["stages"].values())
    record["seconds"] = round(time.perf_counter() - started, 3)
    atomic_write_json(record_path, record)
    return record


def stage_lines(record: dict[str, Any]) -> list[str]:
    """One line per stage for the final console summary."""
    lines = []
    for stage, entry in record["stages"].items():
        state = "skipped (outputs current)" if entry["skipped"] else f"ran in {entry['seconds']:.1f} s"
        lines.append(f"{stage:<11} {state}: {_headline(stage, entry['summary'])}")
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
