"""The shard stage: splits -> benchmark selection -> leakage check -> benchmark folder -> train and val shards.

Reads the outputs of ingestion (pages, chapters, page store), retrieval (retrievals, whole-page embeddings,
its summary with the encoder) and screentone (renderings at the training size and the GSRP size), and writes
``splits.parquet``, ``duplicates.parquet``, ``benchmark/``, ``shards/<split>/`` and ``shards/manifest.json``,
then ``shards.summary.json`` once everything is complete (a run with failed units returns its summary without
writing it; a rerun redoes only the missing units). Every step is deterministic for a seed, each shard and
benchmark chapter is a resumable unit, and a rerun after a kill ends with exactly the output of an
uninterrupted run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core.errors import PreconditionError
from pipelines.core.geometry import RANKS_PER_PATCH, RESAMPLE_LANCZOS, hires_size
from pipelines.core.layout import DataLayout
from pipelines.core.ledger import read_ledger
from pipelines.core.page_styles import line_extractor_id
from pipelines.core.samples import FIELDS, SAMPLE_FORMAT_VERSION, FrameRecord, SampleConfig
from pipelines.core.schemas import DUPLICATES, SPLITS, STATUS_OK
from pipelines.core.storage import (
    atomic_write_json,
    read_json,
    read_parquet,
    read_table,
    stable_hash,
    write_parquet,
)
from pipelines.runtime.heap import runs_with_frozen_heap
from pipelines.shards.benchmark import (
    BenchmarkConfig,
    eligible_chapters,
    eligible_per_series,
    read_frames,
    select_benchmark,
    write_benchmark,
)
from pipelines.shards.inputs import PlanInputs
from pipelines.shards.leakage import LeakageConfig, duplicate_train_pages, find_duplicates
from pipelines.shards.leakage_vectors import PageRef
from pipelines.shards.splits import (
    BENCH,
    TRAIN,
    VAL,
    SplitConfig,
    assign_splits,
    choose_bench_series,
    freeze_splits,
    split_counts,
    split_of,
)
from pipelines.shards.writer import GenerationPolicy, ShardConfig, code_version, write_split

STAGE = "shards"
SHARDED_SPLITS = (TRAIN, VAL)


@dataclass(frozen=True)
class ShardOptions:
    size: tuple[int, int] = (512, 800)
    hires_scale: float = 1.5
    shard_size: int = 1_000_000_000
    max_samples: int | None = None
    estimate_frames: int = 8
    jpeg_quality: int = 95
    val_fraction: float = 0.05
    bench_chapters: int = 30
    bench_refs: int = 40
    bench_bw: int = 50
    bench_size: tuple[int, int] | None = None  # default: the GSRP size
    bench_max_series_fraction: float = 0.1
    bench_series: tuple[str, ...] | None = None
    seed: int = 0
    renderer: str = "halftone"  # screentone renderer spec; its id selects the renderings to read
    line_extractor_weights: str | None = None  # erika.pth of the line art (None: XDoG); its id is checked
    leakage_threshold: float = 0.95
    leakage_confirm: bool = True
    ivf_min_train: int = 100_000
    drop_frames_referencing_duplicates: bool = True
    min_generation_samples: int | None = None  # new frames that make a generation; None: one shard's worth
    flush: bool = False  # write waiting new frames as a generation now, however few
    compact: bool = False  # merge small shards into a new generation (only on request)
    fit_resample: str = RESAMPLE_LANCZOS  # how frames, their tone and the patches are fitted (benchmark: Lanczos)

    def recorded(self) -> dict[str, Any]:
        """The options as fingerprints record them: the fit is named only when not the original Lanczos, so shards
        planned before it was an option stay current."""
        recorded = asdict(self)
        if self.fit_resample == RESAMPLE_LANCZOS:
            del recorded["fit_resample"]
        return recorded


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {what}")


def _encoder(layout: DataLayout) -> tuple[str, dict[str, Any]]:
    """The encoder id and fingerprint of the retrieval run whose retrievals.parquet is current."""
    summary = read_json(layout.summary("retrieval"))
    encoder = summary.get("encoder")
    if not isinstance(encoder, dict) or "encoder_id" not in encoder or "fingerprint" not in encoder:
        raise KeyError(f"{layout.summary('retrieval')} has no encoder id and fingerprint (key 'encoder')")
    return str(encoder["encoder_id"]), dict(encoder["fingerprint"])


def _renderer_id(spec: str, layout: DataLayout, sizes: list[tuple[int, int]]) -> str:
    from screentone.render import renderer_for

    renderer_id = renderer_for(spec).id
    folder = layout.screentone(renderer_id, *sizes[0])
    if not folder.exists():
        found = sorted(p.name for p in (layout.root / "screentone").glob("*")) if layout.root.exists() else []
        raise FileNotFoundError(
            f"no screentone renderings at {folder} (renderer {spec!r} -> {renderer_id}); run the screentone job "
            f"with the same renderer and size first (renderers present: {found or 'none'})"
        )
    return renderer_id


def _frames_referencing(layout: DataLayout, pages: set[str], chapters: set[str]) -> set[str]:
    """Frames whose ring shows a patch of one of `pages` (of `chapters`). A frame's pool holds pages of its own
    chapter only (`pipelines.core.pools`), so only those chapters' parts of the retrievals table are read."""
    if not pages:
        return set()
    table = read_table(layout.retrievals, columns=["frame_id", "rank", "ref_page_id"], keys=sorted(chapters))
    mask = pc.and_(
        pc.less(table["rank"], RANKS_PER_PATCH),
        pc.is_in(table["ref_page_id"], value_set=pa.array(sorted(pages), pa.string())),
    )
    return set(table.filter(mask).column("frame_id").to_pylist())


def _pool_status(layout: DataLayout, inputs: PlanInputs) -> dict[str, str]:
    """frame_id -> status of the frames whose reference pool is not ok ("excluded": too few references, so no
    retrievals by design); every other frame's pool is ok."""
    if not layout.pools.exists():
        return {}
    table = inputs.read(layout.pools, ["frame_id", "status"])
    table = table.filter(pc.not_equal(table["status"], STATUS_OK))  # the rest are ok: the caller's default
    return dict(zip(table.column("frame_id").to_pylist(), table.column("status").to_pylist(), strict=True))


def _records(frames: pa.Table) -> list[FrameRecord]:
    columns = [frames.column(name).to_pylist() for name in ("page_id", "series", "chapter_id", "chapter", "page_index")]
    return [FrameRecord(*values[:4], int(values[4])) for values in zip(*columns, strict=True)]


def _benchmark_chapters(layout: DataLayout) -> list[str] | None:
    """The chapters of the written benchmark (frozen once written), or None when there is none yet."""
    top = layout.benchmark / "benchmark.json"
    return [c["chapter_id"] for c in read_json(top)["chapters"]] if top.exists() else None


def _upstream(layout: DataLayout) -> dict[str, Any]:
    """The upstream settings that shape a sample: a change of them means other samples, so a new shard plan."""
    retrieval = read_json(layout.summary("retrieval"))
    screentone_summary = layout.summary("screentone")
    screentone = read_json(screentone_summary) if screentone_summary.exists() else {}
    return {
        "retrieval_run_id": retrieval.get("run_id"),
        "retrieval_params": retrieval.get("params"),
        "screentone_options": screentone.get("options"),
    }


def _check_fit(upstream: dict[str, Any], fit_resample: str, layout: DataLayout) -> None:
    """Frames are fitted as their tone was: a render made from another fit cannot pair with them."""
    rendered = (upstream["screentone_options"] or {}).get("fit_resample", RESAMPLE_LANCZOS)
    if rendered != fit_resample:
        raise PreconditionError(
            f"{layout.summary('screentone')}: the screentone was rendered from the {rendered} fit and the frames "
            f"would be fitted {fit_resample}: pass --fit-resample {rendered}, or render again with --fit-resample "
            f"{fit_resample}"
        )


def _input_tables(layout: DataLayout) -> dict[str, Any]:
    """Fingerprints of the tables this stage reads, as the upstream summaries record them: each built from the
    sha256 of the parts, computed by the tasks that wrote them, so no table is hashed here. Upstream writes are
    byte-deterministic, so a rerun of an upstream stage that changed nothing leaves these equal and the stage
    stays skipped."""
    return {stage: read_json(layout.summary(stage)).get("tables") for stage in ("ingest", "retrieval")}


def _embedding_versions(layout: DataLayout, encoder_id: str) -> dict[str, str] | None:
    """chapter_id -> embeddings version from the embeddings ledger, which keys the leakage state; None without a
    ledger (the leakage check then reads every vector and keeps no state)."""
    ledger = read_ledger(layout.ledger(f"embeddings-{encoder_id}"))
    return {chapter: entry.record["version"] for chapter, entry in ledger.items()} or None


@runs_with_frozen_heap
def run_shards(
    data: str | Path,
    options: ShardOptions | None = None,
    *,
    local: bool = False,
    rebuild: bool = False,
    verify: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Run the whole shard stage on OUT=`data`; returns (and writes last, when complete) the stage summary.

    Options come as a `ShardOptions` and/or as keyword overrides of its fields, e.g.
    ``run_shards(out, size=(512, 800), bench_chapters=30, local=True)``. The stage is skipped when its summary
    exists for the same options, code and input tables; `rebuild` replaces shards planned differently. `verify`
    runs it anyway, reads the input tables whole (not through the plan snapshot) and checks every shard against
    its marker, rewriting what is missing.
    """
    started = time.perf_counter()
    options = replace(options or ShardOptions(), **overrides)
    layout = DataLayout.at(data)
    for path, what in (
        (layout.summary("ingest"), "run the ingestion job (jobs.ingest) first"),
        (layout.summary("retrieval"), "run the retrieval job (jobs.retrieval) first"),
        (layout.retrievals, "run the retrieval job (jobs.retrieval) first"),
    ):
        _require(path, what)
    width, height = options.size
    sample_sizes = [(width, height), hires_size(width, height, options.hires_scale)]
    encoder_id, encoder_fingerprint = _encoder(layout)
    renderer_id = _renderer_id(options.renderer, layout, sample_sizes)
    lines_id = line_extractor_id(options.line_extractor_weights)
    version = code_version()
    upstream = _upstream(layout)
    _check_fit(upstream, options.fit_resample, layout)
    config_fingerprint = stable_hash(
        {
            "options": options.recorded(),
            "encoder": encoder_id,
            "renderer": renderer_id,
            "line_extractor": lines_id,
            "code": version,
            "upstream": upstream,
            "input_tables": _input_tables(layout),
        }
    )
    summary_path = layout.summary(STAGE)
    if not rebuild and not verify and summary_path.exists():
        previous = read_json(summary_path)
        if previous.get("config_fingerprint") == config_fingerprint and previous.get("complete"):
            return {**previous, "skipped": True}

    if not local:
        from pipelines.runtime.ray import init_ray

        init_ray()
    inputs = PlanInputs(layout, local, rebuild or verify)
    frames, chapters = read_frames(layout, inputs.read)
    bench_width, bench_height = options.bench_size or sample_sizes[1]
    bench_config = BenchmarkConfig(
        chapters=options.bench_chapters,
        refs=options.bench_refs,
        bw=options.bench_bw,
        width=bench_width,
        height=bench_height,
        seed=options.seed,
        renderer=options.renderer,
        line_extractor_weights=options.line_extractor_weights,
        jpeg_quality=options.jpeg_quality,
    )
    split_config = SplitConfig(
        val_fraction=options.val_fraction,
        seed=options.seed,
        bench_chapters=options.bench_chapters,
        bench_max_series_fraction=options.bench_max_series_fraction,
        bench_series=options.bench_series,
    )

    # 1. splits, benchmark series held out first
    all_series = chapters.filter(pc.equal(chapters["status"], STATUS_OK)).column("series").to_pylist()
    eligible = eligible_chapters(frames, bench_config)
    bench_series = choose_bench_series(all_series, eligible_per_series(eligible), split_config)
    splits = assign_splits(all_series, bench_series, split_config)
    frozen_bench = None
    if not rebuild and layout.splits.exists() and layout.shards_manifest.exists():
        # the dataset exists: series keep their split and the benchmark its chapters (new series go to train/val)
        splits = freeze_splits(read_parquet(layout.splits, SPLITS), splits, split_config)
        frozen_bench = _benchmark_chapters(layout)
    write_parquet(splits, layout.splits, SPLITS)
    split_by_series = split_of(splits)
    bench_series = sorted(s for s, name in split_by_series.items() if name == BENCH)
    bench_plan = select_benchmark(eligible, bench_series, bench_config, frozen=frozen_bench)

    # 2. leakage: benchmark pages and validation frames against training frames
    records = _records(frames)
    pool_status = _pool_status(layout, inputs)
    without_pool: dict[str, int] = {}
    by_split: dict[str, list[FrameRecord]] = {name: [] for name in (TRAIN, VAL, BENCH)}
    for record in records:
        status = pool_status.get(record.frame_id, STATUS_OK)
        if status != STATUS_OK and split_by_series[record.series] != BENCH:
            without_pool[status] = without_pool.get(status, 0) + 1  # no retrievals: never a sample
            continue
        by_split[split_by_series[record.series]].append(record)
    frame_of = {r.frame_id: r for r in records}
    held_out = [PageRef(p, frame_of[p].series, frame_of[p].chapter_id, BENCH) for p in bench_plan.page_ids]
    held_out += [PageRef(r.frame_id, r.series, r.chapter_id, VAL) for r in by_split[VAL]]
    train_refs = [PageRef(r.frame_id, r.series, r.chapter_id, TRAIN) for r in by_split[TRAIN]]
    leakage_config = LeakageConfig(
        threshold=options.leakage_threshold,
        confirm=options.leakage_confirm,
        ivf_min_train=options.ivf_min_train,
        seed=options.seed,
    )
    duplicates, leakage = find_duplicates(
        layout,
        encoder_id,
        held_out,
        train_refs,
        leakage_config,
        versions=_embedding_versions(layout, encoder_id),
        rebuild=rebuild,
    )
    write_parquet(duplicates, layout.duplicates, DUPLICATES)
    removed = duplicate_train_pages(duplicates)
    referencing = (
        _frames_referencing(layout, removed, {frame_of[p].chapter_id for p in removed}) - removed
        if options.drop_frames_referencing_duplicates
        else set()
    )
    train_frames = [r for r in by_split[TRAIN] if r.frame_id not in removed | referencing]
    reasons = {f: "leakage: near-duplicate of a held-out page" for f in removed}
    reasons |= {f: "leakage: its ring shows a near-duplicate of a held-out page" for f in referencing}
    leakage["train_frames_removed_as_duplicates"] = len(removed)
    leakage["train_frames_removed_referencing_duplicates"] = len(referencing)

    # 3. the benchmark folder
    benchmark = write_benchmark(layout.root, bench_plan, code_version=version, local=local, verify=verify)

    # 4. shards
    sample_config = SampleConfig(
        width=width,
        height=height,
        hires_scale=options.hires_scale,
        jpeg_quality=options.jpeg_quality,
        encoder_id=encoder_id,
        encoder_fingerprint=encoder_fingerprint,
        renderer_id=renderer_id,
        line_extractor_id=lines_id,
        code_version=version,
        inputs=upstream,
        fit_resample=options.fit_resample,
    )
    shard_config = ShardConfig(
        shard_size=options.shard_size,
        max_samples=options.max_samples,
        estimate_frames=options.estimate_frames,
        seed=options.seed,
    )
    split_frames = {TRAIN: train_frames, VAL: by_split[VAL]}
    policy = GenerationPolicy(options.min_generation_samples, options.flush, options.compact)
    results = {
        name: write_split(
            layout.root,
            name,
            split_frames[name],
            sample_config,
            shard_config,
            local=local,
            rebuild=rebuild,
            verify=verify,
            policy=policy,
            reasons=reasons,
        )
        for name in SHARDED_SPLITS
    }
    complete = all(r["complete"] for r in results.values()) and benchmark["complete"]
    counts = split_counts(splits)
    if complete:
        manifests = {name: read_json(layout.shards(name) / "manifest.json") for name in SHARDED_SPLITS}
        atomic_write_json(
            layout.shards_manifest,
            {
                "format": "webdataset",
                "sample_format_version": SAMPLE_FORMAT_VERSION,
                "fields": list(FIELDS),
                "sample": sample_config.to_json(),
                "shard": asdict(shard_config),
                "options": asdict(options),
                "code_version": version,
                "series_per_split": counts,
                "leakage": leakage,
                "benchmark": {"folder": "benchmark", "chapters": benchmark["chapters"]},
                "splits": {
                    name: {
                        "manifest": f"{name}/manifest.json",
                        "wids_index": f"{name}/index.wids.json",
                        **{
                            k: m[k]
                            for k in (
                                "generation",
                                "generation_manifest",
                                "pending_frames",
                                "nshards",
                                "nsamples",
                                "bytes",
                                "errors",
                                "shards",
                            )
                        },
                    }
                    for name, m in manifests.items()
                },
            },
        )
    summary = {
        "stage": STAGE,
        "complete": complete,
        "config_fingerprint": config_fingerprint,
        "encoder_id": encoder_id,
        "renderer_id": renderer_id,
        "line_extractor_id": lines_id,
        "series_per_split": counts,
        "frames_per_split": {name: len(by_split[name]) for name in by_split},
        "frames_without_pool": without_pool,
        "inputs": inputs.summary(),
        "leakage": leakage,
        "benchmark": benchmark,
        "splits": results,
        "manifest": str(layout.shards_manifest.relative_to(layout.root)) if complete else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if complete:  # the stage's completion marker: absent while any shard or benchmark chapter is missing
        atomic_write_json(summary_path, summary)
    return {**summary, "skipped": False}
