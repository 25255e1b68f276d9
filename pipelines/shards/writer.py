"""WebDataset shards of training samples: planned up front, written as independent resumable units.

Layout of one split under ``OUT/shards/<split>/``::

    plan.parquet                    SHARD_PLAN: every frame's shard and position, fixed before any tar exists
    plan.json                       how the plan was made (bytes-per-sample estimate, fingerprint); written last
    <split>-000000.tar              the samples, members named ``<frame_id>.<field>`` (see pipelines.core.samples)
    <split>-000000.index.parquet    SHARD_INDEX: key, position, byte offset and length of each sample
    <split>-000000.tar.done.json    the shard's stats (samples, bytes, sha256, error rows): written LAST
    manifest.json                   every shard with samples, bytes, sha256; the configuration; code versions
    index.wids.json                 the shard list `wids.ShardListDataset` reads (urls relative to this folder)
    errors.parquet                  SAMPLE_ERRORS: frames that could not become samples, with the reason

Why planning first: a shard is the unit of work, so its content must not depend on which other shards were
written before a kill. Frames are ordered deterministically (chapters in seeded-hash order, then frames of a
chapter in seeded-hash order) and cut into shards of `samples_per_shard`, derived from the byte target and
bytes per sample measured on a seeded handful of frames. Frames of one chapter stay together inside a shard
(each chapter's page store is read once and its fitted references are reused); readers shuffle across samples
(webdataset's shuffle buffer over shuffled shards, or wids' `ChunkedSampler`).

Tars are byte-deterministic: USTAR headers with a fixed mtime, uid/gid 0, no user names, mode 0444, members in
a fixed order. A tar is written under a temporary name and renamed, so no partial tar is ever visible under its
final name; the stats marker is written after the tar and its index. A rerun skips shards whose marker exists
and rewrites the others identically, so a run killed at any moment and rerun ends with the exact shard set of
an uninterrupted run.

Cost: one Ray task per shard (1 CPU). It works chapter by chapter, holding one chapter's encoded page store
and its pages fitted to the training size (about 1.2 MB per page at 512 x 800, `samples.ChapterPages`), and
streams samples to disk, so memory does not grow with the shard size. Sample assembly (decode, fit, ring,
encode) runs at about 5 samples/s per core at 512 x 800 (`bench/bench_shards.py`): about 20 core-hours for 300k
frames. Writing the tar is not the bottleneck: it runs at disk speed, hashing as it writes.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import json
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.core.layout import DataLayout
from pipelines.core.pagestore import read_chapter_pages
from pipelines.core.samples import (
    FIELDS,
    LINE_ART_VARIANTS,
    SAMPLE_FORMAT_VERSION,
    ChapterPages,
    FrameRecord,
    SampleConfig,
    SampleError,
    build_sample,
    require_sample_format,
    sample_nbytes,
)
from pipelines.core.schemas import (
    RETRIEVALS,
    SAMPLE_ERRORS,
    SCREENTONE,
    SHARD_INDEX,
    SHARD_PLAN,
    STATUS_OK,
    table_from_rows,
)
from pipelines.core.seeding import unit_hash
from pipelines.core.storage import (
    MARKER_SUFFIX,
    atomic_path,
    atomic_write_json,
    is_done,
    marker_path,
    read_json,
    read_marker,
    read_parquet,
    read_table,
    stable_hash,
    sweep_tmp,
    write_marker,
    write_parquet,
)
from pipelines.runtime.distributor import RunReport, Unit, run_units
from pipelines.shards.splits import hash_order

PACKAGE = "colorflow-data"
TAR_MTIME = 0
TAR_MODE = 0o444
TAR_BLOCK = 512
MEMBER_OVERHEAD = TAR_BLOCK + TAR_BLOCK // 2  # a header plus, on average, half a block of padding
SHARD_FORMAT_VERSION = 1
FALLBACK_BYTES_PER_PIXEL = 1.6  # sample bytes per training-size pixel when no frame could be measured


def shard_name(split: str, number: int) -> str:
    """Deterministic tar name from the split and shard number, e.g. ``train-000000.tar``."""
    if not split or "/" in split or "." in split:
        raise ValueError(f"split name {split!r} must be non-empty, without '/' or '.'")
    return f"{split}-{number:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name.removesuffix(".tar") + ".index.parquet"


# The shards stage's package; the project modules it imports complete the code scope. `pipelines.runtime` decides
# where and how often code runs (Ray start-up, the distributor, preconditions) and `pipelines.core.ledger` which
# chapters are read again, never what is written: they are left out.
SHARD_CODE_ROOTS = ("pipelines.shards",)
EXECUTION_ONLY = ("pipelines.runtime", "pipelines.core.ledger")
PROJECT_PACKAGES = ("pipelines", "screentone", "model", "training", "inference", "evaluation", "jobs")
REPO_ROOT = Path(__file__).resolve().parents[2]


def _project_imports(source: bytes, path: Path, module: str) -> set[str]:
    """Project modules a source file imports anywhere (top level or inside functions), by absolute name."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PROJECT_PACKAGES)
    return found


_SOURCES: dict[tuple[Path, str], tuple[tuple[int, int], bytes, frozenset[str]]] = {}


def _source(path: Path, module: str) -> tuple[bytes, frozenset[str]]:
    """A source file's bytes and project imports, read and parsed again only when its size or modification time
    changed: a process takes the code version once per stage run, and the AST walk of every file is most of it."""
    stat = path.stat()
    key = (stat.st_mtime_ns, stat.st_size)
    cached = _SOURCES.get((path, module))
    if cached is None or cached[0] != key:
        source = path.read_bytes()
        cached = _SOURCES[(path, module)] = (key, source, frozenset(_project_imports(source, path, module)))
    return cached[1], cached[2]


def _module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _shard_code(root: Path) -> dict[Path, bytes]:
    """path -> bytes of every file of `shard_code_files`."""
    seen: set[str] = set()
    files: dict[Path, bytes] = {}
    pending = [
        ".".join(path.relative_to(root).with_suffix("").parts)
        for package in SHARD_CODE_ROOTS
        for path in sorted(root.joinpath(*package.split(".")).glob("*.py"))
    ]
    while pending:
        module = pending.pop()
        if module in seen or module.startswith(EXECUTION_ONLY):
            continue
        seen.add(module)
        path = _module_file(root, module)
        if path is None:
            continue  # a name imported from a module (``from pipelines.x import name``), not a module itself
        files[path], imports = _source(path, module)
        parts = module.split(".")
        pending.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run their __init__
        pending.extend(imports)
    return files


def shard_code_files(root: Path | None = None) -> list[Path]:
    """The source files that produce shard bytes: the modules of the shards stage and every project module they
    import, transitively (package ``__init__`` files included), less the execution-only ones (`EXECUTION_ONLY`).
    Editing anything else (the other stages' drivers, ``model/`` apart from the line extractor network the
    benchmark's line art runs, ``training/``, ``jobs/``, inference, evaluation, reports) leaves the code version,
    and so finished shards, untouched."""
    return sorted(_shard_code(root or REPO_ROOT))


@functools.cache
def _package_version() -> str:
    """The installed package's version, looked up once per process (the lookup scans every installed package)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def code_version(root: Path | None = None) -> dict[str, Any]:
    """Package version and a sha256 of the sources that produce shard bytes (`shard_code_files`).

    The source hash names that code exactly, and is the same in a git checkout, an installed copy and the working
    directory `ray job submit` uploads (where there is no .git), so equal code writes equal samples everywhere.
    Files are parsed once per process and again only when changed (`_source`): the walk then costs a stat each.
    """
    version = _package_version()
    root = root or REPO_ROOT
    code = _shard_code(root)
    digest = hashlib.sha256()
    for path in sorted(code):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + code[path] + b"\0")
    return {"package": PACKAGE, "version": version, "source_sha256": digest.hexdigest()}


# ---- tar writing ---------------------------------------------------------------------------------------------


def _header(name: str, size: int) -> bytes:
    """A USTAR header with fixed metadata: equal members give equal bytes on any machine, at any time."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


@dataclass
class TarResult:
    nbytes: int
    sha256: str
    entries: list[dict[str, Any]]  # key, position, offset, nbytes per sample


class _HashingWriter:
    """Writes to a file and hashes what it writes, so the sha256 needs no second read of the tar."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.digest, self.offset = fh, hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        self.fh.write(data)
        self.digest.update(data)
        self.offset += len(data)


def write_tar(path: str | Path, samples: Iterable[Mapping[str, Any]], fields: tuple[str, ...] = FIELDS) -> TarResult:
    """Write samples (dicts with ``__key__`` and `fields`) to a byte-deterministic tar, atomically.

    Each sample's members are contiguous and in `fields` order; the tar appears under `path` only complete.
    The layout is what `tarfile` writes (USTAR headers, 512-byte blocks, two zero blocks, padding to a 10 KiB
    record), written directly so the bytes go to disk once and are hashed on the way.
    """
    entries: list[dict[str, Any]] = []
    with atomic_path(path) as tmp:
        with open(tmp, "wb", buffering=1 << 20) as fh:
            out = _HashingWriter(fh)
            for position, sample in enumerate(samples):
                key = str(sample["__key__"])
                if "." in key or "/" in key:
                    raise ValueError(f"sample key {key!r} contains '.' or '/': readers would split it wrongly")
                missing = [f for f in fields if f not in sample]
                if missing:
                    raise ValueError(f"sample {key!r} lacks fields {missing}; every sample needs {list(fields)}")
                start = out.offset
                for field_name in fields:
                    data = bytes(sample[field_name])
                    out.write(_header(f"{key}.{field_name}", len(data)))
                    out.write(data)
                    out.write(b"\0" * (-len(data) % TAR_BLOCK))
                entries.append({"key": key, "position": position, "offset": start, "nbytes": out.offset - start})
            out.write(b"\0" * (2 * TAR_BLOCK))
            out.write(b"\0" * (-out.offset % tarfile.RECORDSIZE))
        nbytes, digest = out.offset, out.digest.hexdigest()
    return TarResult(nbytes=nbytes, sha256=digest, entries=entries)


# ---- upstream inputs of a shard ------------------------------------------------------------------------------


def read_screentone_chapter(
    layout: DataLayout, renderer_id: str, size: tuple[int, int], chapter_id: str, line_extractor_id: str = ""
) -> dict[tuple[str, str], bytes | str]:
    """(frame_id, variant) -> PNG bytes, or the error text the screentone job recorded for it.

    Tone rows must come from `renderer_id`, line-art rows from `line_extractor_id`. A chapter with no rendering
    file gives an empty dict: its frames become error rows, not a crash.
    """
    path = layout.screentone(renderer_id, *size) / f"{chapter_id}.parquet"
    if not path.exists():
        return {}
    table = read_parquet(path, SCREENTONE)
    out: dict[tuple[str, str], bytes | str] = {}
    line_art = set(LINE_ART_VARIANTS.values())
    for row in table.to_pylist():
        cell = (row["frame_id"], row["variant"])
        expected = line_extractor_id if row["variant"] in line_art else renderer_id
        if row["renderer"] != expected:
            out[cell] = f"screentone row {row['variant']!r} made by {row['renderer']!r}, expected {expected!r}"
        elif row["status"] != STATUS_OK or row["image"] is None:
            out[cell] = f"screentone job failed on it: {row['error']}"
        else:
            out[cell] = row["image"]
    return out


def read_retrievals(layout: DataLayout, chapter_ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """frame_id -> its retrieval rows, reading only the given chapters' parts of the retrievals table (no other
    part, not even a footer, is opened)."""
    chapter_ids = sorted(set(chapter_ids))
    if not chapter_ids:
        return {}
    if not layout.retrievals.exists():
        raise FileNotFoundError(f"{layout.retrievals} is missing: run the retrieval job (jobs.retrieval) first")
    table = read_table(layout.retrievals, RETRIEVALS, keys=chapter_ids)
    out: dict[str, list[dict[str, Any]]] = {}
    for row in table.to_pylist():
        out.setdefault(row["frame_id"], []).append(row)
    return out


def iter_frame_samples(
    layout: DataLayout, frames: list[FrameRecord], config: SampleConfig
) -> Iterator[tuple[FrameRecord, dict[str, Any] | None, str | None]]:
    """Build the samples of `frames` in order: (frame, sample, None) or (frame, None, error) for each.

    Consecutive frames of one chapter share one read of its page store, screentone and retrieval rows.
    """
    retrievals = read_retrievals(layout, {f.chapter_id for f in frames})
    current: str | None = None
    pages: ChapterPages | None = None
    tones: dict[tuple[str, str], bytes | str] = {}
    chapter_error: str | None = None
    for frame in frames:
        if frame.chapter_id != current:
            current, chapter_error = frame.chapter_id, None
            try:
                pages = ChapterPages(read_chapter_pages(layout, frame.chapter_id))
            except FileNotFoundError:
                pages, chapter_error = None, f"chapter {frame.chapter_id} has no page store file"
            except Exception as exc:  # noqa: BLE001 - an unreadable chapter fails its frames, not the shard
                pages, chapter_error = None, f"chapter {frame.chapter_id}: page store unreadable: {exc}"
            # both variants live in the training size's folder: "train" (W x H) and "hires" (GSRP size)
            tones = read_screentone_chapter(
                layout, config.renderer_id, config.size, frame.chapter_id, config.line_extractor_id
            )
        if chapter_error is not None or pages is None:
            yield frame, None, f"frame {frame.frame_id}: {chapter_error}"
            continue
        tone = tones.get((frame.frame_id, "train"))
        hires = tones.get((frame.frame_id, "hires"))
        line_art = {variant: tones.get((frame.frame_id, variant)) for variant in LINE_ART_VARIANTS.values()}
        failed = next((t for t in (tone, hires, *line_art.values()) if isinstance(t, str)), None)
        if failed is not None:
            yield frame, None, f"frame {frame.frame_id}: {failed}"
            continue
        try:
            rows = retrievals.get(frame.frame_id, [])
            sample = build_sample(frame, pages, rows, tone, hires, config, line_art)
        except SampleError as exc:
            yield frame, None, str(exc)
            continue
        yield frame, sample, None


# ---- planning ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardConfig:
    shard_size: int = 1_000_000_000  # target bytes per tar
    max_samples: int | None = None  # cap on samples per tar
    estimate_frames: int = 8  # frames built to measure bytes per sample
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {self.shard_size}")
        if self.max_samples is not None and self.max_samples <= 0:
            raise ValueError(f"max_samples must be positive, got {self.max_samples}")
        if self.estimate_frames <= 0:
            raise ValueError(f"estimate_frames must be positive, got {self.estimate_frames}")


def samples_per_shard(config: ShardConfig, bytes_per_sample: float) -> int:
    per = max(1, int(config.shard_size // max(1.0, bytes_per_sample)))
    return min(per, config.max_samples) if config.max_samples is not None else per


def plan_order(frames: Iterable[FrameRecord], seed: int) -> list[FrameRecord]:
    """Chapters in seeded-hash order, each chapter's frames in seeded-hash order (not page order)."""
    by_chapter: dict[str, list[FrameRecord]] = {}
    for frame in frames:
        by_chapter.setdefault(frame.chapter_id, []).append(frame)
    ordered: list[FrameRecord] = []
    for chapter_id in hash_order(by_chapter, seed, "shard-chapter"):
        chapter_frames = by_chapter[chapter_id]
        ordered += sorted(chapter_frames, key=lambda f: (unit_hash(seed, "shard-frame", f.frame_id), f.frame_id))
    ids = [f.frame_id for f in ordered]
    if len(set(ids)) != len(ids):
        raise ValueError("a frame id appears twice among the frames to shard")
    return ordered


def estimate_bytes_per_sample(
    layout: DataLayout, frames: list[FrameRecord], config: SampleConfig, n: int, seed: int
) -> dict[str, Any]:
    """Mean tar bytes per sample over a seeded handful of frames (members + headers + padding)."""
    by_id = {f.frame_id: f for f in frames}
    chosen = [by_id[i] for i in hash_order(by_id, seed, "estimate")[:n]]
    chosen.sort(key=lambda f: (f.chapter_id, f.frame_id))
    sizes = [
        sample_nbytes(sample) + MEMBER_OVERHEAD * len(FIELDS)
        for _, sample, _ in iter_frame_samples(layout, chosen, config)
        if sample is not None
    ]
    if sizes:
        return {"method": "measured", "frames": len(sizes), "bytes_per_sample": sum(sizes) / len(sizes)}
    fallback = FALLBACK_BYTES_PER_PIXEL * config.width * config.height * (1 + config.hires_scale**2)
    return {"method": "fallback: no frame could be built", "frames": 0, "bytes_per_sample": fallback}


# ---- one shard: the unit of work ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardTask:
    data: str
    split: str
    name: str
    frames: tuple[FrameRecord, ...]
    sample_config: SampleConfig
    generation: int = 0  # the generation that (re)writes this shard


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Build a shard's samples, write its tar, its index and, last, its stats marker."""
    layout = DataLayout.at(task.data)
    folder = layout.shards(task.split)
    tar_path = folder / task.name
    errors: list[dict[str, Any]] = []
    meta: list[FrameRecord] = []

    def samples() -> Iterator[dict[str, Any]]:
        for frame, sample, error in iter_frame_samples(layout, list(task.frames), task.sample_config):
            if sample is None:
                errors.append(
                    {
                        "frame_id": frame.frame_id,
                        "series": frame.series,
                        "chapter_id": frame.chapter_id,
                        "split": task.split,
                        "shard": task.name,
                        "error": error,
                    }
                )
                continue
            meta.append(frame)
            yield sample

    result = write_tar(tar_path, samples())
    index_rows = [
        {**entry, "frame_id": f.frame_id, "series": f.series, "chapter_id": f.chapter_id, "shard": task.name}
        for entry, f in zip(result.entries, meta, strict=True)
    ]
    write_parquet(table_from_rows(index_rows, SHARD_INDEX), folder / index_name(task.name), SHARD_INDEX)
    stats = {
        "name": task.name,
        "split": task.split,
        "index": index_name(task.name),
        "nsamples": len(result.entries),
        "planned": len(task.frames),
        "bytes": result.nbytes,
        "sha256": result.sha256,
        "errors": errors,
        "code_version": dict(task.sample_config.code_version),
        "shard_format_version": SHARD_FORMAT_VERSION,
        "sample_format_version": SAMPLE_FORMAT_VERSION,
        "generation": task.generation,
    }
    write_marker(tar_path, stats)
    return {"nsamples": stats["nsamples"], "errors": len(errors), "bytes": result.nbytes}


def _write_shard_unit(unit: Unit) -> dict[str, Any]:
    return write_shard(unit.payload)


# ---- a whole split: append-only generations --------------------------------------------------------------------


class PlanMismatchError(RuntimeError):
    """Shards exist from another configuration or layout; mixing them would corrupt the dataset."""


@dataclass(frozen=True)
class GenerationPolicy:
    """When new frames become a generation: at `min_samples` new frames (None: one shard's worth), or at once with
    `flush`. The first generation of a split is always written whole."""

    min_samples: int | None = None
    flush: bool = False
    compact: bool = False  # merge every shard smaller than a full one into new shards (on purpose, never implicit)


def generation_name(generation: int) -> str:
    return f"g{generation:04d}"


def generation_shard_name(split: str, generation: int, number: int) -> str:
    """e.g. ``train-g0003-000000.tar``: a new generation's shards never reuse an earlier name."""
    return shard_name(f"{split}-{generation_name(generation)}", number)


def _config_fingerprint(sample_config: SampleConfig, shard_config: ShardConfig) -> str:
    config = sample_config.to_json()
    config.pop("code_version")  # a code change resumes and appends; each shard and generation records its version
    return stable_hash({"sample": config, "shard": asdict(shard_config)})


def _completed_markers(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*.tar{MARKER_SUFFIX}")) if folder.exists() else []


def _frame(row: Mapping[str, Any]) -> FrameRecord:
    return FrameRecord(row["frame_id"], row["series"], row["chapter_id"], row["chapter"], row["page_index"])


def plan_frames(plan: pa.Table) -> dict[str, list[FrameRecord]]:
    """shard name -> its frames in planned order."""
    out: dict[str, list[FrameRecord]] = {}
    for row in plan.to_pylist():
        out.setdefault(row["shard"], []).append(_frame(row))
    return out


def read_split_state(folder: Path) -> tuple[dict[str, Any] | None, pa.Table | None]:
    """The split's plan.json (generations, shards and the generation each was last written in) and plan.parquet,
    or (None, None) for a split never written. Refuses what this code cannot extend: another sample format, or
    shards from before generations."""
    plan_json, plan_parquet = folder / "plan.json", folder / "plan.parquet"
    if not plan_json.exists():
        if _completed_markers(folder):
            raise PlanMismatchError(f"{folder} holds shards but no plan.json; rerun with --rebuild to replace them")
        return None, None
    state = read_json(plan_json)
    if "generations" not in state:
        raise PlanMismatchError(
            f"{folder} holds shards written before append-only generations (one plan for every frame); rerun with "
            "--rebuild once to rewrite them as generation g0000"
        )
    require_sample_format([state.get("sample_format_version")], str(folder))
    return state, read_parquet(plan_parquet, SHARD_PLAN)


def plan_generation(
    layout: DataLayout,
    split: str,
    frames: list[FrameRecord],
    sample_config: SampleConfig,
    shard_config: ShardConfig,
    policy: GenerationPolicy,
    reasons: Mapping[str, str],
) -> tuple[dict[str, Any], pa.Table, int]:
    """The split's state after this run, its plan, and the new frames left pending.

    The stored state when nothing changed (or a generation is unfinished); else a new generation appended: frames
    gone from `frames` leave the shards that held them (rewritten under their names, or deleted when emptied;
    `reasons` says why per frame), new frames go to new shards of the new generation once `policy` says so, and
    with `policy.compact` the frames of every shard below a full one move to new shards of the new generation.
    The plan is stored (plan.parquet, then plan.json) before any tar is written."""
    folder = layout.shards(split)
    fingerprint = _config_fingerprint(sample_config, shard_config)
    state, plan = read_split_state(folder)
    if state is not None and state["config_fingerprint"] != fingerprint:
        raise PlanMismatchError(
            f"{folder} holds shards made with other sample or shard settings (fingerprint "
            f"{state['config_fingerprint'][:12]}, now {fingerprint[:12]}); rerun with --rebuild to replace them, or "
            "point --data at the same options"
        )
    if state is not None and state.get("open") is not None:
        return state, plan, 0  # a generation planned by a run that did not finish: finish it first
    state = state or {
        "split": split,
        "config_fingerprint": fingerprint,
        "sample_format_version": SAMPLE_FORMAT_VERSION,
        "generations": [],
        "shards": {},
        "samples_per_shard": None,
        "open": None,
    }
    plan = plan if plan is not None else table_from_rows([], SHARD_PLAN)
    planned = set(plan.column("frame_id").to_pylist())
    wanted = {f.frame_id for f in frames}
    gone = planned - wanted
    new = [f for f in frames if f.frame_id not in planned]
    if state["samples_per_shard"] is None and new:
        estimate = estimate_bytes_per_sample(
            layout, new, sample_config, shard_config.estimate_frames, shard_config.seed
        )
        state["samples_per_shard"] = samples_per_shard(shard_config, estimate["bytes_per_sample"])
        state["estimate"] = estimate
    per_shard = state["samples_per_shard"] or 1
    threshold = per_shard if policy.min_samples is None else policy.min_samples
    append = bool(new) and (not state["generations"] or policy.flush or len(new) >= threshold)
    pending = 0 if append else len(new)
    if not gone and not append and not policy.compact:
        return state, plan, pending  # new frames wait: no row of the plan is needed
    rows = plan.to_pylist()
    sizes = Counter(r["shard"] for r in rows if r["frame_id"] not in gone)
    small = sorted(name for name, count in sizes.items() if count < per_shard) if policy.compact else []
    if len(small) < 2:
        small = []
    if not gone and not append and not small:
        return state, plan, pending
    generation = len(state["generations"])
    touched = sorted({r["shard"] for r in rows if r["frame_id"] in gone})
    moved = [_frame(r) for r in rows if r["shard"] in small and r["frame_id"] not in gone]
    kept_rows = [r for r in rows if r["frame_id"] not in gone and r["shard"] not in small]
    position: dict[str, int] = {}
    for row in kept_rows:  # a shard that lost frames keeps the order of the others
        row["position"] = position[row["shard"]] = position.get(row["shard"], -1) + 1
    added_plan = plan_order(moved + (new if append else []), shard_config.seed)
    new_rows = [
        {**asdict(f), "shard": generation_shard_name(split, generation, i // per_shard), "position": i % per_shard}
        for i, f in enumerate(added_plan)
    ]
    emptied = sorted((set(touched) | set(small)) - set(position))
    added_shards = sorted({r["shard"] for r in new_rows})
    replaced = sorted(set(touched) - set(emptied))
    for name in [*replaced, *added_shards]:
        state["shards"][name] = generation
    for name in emptied:
        state["shards"].pop(name, None)
    by_id = {r["frame_id"]: r for r in rows}
    state["open"] = {
        "generation": generation,
        "name": generation_name(generation),
        "shards_added": added_shards,
        "shards_replaced": replaced,
        "shards_removed": emptied,
        "frames_added": len(new_rows) - len(moved),
        "frames_moved_by_compaction": len(moved),
        "frames_removed": [
            {
                "frame_id": frame_id,
                "chapter_id": by_id[frame_id]["chapter_id"],
                "shard": by_id[frame_id]["shard"],
                "reason": reasons.get(frame_id, "no longer in the input (taken down or changed upstream)"),
            }
            for frame_id in sorted(gone)
        ],
        "code_version": dict(sample_config.code_version),
        "sample_format_version": SAMPLE_FORMAT_VERSION,
    }
    plan = table_from_rows(kept_rows + new_rows, SHARD_PLAN)
    write_parquet(plan, folder / "plan.parquet", SHARD_PLAN)
    atomic_write_json(folder / "plan.json", state)  # last: the generation's plan is its own marker
    return state, plan, pending


def _shard_done(folder: Path, name: str, generation: int, verify: bool = False) -> bool:
    """Written, and by the generation that last planned it (a replaced shard's older marker does not count);
    with `verify`, its tar also has the size its marker records and its index exists (a tar deleted or cut short
    by hand is written again; its sha256 is the trainers' `--verify_shards` check, too slow for every run)."""
    if not is_done(folder / name):
        return False
    marker = read_marker(folder / name)
    if marker.get("generation", 0) != generation:
        return False
    if not verify:
        return True
    tar = folder / name
    return tar.is_file() and tar.stat().st_size == marker.get("bytes") and (folder / marker["index"]).is_file()


def finalise_split(layout: DataLayout, split: str, state: dict[str, Any], pending: int = 0) -> dict[str, Any]:
    """Close the open generation (if any) and write the split's manifest, its generation snapshot, the wids index
    and the errors table from the shard markers (all must exist).

    Files of shards no longer planned (emptied by removals, or renamed into place just before a kill and then
    replanned) are deleted first, so the folder holds exactly the current shard set.
    """
    folder = layout.shards(split)
    names = sorted(state["shards"])
    keep = {name for tar in names for name in (tar, index_name(tar), marker_path(folder / tar).name)}
    for path in folder.glob(f"{split}-*"):
        if path.name not in keep:
            path.unlink()
    if state.get("open") is not None:
        state["generations"].append(state.pop("open"))
        state["open"] = None
        atomic_write_json(folder / "plan.json", state)
    stats = [read_marker(folder / name) for name in names]
    shards = [
        {
            "name": s["name"],
            "url": s["name"],
            "index": s["index"],
            "generation": s.get("generation", 0),
            "nsamples": s["nsamples"],
            "planned": s["planned"],
            "bytes": s["bytes"],
            "sha256": s["sha256"],
            "errors": len(s["errors"]),
        }
        for s in stats
    ]
    errors = [e for s in stats for e in s["errors"]]
    write_parquet(table_from_rows(errors, SAMPLE_ERRORS), folder / "errors.parquet", SAMPLE_ERRORS)
    wids_index = {
        "wids_version": 1,
        "name": split,
        "shardlist": [{"url": s["url"], "nsamples": s["nsamples"]} for s in shards if s["nsamples"] > 0],
    }
    atomic_write_json(folder / "index.wids.json", wids_index)
    versions = sorted({json.dumps(s["code_version"], sort_keys=True) for s in stats})
    current = len(state["generations"]) - 1
    manifest = {
        "split": split,
        "generation": current,
        "generation_manifest": f"manifest.{generation_name(current)}.json" if current >= 0 else None,
        "shards": shards,
        "nshards": len(shards),
        "nsamples": sum(s["nsamples"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "errors": len(errors),
        "pending_frames": pending,
        "samples_per_shard": state["samples_per_shard"],
        "generations": state["generations"],
        "code_versions": [json.loads(v) for v in versions],
        "wids_index": "index.wids.json",
        "errors_table": "errors.parquet",
        "shard_format_version": SHARD_FORMAT_VERSION,
        "sample_format_version": SAMPLE_FORMAT_VERSION,
    }
    if current >= 0:  # immutable: a training run resumed later reads the shard list it started with
        atomic_write_json(folder / manifest["generation_manifest"], manifest)
    atomic_write_json(folder / "manifest.json", manifest)
    return manifest


def write_split(
    data: str | Path,
    split: str,
    frames: list[FrameRecord],
    sample_config: SampleConfig,
    shard_config: ShardConfig,
    *,
    local: bool = False,
    rebuild: bool = False,
    verify: bool = False,
    policy: GenerationPolicy = GenerationPolicy(),
    reasons: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Bring one split to `frames` as append-only generations; a split with nothing to change is not touched.

    Existing tars keep their names and bytes, except those that held a removed frame (rewritten without it under
    their name, or deleted when emptied); new frames go to new shards of a new generation (`policy`). `rebuild`
    deletes the split first (the only way to change sample format or settings); `verify` checks every shard against
    its marker even when nothing changed, rewriting any that is missing or damaged.
    """
    layout = DataLayout.at(data)
    folder = layout.shards(split)
    if rebuild and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / "manifest.json"
    before = read_json(folder / "plan.json") if (folder / "plan.json").exists() else None
    state, plan, pending = plan_generation(layout, split, frames, sample_config, shard_config, policy, reasons or {})
    changed = state.get("open") is not None
    if not verify and not changed and manifest_path.exists() and state == before:
        manifest = read_json(manifest_path)
        return {
            "split": split,
            "complete": True,
            "touched": False,
            "generation": manifest["generation"],
            "pending_frames": pending,
            **{k: manifest[k] for k in ("nshards", "nsamples", "bytes", "errors")},
            "manifest": str(manifest_path.relative_to(layout.root)),
            **{k: v for k, v in RunReport().summary().items() if k != "seconds"},
            "units_skipped": len(state["shards"]),
        }
    sweep_tmp(folder)
    by_shard = plan_frames(plan)
    names = sorted(state["shards"])
    units = [
        Unit(
            key=name,
            payload=ShardTask(
                str(layout.root), split, name, tuple(by_shard.get(name, ())), sample_config, state["shards"][name]
            ),
        )
        for name in names
    ]
    report = run_units(
        units,
        _write_shard_unit,
        is_done=lambda unit: _shard_done(folder, unit.key, state["shards"][unit.key], verify),
        desc=f"shards/{split}",
        local=local,
    )
    complete = all(_shard_done(folder, name, state["shards"][name]) for name in names)
    opened = state.get("open") or {}
    summary: dict[str, Any] = {
        "split": split,
        "complete": complete,
        "touched": True,
        "generation": opened.get("generation", len(state["generations"]) - 1),
        "shards_added": len(opened.get("shards_added", [])),
        "shards_replaced": len(opened.get("shards_replaced", [])),
        "shards_removed": len(opened.get("shards_removed", [])),
        "frames_removed": len(opened.get("frames_removed", [])),
        "pending_frames": pending,
        "samples_per_shard": state["samples_per_shard"],
        **report.summary(),
    }
    if complete:
        manifest = finalise_split(layout, split, state, pending)
        summary.update(
            {k: manifest[k] for k in ("nshards", "nsamples", "bytes", "errors")},
            manifest=str(manifest_path.relative_to(layout.root)),
        )
    return summary
