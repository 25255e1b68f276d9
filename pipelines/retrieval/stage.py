"""The retrieval cache job (ColorFlow's Retrieval-Augmented Pipeline): pools, patch embeddings, top-k per frame.

Frames are the stored colour pages of kept chapters (the page store written by ingestion); a frame's pool
candidates are the other frames of its chapter. Two stages, both resumable chapter by chapter:

1. Embed. Each page is embedded once per encoder, whatever number of pools it appears in: the page is fitted
   to W x H (`geometry.fit_image`), 4 query crops are cut from its greyscale version and 5 reference crops (the
   same 4 + the whole page) from the colour page, so 9 vectors per page, stored L2-normalised as fp16 per
   chapter with the page ids, patch indices and the encoder fingerprint. Decoding and cropping run in CPU tasks;
   the encoder runs in a pool of Ray actors (one per GPU, fp16; on CPU-only clusters actors of `encoder_threads`
   CPUs spread over every node, grown while chapters wait).
   A rerun embeds only pages it has not embedded yet (new or changed bytes); a new encoder or page size gets its
   own folder beside the old ones.
2. Search. Per chapter: pools (`pipelines.core.pools`), then each frame's query patches are searched among its
   pool's reference patches with FAISS (`pipelines.core.search`), top `k_per_patch` per query patch (the paper's
   independent top-k; `max_per_page` optionally caps the patches one reference page gives a frame). Outputs go
   to a run folder named by a hash of (encoder id, refs, min_refs, k, cap, seed, near-duplicate rule), so a
   change of k, cap, pool size or seed re-searches from the stored vectors with zero encoder calls. The summary
   reports how many distinct reference pages each frame's patches come from.

The search task writes its chapter's parts of `pools.parquet/` and `retrievals.parquet/` (folders of one part
per chapter: the tables of the latest run) and its marker with its counts and parts' sha256; the driver keeps one
small record per chapter (the markers and page-store stats are read by check tasks) and writes
`retrieval.summary.json` (what was embedded, reused and re-searched, the tables' fingerprints) last. Chapter
ledgers (`pipelines.core.ledger`: `embeddings-<encoder_id>`, keyed on the chapter's ingest version, and
`retrieval`, keyed on run id and embeddings version) give those records back without a check for every chapter
whose key still matches, so a rerun that adds a chapter checks that chapter only. No process
holds all embeddings and no table is rewritten: every step works on one chapter. On a cluster, OUT must be on
storage every node can read and write.

Files under OUT (see `pipelines.core.layout`):

    retrieval/embeddings/<encoder_id>/encoder.json             fingerprint: encoder + patch geometry
    retrieval/embeddings/<encoder_id>/<chapter>.npy            fp16 vectors, 9 rows per usable page
    retrieval/embeddings/<encoder_id>/<chapter>.parquet        EMBEDDINGS ids: page_id, role, patch, row
    retrieval/embeddings/<encoder_id>/pages/<chapter>.parquet  EMBEDDED_PAGES: bytes sha1, edge hashes, status
    retrieval/embeddings/<encoder_id>/<chapter>.done.json      marker: content version, page-store file stat
    retrieval/runs/<run_id>/run.json                           the run's parameters
    retrieval/search/<chapter>.done.json                       search marker: run id, embeddings version, counts
    pools.parquet/<chapter>.parquet, retrievals.parquet/<chapter>.parquet   the chapter's parts of the tables
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipelines.core.embeddings import PATCHES_PER_PAGE, QUERY_ROLE, REF_ROLE, ChapterEmbeddings, EmbeddingStore
from pipelines.core.encoders import (
    DEFAULT_ENCODER,
    WEIGHT_FREE,
    Encoder,
    EncoderInfo,
    load_encoder,
    resolve_encoder,
)
from pipelines.core.geometry import RESAMPLE_LANCZOS, RESAMPLERS
from pipelines.core.layout import DataLayout, subfolders
from pipelines.core.ledger import LedgerEntry, chapter_key, ingested_versions, read_ledger, vouched, write_ledger
from pipelines.core.pagestore import decode_page, ingested_chapter_ids, kept_chapter_ids
from pipelines.core.patches import page_patches, patch_geometry
from pipelines.core.pools import NearDuplicateRule, Pool, chapter_pools, error_pool, page_hashes
from pipelines.core.schemas import (
    EMBEDDED_PAGES,
    EMBEDDINGS,
    PAGE_STORE,
    POOLS,
    QUERY_PATCHES,
    REF_PATCHES,
    RETRIEVALS,
    STATUS_ERROR,
    STATUS_EXCLUDED,
    STATUS_OK,
    table_from_rows,
)
from pipelines.core.search import PoolSearcher, RefKeys, padded_rows
from pipelines.core.storage import (
    atomic_write_json,
    marker_path,
    part_path,
    purge_chapter_files,
    read_json,
    read_parquet,
    read_table,
    stable_hash,
    sweep_tmp,
    tables_fingerprint,
    write_marker,
    write_part,
)
from pipelines.runtime.distributor import Unit, map_in_tasks, run_units
from pipelines.runtime.faults import (
    ACTOR_RESTART,
    LOST_OBJECT,
    TASK_RETRY,
    FaultCounts,
    ProgressWatchdog,
    StalledError,
    cluster_state,
    describe_resources,
    error_text,
    fault_policy,
    hold_while_paused,
    is_lost_actor,
    is_lost_object,
    is_lost_work,
)
from pipelines.runtime.heap import runs_with_frozen_heap
from pipelines.runtime.ray import init_ray

log = logging.getLogger(__name__)

SEARCH_VERSION = 1  # bump when the pool or search semantics change: old run folders are then not reused


# ---- parameters --------------------------------------------------------------------------------------------------


SEARCH_FIELDS = ("refs", "min_refs", "k_per_patch", "seed", "width", "height", "rule", "max_per_page")


@dataclass(frozen=True)
class RetrievalOptions:
    """The retrieval stage's settings. `SEARCH_FIELDS` decide the pools and retrievals (given the embeddings) and
    are recorded in run.json and the summary (`search_settings`); the encoder decides the embeddings; the rest
    decide only how the work runs."""

    refs: int = 20
    min_refs: int = 10
    k_per_patch: int = 3
    seed: int = 0
    width: int = 512
    height: int = 800
    rule: NearDuplicateRule = field(default_factory=NearDuplicateRule)
    max_per_page: int | None = None  # cap on a frame's patches from one reference page; None: independent top-k
    fit_resample: str = RESAMPLE_LANCZOS  # the page fit patches are cut from; part of the encoder id when not Lanczos
    random_references: bool = False  # "without RAP" (our reading): patches drawn at random from the pool, no search
    encoder: str = DEFAULT_ENCODER
    batch_size: int | None = None  # encoder batch; None: the encoder's default for its device
    encoder_actors: tuple[int, int] | None = None  # (min, max) actors; None: one per GPU, else 1 up to CPUs/threads
    encoder_threads: int | None = None  # CPUs (and torch threads) per CPU actor; None: 1 weight-free, 4 model
    faiss_threads: int = 1
    rebuild: bool = False  # re-embed and re-search everything of this encoder and setting

    def search_settings(self) -> dict[str, Any]:
        """The fields that decide pools and retrievals, as recorded in run.json and the stage summary."""
        settings = asdict(self)
        chosen = {name: settings[name] for name in SEARCH_FIELDS}
        if self.random_references:  # absent when off, so the usual runs keep their recorded settings
            chosen["random_references"] = True
        return chosen

    def __post_init__(self) -> None:
        if self.encoder_actors is not None and not 1 <= self.encoder_actors[0] <= self.encoder_actors[1]:
            low, high = self.encoder_actors
            raise ValueError(f"encoder actors need 1 <= min <= max, got {low}:{high}")
        if self.max_per_page is not None and self.max_per_page * self.min_refs < QUERY_PATCHES * self.k_per_patch:
            raise ValueError(
                f"max_per_page={self.max_per_page} cannot fill a frame: {QUERY_PATCHES} query patches x k_per_patch="
                f"{self.k_per_patch} need at least {-(-QUERY_PATCHES * self.k_per_patch // self.min_refs)} patches "
                f"per page from a pool of min_refs={self.min_refs} pages"
            )
        if not 1 <= self.min_refs <= self.refs:
            raise ValueError(f"need 1 <= min_refs <= refs, got min_refs={self.min_refs}, refs={self.refs}")
        if not 1 <= self.k_per_patch <= min(127, REF_PATCHES * self.min_refs):
            raise ValueError(
                f"k_per_patch={self.k_per_patch} must be in 1..{min(127, REF_PATCHES * self.min_refs)}: a pool of "
                f"min_refs={self.min_refs} pages offers {REF_PATCHES * self.min_refs} reference patches"
            )
        if self.width < 4 or self.height < 4:
            raise ValueError(f"page size {self.width}x{self.height} is too small")
        if self.fit_resample not in RESAMPLERS:
            raise ValueError(f"fit_resample must be one of {', '.join(RESAMPLERS)}, got {self.fit_resample!r}")

    def run_id(self, encoder_id: str) -> str:
        key = {
            "encoder_id": encoder_id,
            "refs": self.refs,
            "min_refs": self.min_refs,
            "k_per_patch": self.k_per_patch,
            "seed": self.seed,
            "rule": self.rule.as_dict(),
            "search_version": SEARCH_VERSION,
        }
        if self.max_per_page is not None:  # absent when off, so uncapped run folders keep their ids
            key["max_per_page"] = self.max_per_page
        if self.random_references:
            key["random_references"] = True
        return stable_hash(key, 12)


# ---- the embeddings store ----------------------------------------------------------------------------------------


def _pagestore_stat(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _content_version(pages: list[dict[str, Any]]) -> str:
    """Names a chapter's embedded content: the pages, their bytes and whether they could be used."""
    key = [(p["page_id"], p["image_sha1"], p["status"]) for p in sorted(pages, key=lambda p: p["page_id"])]
    return stable_hash(key, 12)


# ---- stage 1: embedding ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbedJob:
    root: str
    chapter_id: str
    folder: str
    width: int
    height: int
    info: EncoderInfo
    rebuild: bool
    fit_resample: str = RESAMPLE_LANCZOS


@dataclass
class PreparedChapter:
    """A chapter's pages after decoding and cropping; `stats` is set when no encoder work was left to do."""

    chapter_id: str
    pages: list[dict[str, Any]]  # EMBEDDED_PAGES rows, sorted by page id
    new_page_ids: list[str]  # pages whose 9 prepared patches are in the patch array, in this order
    reused_page_ids: list[str]
    version: str
    old_version: str | None
    pagestore_stat: dict[str, int]
    patch_bytes: int = 0  # size of the prepared patch array (what the chapter holds in the object store)
    stats: dict[str, Any] | None = None


def prepare_chapter(job: EmbedJob) -> tuple[PreparedChapter, np.ndarray | None]:
    """Decode and crop the pages that need vectors; reuse the rest. Runs in a CPU task."""
    layout = DataLayout.at(job.root)
    store = EmbeddingStore(Path(job.folder))
    source = layout.pagestore_chapter(job.chapter_id)
    if not source.exists():
        raise FileNotFoundError(f"chapter {job.chapter_id}: page store file {source} is missing (rerun ingestion)")
    stat = _pagestore_stat(source)
    stored = read_parquet(source, PAGE_STORE).select(["page_id", "image"])
    # old vectors are reused only from a complete set of files (a file deleted by hand: the chapter is embedded anew)
    old_state = None if job.rebuild or not store.files_present(job.chapter_id) else store.state(job.chapter_id)
    old_pages: dict[str, dict[str, Any]] = {}
    if old_state is not None:
        old_table = read_parquet(store.pages_path(job.chapter_id), EMBEDDED_PAGES)
        old_pages = {row["page_id"]: row for row in old_table.to_pylist()}

    prepare = job.info.preparer()
    rows: list[dict[str, Any]] = []
    new_ids: list[str] = []
    reused: list[str] = []
    patches: list[np.ndarray] = []
    order = np.argsort(np.array(stored.column("page_id").to_pylist(), dtype=object), kind="stable")
    for index in order:
        page_id = stored.column("page_id")[int(index)].as_py()
        data = stored.column("image")[int(index)].as_py()
        sha1 = hashlib.sha1(data).hexdigest()
        old = old_pages.get(page_id)
        if old is not None and old["image_sha1"] == sha1:
            rows.append({**old, "chapter_id": job.chapter_id})
            if old["status"] == STATUS_OK:
                reused.append(page_id)
            continue
        row = {"page_id": page_id, "chapter_id": job.chapter_id, "image_sha1": sha1, "hashes": []}
        try:
            page = decode_page(data)
            page_arrays = [prepare(patch) for patch in page_patches(page, job.width, job.height, job.fit_resample)]
            row.update(hashes=page_hashes(page), status=STATUS_OK, error=None)
            patches.extend(page_arrays)
            new_ids.append(page_id)
        except Exception as exc:  # noqa: BLE001 - one bad page is a row with its reason, not a failed chapter
            row.update(status=STATUS_ERROR, error=f"page {page_id}: cannot decode or crop the stored image: {exc}")
        rows.append(row)

    prepared = PreparedChapter(
        chapter_id=job.chapter_id,
        pages=rows,
        new_page_ids=new_ids,
        reused_page_ids=reused,
        version=_content_version(rows),
        old_version=old_state["version"] if old_state else None,
        pagestore_stat=stat,
    )
    if new_ids:
        stacked = np.stack(patches)
        prepared.patch_bytes = stacked.nbytes
        return prepared, stacked
    prepared.stats = finish_chapter(job, prepared, None)
    return prepared, None


def _marker(job: EmbedJob, prepared: PreparedChapter, rows: int) -> dict[str, Any]:
    n_error = sum(p["status"] != STATUS_OK for p in prepared.pages)
    return {
        "version": prepared.version,
        "pagestore": prepared.pagestore_stat,
        "encoder_id": job.info.encoder_id,
        "n_pages": len(prepared.pages),
        "n_ok": len(prepared.pages) - n_error,
        "n_error": n_error,
        "rows": rows,
        "dim": job.info.dim,
    }


def finish_chapter(job: EmbedJob, prepared: PreparedChapter, new_vectors: np.ndarray | None) -> dict[str, Any]:
    """Merge reused and new vectors in page order and write the chapter's files (marker last)."""
    store = EmbeddingStore(Path(job.folder))
    stats = {
        "chapter_id": job.chapter_id,
        "pages_embedded": len(prepared.new_page_ids),
        "pages_reused": len(prepared.reused_page_ids),
        "pages_failed": sum(p["status"] != STATUS_OK for p in prepared.pages),
        "encoder_images": 0,
        "encoder_batches": 0,
    }
    if prepared.version == prepared.old_version:
        state = store.state(job.chapter_id) or {}
        write_marker(store.folder / job.chapter_id, {**state, "pagestore": prepared.pagestore_stat})
        return {**stats, "action": "unchanged"}
    old_rows: dict[str, np.ndarray] = {}
    old_vectors = None
    if prepared.reused_page_ids:
        old = store.load(job.chapter_id)
        if old.version != prepared.old_version:
            raise RuntimeError(f"chapter {job.chapter_id}: embeddings changed while it was being prepared")
        old_rows, old_vectors = old.page_rows(), old.vectors
    new_index = {page_id: i for i, page_id in enumerate(prepared.new_page_ids)}
    blocks: list[np.ndarray] = []
    id_rows: list[dict[str, Any]] = []
    for page in prepared.pages:
        if page["status"] != STATUS_OK:
            continue
        page_id = page["page_id"]
        if page_id in new_index:
            start = new_index[page_id] * PATCHES_PER_PAGE
            blocks.append(np.asarray(new_vectors[start : start + PATCHES_PER_PAGE], dtype=np.float16))
        else:
            blocks.append(np.asarray(old_vectors[old_rows[page_id]], dtype=np.float16))
        first = len(id_rows)
        id_rows += [{"page_id": page_id, "role": QUERY_ROLE, "patch": p, "row": first + p} for p in range(4)]
        id_rows += [
            {"page_id": page_id, "role": REF_ROLE, "patch": p, "row": first + QUERY_PATCHES + p} for p in range(5)
        ]
    vectors = np.concatenate(blocks) if blocks else np.zeros((0, job.info.dim), dtype=np.float16)
    store.write(
        job.chapter_id,
        vectors,
        table_from_rows(id_rows, EMBEDDINGS),
        table_from_rows(prepared.pages, EMBEDDED_PAGES),
        _marker(job, prepared, len(id_rows)),
    )
    return {**stats, "action": "embedded" if prepared.new_page_ids else "rewritten"}


def embed_patches(encoder: Encoder, patches: np.ndarray, batch_size: int) -> tuple[np.ndarray, int]:
    """Vectors (fp16) of prepared patches in batches of `batch_size`; returns (vectors, number of batches)."""
    out = []
    for start in range(0, len(patches), batch_size):
        vectors = encoder.embed(patches[start : start + batch_size])
        if not np.all(np.isfinite(vectors)):
            raise FloatingPointError("the encoder returned non-finite values")
        out.append(vectors.astype(np.float16))
    return np.concatenate(out), len(out)


def _assigned_gpus() -> list[str]:
    """The GPU ids Ray assigned to this process (empty outside a Ray worker or without GPUs)."""
    import ray

    if not ray.is_initialized():
        return []
    return [str(gpu) for gpu in ray.get_gpu_ids()]


class EncoderWorker:
    """Holds one loaded encoder; as a Ray actor it owns a GPU (fp16) or `threads` CPUs (as many torch threads), and
    writes what it embeds."""

    def __init__(self, info: EncoderInfo, batch_size: int, threads: int = 1, pause_file: str | None = None) -> None:
        self.pause_file = pause_file
        self.device = "cpu"
        self.threads = max(1, threads)
        self.gpu_ids = _assigned_gpus()
        if info.kind != WEIGHT_FREE:  # torch is only needed (and only imported) for model encoders
            import torch

            from pipelines.runtime.ray import torch_device

            torch.set_num_threads(self.threads)
            self.device = torch_device()
            if self.gpu_ids and self.device == "cpu":
                log.warning("Ray assigned GPU %s but torch sees no CUDA device: the encoder runs on CPU", self.gpu_ids)
        self.encoder = load_encoder(info, self.device)
        self.batch_size = batch_size

    def ready(self) -> dict[str, Any]:
        """Where this worker runs: device, dtype, batch size, threads, the GPUs Ray assigned it and its node."""
        dtype = getattr(self.encoder, "dtype", "float32")
        return {
            "device": str(self.device),
            "dtype": str(dtype).removeprefix("torch."),
            "batch_size": self.batch_size,
            "threads": self.threads,
            "gpu_ids": self.gpu_ids,
            "node_id": _node_id(),
        }

    def embed_and_write(self, job: EmbedJob, prepared: PreparedChapter, patches: np.ndarray) -> dict[str, Any]:
        hold_while_paused(self.pause_file)
        vectors, batches = embed_patches(self.encoder, patches, self.batch_size)
        stats = finish_chapter(job, prepared, vectors)
        return {**stats, "encoder_images": len(patches), "encoder_batches": batches}


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


@dataclass(frozen=True)
class EncoderOptions:
    """How the encoder runs: batch size, actor pool bounds and CPUs (torch threads) per CPU actor."""

    batch_size: int | None = None  # default: 64 on GPU, 32 on CPU
    actors: tuple[int, int] | None = None  # (min, max); default: one per GPU, else 1 up to CPUs // threads
    threads: int | None = None  # CPUs and torch threads per CPU actor; default: 1 weight-free, 4 for a model
    inflight_bytes: int = 2 << 30  # prepared patches held in the object store at once, beyond the minimum below

    def cpu_threads(self, info: EncoderInfo) -> int:
        return self.threads or (1 if info.kind == WEIGHT_FREE else 4)


def inflight_limit(n_actors: int, cpus: int, chapter_bytes: int, budget: int) -> int:
    """How many chapters may be preparing, waiting or embedding at once.

    Never fewer than keeps every actor busy with one chapter queued behind (2 per actor, + 2 being prepared);
    more only while the largest chapter seen so far (`chapter_bytes`, 0 while unknown) fits `budget` that many
    times, and never more than the CPUs can prepare. An open_clip chapter of 200 pages is ~270 MB of uint8
    patches: bounded by CPUs alone, a 64-CPU cluster would hold ~17 GB of them in the object store.
    """
    floor = 2 * n_actors + 2
    if not chapter_bytes:
        return floor
    return max(floor, min(cpus + 2 * n_actors, budget // chapter_bytes))


EMBED_BAR = "retrieval embeddings"


def _embed_locally(
    jobs: list[EmbedJob], info: EncoderInfo, options: EncoderOptions
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(per-chapter results, the encoder worker's `ready` record if one was loaded), in this process."""
    worker: EncoderWorker | None = None
    results = []
    embedded = 0
    for job in tqdm(jobs, desc=EMBED_BAR, unit="chapter", dynamic_ncols=True, mininterval=1.0):
        try:
            prepared, patches = prepare_chapter(job)
            if prepared.stats is not None:
                results.append(prepared.stats)
                continue
            worker = worker or EncoderWorker(info, options.batch_size or 32, options.cpu_threads(info))
            results.append(worker.embed_and_write(job, prepared, patches))
            embedded += 1
        except Exception as exc:  # noqa: BLE001 - a chapter's failure is recorded, the others go on
            results.append(_chapter_error(job.chapter_id, "embedding", exc))
    return results, [{**worker.ready(), "chapters": embedded}] if worker else []


def _chapter_error(chapter_id: str, stage: str, exc: BaseException, attempts: int = 1) -> dict[str, Any]:
    tried = f" (on {attempts} attempts)" if attempts > 1 else ""
    return {
        "chapter_id": chapter_id,
        "action": "failed",
        "error": f"{stage} of chapter {chapter_id}{tried}: {error_text(exc)}",
    }


class EncoderActors:
    """The encoder actor pool of one run: `min_actors` started on first need, grown one at a time up to
    `max_actors` while prepared chapters wait for a busy pool and the cluster has the resources to spare (a CPU
    is always left for preparing), replaced when one dies (counted in `faults`).

    Ray does not restart them itself (`max_restarts=0`): a dead actor's in-flight calls fail at once with
    `ActorDiedError`, the driver submits their chapters again, and the slot gets a new actor when work is waiting.
    Starting the first actors and replacements is bounded by the watchdog; a grown actor starts in the background
    and takes chapters once ready. A constructor that raises (weights that cannot load) fails the job, since every
    chapter would fail the same way. CPU actors are placed on the node holding the fewest of them (a soft node
    affinity), so the pool spreads over every node; GPU actors go wherever Ray finds a GPU.
    """

    def __init__(
        self,
        info: EncoderInfo,
        worker_options: dict[str, Any],
        resources: dict[str, float],
        actors: tuple[int, int],
        faults: FaultCounts,
        max_start_failures: int,
    ) -> None:
        import ray

        self.actor_class = ray.remote(EncoderWorker)
        self.resources = resources
        self.needs = describe_resources(resources)
        self.info = info
        self.worker_options = worker_options
        self.min_actors, self.max_actors = actors
        self.slots: list[Any] = []  # an actor, or None where one is to be started
        self.load: list[int] = []  # calls in flight per slot
        self.assigned: list[int] = []  # chapters sent per slot: ties go to the least used, so work spreads
        self.targets: list[str | None] = []  # the node each CPU actor was placed on
        self.ready_slots: set[int] = set()
        self.starting: dict[Any, int] = {}  # ready() reference of a grown actor -> its slot
        self.workers: list[dict[str, Any]] = []  # every actor's `ready` record, with the chapters it embedded
        self.worker_of: dict[int, int] = {}
        self.faults = faults
        self.max_start_failures = max_start_failures

    @property
    def active(self) -> int:
        return sum(actor is not None for actor in self.slots)

    def capacity(self) -> int:
        """Actors the in-flight bound should feed: the pool, plus one while it may still grow."""
        return max(self.min_actors, len(self.slots) + (len(self.slots) < self.max_actors))

    def free_slot(self, watchdog: ProgressWatchdog) -> int | None:
        """A ready slot whose actor can take another chapter (one running, one queued), starting missing actors."""
        self._start_missing(watchdog)
        candidates = [i for i in self.ready_slots if self.load[i] < 2]
        if not candidates:
            return None
        return min(candidates, key=lambda i: (self.load[i], self.assigned[i], i))

    def assign(self, slot: int) -> None:
        self.load[slot] += 1
        self.assigned[slot] += 1

    def grow(self) -> None:
        """Start one more actor in the background when the pool is below its maximum and the cluster has the
        resources for it and a CPU to spare for preparing."""
        import ray

        if self.starting or len(self.slots) >= self.max_actors:
            return
        free = ray.available_resources()
        if free.get("CPU", 0) < self.resources.get("num_cpus", 0) + 1 or free.get("GPU", 0) < self.resources.get(
            "num_gpus", 0
        ):
            return
        slot = self._new_slot()
        self.slots[slot] = self._create(slot)
        self.starting[self.slots[slot].ready.remote()] = slot

    def started(self, ref: Any) -> None:
        """A grown actor answered (or died) while starting."""
        import ray

        slot = self.starting.pop(ref)
        try:
            record = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - lost: the slot is refilled when work waits; else the job fails
            if not is_lost_work(exc):
                message = f"encoder {self.info.spec} could not be loaded in a Ray actor: {error_text(exc)}"
                raise RuntimeError(message) from exc
            self.lost(slot, self.slots[slot], exc)
            return
        self._register(slot, record)

    def lost(self, slot: int, actor: Any, exc: BaseException) -> None:
        """`actor` died: free its slot once (its other in-flight calls fail the same way)."""
        import ray

        if self.slots[slot] is actor and actor is not None:
            ray.kill(actor)
            self.slots[slot] = None
            self.load[slot] = 0
            self.ready_slots.discard(slot)
            self.faults.record(ACTOR_RESTART, exc)

    def done(self, slot: int, actor: Any, embedded: bool) -> None:
        if self.slots[slot] is actor:
            self.load[slot] -= 1
            if embedded:
                self.workers[self.worker_of[slot]]["chapters"] += 1

    def _new_slot(self) -> int:
        self.slots.append(None)
        self.load.append(0)
        self.assigned.append(0)
        self.targets.append(None)
        return len(self.slots) - 1

    def _create(self, slot: int) -> Any:
        """A new actor for `slot`; a CPU actor goes to the node holding the fewest of this pool's actors."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options: dict[str, Any] = {**self.resources, "max_restarts": 0}
        need = self.resources.get("num_cpus", 1)
        nodes = sorted(
            node["NodeID"] for node in ray.nodes() if node.get("Alive") and node["Resources"].get("CPU", 0) >= need
        )
        if nodes and not self.resources.get("num_gpus", 0):
            held = Counter(self.targets[i] for i, actor in enumerate(self.slots) if actor is not None)
            self.targets[slot] = min(nodes, key=lambda node: (held[node], node))
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.targets[slot], soft=True)
        return self.actor_class.options(**options).remote(self.info, **self.worker_options)

    def _register(self, slot: int, record: dict[str, Any]) -> None:
        self.worker_of[slot] = len(self.workers)
        self.workers.append({**record, "chapters": 0})
        self.ready_slots.add(slot)
        log.info("encoder %s loaded: %s", self.info.encoder_id, record)

    def _start_missing(self, watchdog: ProgressWatchdog) -> None:
        while len(self.slots) < self.min_actors:
            self._new_slot()
        failures = 0
        while True:
            missing = [i for i, actor in enumerate(self.slots) if actor is None]
            if not missing:
                return
            for i in missing:
                self.slots[i] = self._create(i)
            try:
                what = f"{len(missing)} encoder actor(s) to start (each needs {self.needs})"
                records = watchdog.get([self.slots[i].ready.remote() for i in missing], lambda what=what: what)
            except StalledError:
                raise
            except Exception as exc:
                if not is_lost_work(exc):
                    message = f"encoder {self.info.spec} could not be loaded in a Ray actor: {error_text(exc)}"
                    raise RuntimeError(message) from exc
                failures += 1
                if failures > self.max_start_failures:
                    raise RuntimeError(
                        f"encoder actors died while starting {failures} times in a row ({type(exc).__name__}); "
                        f"{cluster_state()}"
                    ) from exc
                for i in missing:  # which one died is unknown: start them all again
                    self.lost(i, self.slots[i], exc)
                continue
            for i, record in zip(missing, records, strict=True):
                self._register(i, record)

    def stop(self) -> None:
        import ray

        for actor in self.slots:
            if actor is not None:
                ray.kill(actor)


def pool_bounds(options: EncoderOptions, gpus: int, cpus: int, threads: int) -> tuple[int, int]:
    """(min, max) encoder actors: as given, else one per GPU on a cluster with GPUs, else 1 up to CPUs // threads."""
    if options.actors is not None:
        return options.actors
    if gpus:
        return gpus, gpus
    return 1, max(1, cpus // threads)


def _embed_on_ray(
    jobs: list[EmbedJob], info: EncoderInfo, options: EncoderOptions, faults: FaultCounts
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """CPU tasks decode and crop chapters; a pool of encoder actors embeds and writes them. Bounded work in flight.

    With GPUs in the cluster each actor reserves one GPU (one per GPU by default; the cluster's CPUs prepare
    chapters) and the batch defaults to 64 (fp16 on CUDA); an actor whose GPU torch cannot use falls back to CPU.
    Without GPUs the actors reserve `threads` CPUs each, spread over the nodes, and the pool grows from its
    minimum while chapters wait. Actors start only when a chapter needs the encoder, so a run with nothing new
    loads no model. A model that cannot load fails the job at once (every chapter would fail the same way). A
    chapter whose preparing task, prepared patches or encoder actor is lost starts again from its preparation, up
    to the fault policy's `max_retries` times (counted in `faults`); every wait is bounded by its
    `stall_timeout`. The chapter stays the unit of writing and resuming. Returns (per-chapter results, each
    actor's `EncoderWorker.ready` record with the chapters it embedded).
    """
    import ray

    policy = fault_policy()
    resources_total = ray.cluster_resources()
    gpus = int(resources_total.get("GPU", 0))
    cpus = max(1, int(resources_total.get("CPU", 1)))
    node_cpus = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1)
    # the default leaves a node's last CPU to preparing; an explicit --encoder-threads is taken as given
    threads = options.threads or (1 if gpus else min(options.cpu_threads(info), max(1, node_cpus - 1)))
    batch_size = options.batch_size or (64 if gpus else 32)
    # Ray's own retries are off: lost work is retried below, counted, and never waits without a bound
    prepare_task = ray.remote(prepare_chapter).options(num_cpus=1, num_returns=2, max_retries=0)
    actors = EncoderActors(
        info,
        {"batch_size": batch_size, "threads": threads, "pause_file": policy.pause_file},
        {"num_cpus": threads, "num_gpus": 1 if gpus else 0},
        pool_bounds(options, gpus, cpus, threads),
        faults,
        policy.max_retries,
    )
    log.info(
        "encoder pool: %d to %d actor(s), each holding %s, batches of %d",
        actors.min_actors,
        actors.max_actors,
        actors.needs,
        batch_size,
    )
    watchdog = ProgressWatchdog("retrieval embedding", policy)
    bar = tqdm(total=len(jobs), desc=EMBED_BAR, unit="chapter", dynamic_ncols=True, mininterval=1.0)
    queue = deque(jobs)
    preparing: dict[Any, tuple[EmbedJob, Any]] = {}
    waiting: deque[tuple[EmbedJob, Any, Any]] = deque()
    embedding: dict[Any, tuple[EmbedJob, int, Any]] = {}
    results: dict[str, dict[str, Any]] = {}
    failed_attempts: Counter[str] = Counter()
    largest_chapter = 0

    def waiting_for() -> str:
        return (
            f"{len(preparing)} chapter(s) being prepared (each needs CPU 1), {len(embedding)} being embedded by "
            f"{actors.active} encoder actor(s) (each holds {actors.needs}), "
            f"{len(waiting)} prepared and {len(queue)} not started"
        )

    def retry_or_fail(job: EmbedJob, stage: str, exc: BaseException) -> None:
        failed_attempts[job.chapter_id] += 1
        attempts = failed_attempts[job.chapter_id]
        if is_lost_work(exc) and attempts <= policy.max_retries:
            faults.record(LOST_OBJECT if is_lost_object(exc) else TASK_RETRY, exc)
            log.warning(
                "%s of chapter %s lost (%s); attempt %d of %d; %s",
                stage,
                job.chapter_id,
                type(exc).__name__,
                attempts + 1,
                policy.max_retries + 1,
                cluster_state(),
            )
            queue.appendleft(job)
        else:
            results[job.chapter_id] = _chapter_error(job.chapter_id, stage, exc, attempts)

    try:
        while queue or preparing or waiting or embedding:
            limit = inflight_limit(actors.capacity(), cpus, largest_chapter, options.inflight_bytes)
            while queue and len(preparing) + len(waiting) + len(embedding) < limit:
                job = queue.popleft()
                meta_ref, patches_ref = prepare_task.remote(job)
                preparing[meta_ref] = (job, patches_ref)
            while waiting:
                slot = actors.free_slot(watchdog)
                if slot is None or actors.load[slot] > 0:
                    actors.grow()  # every actor is busy: one more, if the cluster has room for it
                if slot is None:
                    break
                job, meta_ref, patches_ref = waiting.popleft()
                actor = actors.slots[slot]
                embedding[actor.embed_and_write.remote(job, meta_ref, patches_ref)] = (job, slot, actor)
                actors.assign(slot)
            for ref in watchdog.wait([*preparing, *embedding, *actors.starting], waiting_for):
                if ref in actors.starting:
                    actors.started(ref)
                elif ref in preparing:
                    job, patches_ref = preparing.pop(ref)
                    try:
                        prepared = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - lost: retried; raised by the task: the chapter fails
                        retry_or_fail(job, "preparing", exc)
                        continue
                    if prepared.stats is not None:
                        results[job.chapter_id] = prepared.stats
                    else:
                        largest_chapter = max(largest_chapter, prepared.patch_bytes)
                        waiting.append((job, ref, patches_ref))
                else:
                    job, slot, actor = embedding.pop(ref)
                    try:
                        results[job.chapter_id] = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - a dead actor is replaced and its chapters retried
                        actors.done(slot, actor, embedded=False)
                        if is_lost_actor(exc):
                            actors.lost(slot, actor, exc)
                        retry_or_fail(job, "embedding", exc)
                        continue
                    actors.done(slot, actor, embedded=True)
            bar.update(len(results) - bar.n)  # chapters finished: written, unchanged or failed
    finally:
        bar.close()
        actors.stop()
    return [results[job.chapter_id] for job in jobs], actors.workers


# ---- stage 2: pools and search -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchJob:
    root: str
    embeddings_folder: str
    run_id: str
    chapter_id: str
    version: str
    params: RetrievalOptions
    faiss_threads: int = 1


def search_state(layout: DataLayout, chapter_id: str) -> dict[str, Any] | None:
    path = marker_path(layout.search_markers / chapter_id)
    return read_json(path) if path.exists() else None


def search_done(layout: DataLayout, job: SearchJob) -> dict[str, Any] | None:
    """The chapter's search marker if it holds this run's search of these embeddings and its parts are in place
    (run in a check task: the driver reads no marker)."""
    state = search_state(layout, job.chapter_id)
    if state is None or state.get("run_id") != job.run_id or state.get("embeddings_version") != job.version:
        return None
    in_place = all(part_path(t, job.chapter_id).exists() for t in (layout.pools, layout.retrievals))
    if not in_place:
        return None
    if "pool_refs" not in state:  # a marker from before the pool bounds were recorded: read them off its part
        pools = pq.read_table(part_path(layout.pools, job.chapter_id), columns=["ref_page_ids", "status"])
        state = {**state, "pool_refs": _pool_refs(pools.filter(pc.equal(pools["status"], STATUS_OK)))}
    return state


def _pool_refs(ok_pools: pa.Table) -> list[int] | None:
    """[fewest, most] reference pages in the pools of a chapter's usable frames (`ref_page_ids`); None if none."""
    if ok_pools.num_rows == 0:
        return None
    sizes = pc.list_value_length(ok_pools["ref_page_ids"])
    return [pc.min(sizes).as_py(), pc.max(sizes).as_py()]


def chapter_retrievals(
    embeddings: ChapterEmbeddings, params: RetrievalOptions, faiss_threads: int = 1
) -> tuple[list[Pool], list[dict[str, Any]]]:
    """Pools and retrieval rows of every frame of one chapter, from its stored embeddings."""
    pages = embeddings.pages.to_pylist()
    ok_pages = [p for p in pages if p["status"] == STATUS_OK]
    ok_ids = [p["page_id"] for p in ok_pages]
    rows = embeddings.page_rows()
    vectors = embeddings.vectors
    whole = np.asarray(vectors[[rows[p][QUERY_PATCHES + 4] for p in ok_ids]], dtype=np.float32)
    pools = chapter_pools(
        ok_ids,
        [p["hashes"] for p in ok_pages],
        whole.reshape(len(ok_ids), -1) if ok_ids else None,
        refs=params.refs,
        min_refs=params.min_refs,
        seed=params.seed,
        rule=params.rule,
    )
    pools += [error_pool(p["page_id"], p["error"] or "page unusable") for p in pages if p["status"] != STATUS_OK]
    pools.sort(key=lambda pool: pool.frame_id)

    retrievals: list[dict[str, Any]] = []
    ok_pools = [pool for pool in pools if pool.status == STATUS_OK]
    if not ok_pools:
        return pools, retrievals
    ref_rows = np.concatenate([rows[p][QUERY_PATCHES:] for p in ok_ids])
    keys = RefKeys(np.repeat(np.array(ok_ids), REF_PATCHES), np.tile(np.arange(REF_PATCHES), len(ok_ids)))
    searcher = PoolSearcher(np.asarray(vectors[ref_rows]), keys.tie_rank, threads=faiss_threads)
    position = {page_id: i for i, page_id in enumerate(ok_ids)}
    # the whole chapter in one search: every frame's query patches, each among its own pool's reference patches
    queries = np.asarray(vectors[np.concatenate([rows[pool.frame_id][:QUERY_PATCHES] for pool in ok_pools])])
    allowed = padded_rows(
        [
            np.concatenate([np.arange(REF_PATCHES) + REF_PATCHES * position[p] for p in pool.ref_page_ids])
            for pool in ok_pools
        ],
        repeats=QUERY_PATCHES,
    )
    if params.random_references:
        top_rows, top_scores = random_picks(ok_pools, allowed, params)
    else:
        top_rows, top_scores = searcher.search(
            queries,
            allowed,
            params.k_per_patch,
            max_per_page=params.max_per_page,
            ref_pages=keys.page_ids,
            queries_per_frame=QUERY_PATCHES,
        )
    top_rows = top_rows.reshape(len(ok_pools), QUERY_PATCHES, params.k_per_patch)
    top_scores = top_scores.reshape(top_rows.shape)
    for pool, frame_rows, frame_scores in zip(ok_pools, top_rows, top_scores, strict=True):
        for query_patch in range(QUERY_PATCHES):
            for rank in range(params.k_per_patch):
                row = int(frame_rows[query_patch, rank])
                retrievals.append(
                    {
                        "frame_id": pool.frame_id,
                        "chapter_id": embeddings.chapter_id,
                        "query_patch": query_patch,
                        "rank": rank,
                        "ref_page_id": str(keys.page_ids[row]),
                        "ref_patch": int(keys.patches[row]),
                        "score": float(frame_scores[query_patch, rank]),
                    }
                )
    return pools, retrievals


def random_picks(pools: list[Pool], allowed: np.ndarray, params: RetrievalOptions) -> tuple[np.ndarray, np.ndarray]:
    """The "without RAP" variant: each frame's 4 x k patches drawn without replacement, uniformly from its pool's
    reference patches, seeded by (seed, frame id); scores are 0 (nothing was compared). Same shapes as a search."""
    picks = QUERY_PATCHES * params.k_per_patch
    rows = np.empty((len(pools), picks), dtype=np.int64)
    for number, pool in enumerate(pools):
        candidates = allowed[number * QUERY_PATCHES]
        candidates = candidates[candidates >= 0]
        seed = int(stable_hash({"seed": params.seed, "frame": pool.frame_id, "purpose": "random-references"}, 16), 16)
        rows[number] = np.random.default_rng(seed).choice(candidates, size=picks, replace=False)
    return rows.reshape(-1, params.k_per_patch), np.zeros((len(pools) * QUERY_PATCHES, params.k_per_patch))


def distinct_pages_histogram(retrievals: pa.Table) -> dict[str, int]:
    """Number of frames per count of distinct reference pages among the frame's retrieved patches."""
    if retrievals.num_rows == 0:
        return {}
    per_frame = (
        retrievals.select(["frame_id", "ref_page_id"])
        .group_by("frame_id")
        .aggregate([("ref_page_id", "count_distinct")])
    )
    counts = pc.value_counts(per_frame["ref_page_id_count_distinct"]).to_pylist()
    return {str(c["values"]): c["counts"] for c in sorted(counts, key=lambda c: c["values"])}


def distinct_pages_summary(histogram: dict[str, int]) -> dict[str, Any]:
    """min / median / max / mean of distinct reference pages per frame, and the histogram they come from."""
    counts = sorted(int(n) for n, frames in histogram.items() for _ in range(frames))
    if not counts:
        return {"frames": 0, "histogram": {}}
    middle = len(counts) // 2
    median = counts[middle] if len(counts) % 2 else (counts[middle - 1] + counts[middle]) / 2
    return {
        "frames": len(counts),
        "min": counts[0],
        "median": median,
        "max": counts[-1],
        "mean": round(sum(counts) / len(counts), 3),
        "histogram": {str(n): histogram[str(n)] for n in sorted({*counts})},
    }


def _frame_counts(pools: list[Pool]) -> dict[str, int]:
    return {
        "frames": len(pools),
        "frames_ok": sum(p.status == STATUS_OK for p in pools),
        "frames_short": sum(p.status == STATUS_OK and p.short for p in pools),
        "frames_excluded": sum(p.status == STATUS_EXCLUDED for p in pools),
        "frames_error": sum(p.status == STATUS_ERROR for p in pools),
    }


def search_chapter(unit: Unit) -> dict[str, Any]:
    """Stage-2 worker: one chapter's pools and retrievals, written as its parts of the tables (marker last)."""
    job: SearchJob = unit.payload
    layout = DataLayout.at(job.root)
    embeddings = EmbeddingStore(Path(job.embeddings_folder)).load(job.chapter_id)
    if embeddings.version != job.version:
        raise RuntimeError(f"chapter {job.chapter_id}: embeddings changed during the run; rerun the job")
    pools, retrievals = chapter_retrievals(embeddings, job.params, job.faiss_threads)
    marker_path(layout.search_markers / job.chapter_id).unlink(missing_ok=True)  # parts change: marker goes first
    retrieval_table = table_from_rows(retrievals, RETRIEVALS)
    pool_table = table_from_rows([p.row(job.chapter_id) for p in pools], POOLS)
    parts = {
        "pools": write_part(layout.pools, job.chapter_id, pool_table, POOLS),
        "retrievals": write_part(layout.retrievals, job.chapter_id, retrieval_table, RETRIEVALS),
    }
    stats = {
        "run_id": job.run_id,
        "embeddings_version": job.version,
        "retrievals": len(retrievals),
        "pools_rows": len(pools),
        "distinct_ref_pages": distinct_pages_histogram(retrieval_table),
        "pool_refs": _pool_refs(pool_table.filter(pc.equal(pool_table["status"], STATUS_OK))),
        "parts": parts,
        **_frame_counts(pools),
    }
    write_marker(layout.search_markers / job.chapter_id, stats)
    return stats


# ---- the driver --------------------------------------------------------------------------------------------------


def _stored_pages(layout: DataLayout, chapter_ids: set[str]) -> dict[str, list[str]]:
    """chapter_id -> its stored page ids per the pages table (used to report frames of failed chapters)."""
    pages = read_table(layout.pages, keys=chapter_ids, columns=["page_id", "chapter_id", "stored"])
    pages = pages.filter(pc.equal(pages["stored"], True))
    out: dict[str, list[str]] = {}
    for page_id, chapter_id in zip(
        pages.column("page_id").to_pylist(), pages.column("chapter_id").to_pylist(), strict=True
    ):
        out.setdefault(chapter_id, []).append(page_id)
    return {chapter_id: sorted(ids) for chapter_id, ids in out.items()}


def _write_encoder_record(folder: Path, info: EncoderInfo) -> None:
    """encoder.json beside the vectors; an existing one must agree (the id is a hash of it)."""
    path = folder / "encoder.json"
    record = {"encoder_id": info.encoder_id, "spec": info.spec, "fingerprint": info.fingerprint}
    if path.exists():
        existing = read_json(path)
        if existing.get("fingerprint") != info.fingerprint:
            raise RuntimeError(f"{path} holds another fingerprint than encoder {info.spec}: refusing to mix vectors")
        return
    atomic_write_json(path, record)


def purge_other_chapters(layout: DataLayout, chapters: list[str]) -> set[str]:
    """Delete the embeddings (every encoder and size) and the search parts (every run) of chapters ingestion no
    longer lists, and the search parts of chapters ingested but no longer kept (`chapters`: the kept ones), so the
    tables hold the current chapters only; returns the ids of the chapters taken down. Each folder is listed
    once; markers go before data: a chapter's search marker sits beside its retrievals, its embeddings marker
    beside its vectors. The single-file tables of an earlier version are replaced."""
    keep = ingested_chapter_ids(layout)
    purged: set[str] = set()
    for encoder_folder in subfolders(layout.embeddings_root):
        for folder in (encoder_folder, encoder_folder / "pages"):
            purged |= purge_chapter_files(folder, keep)
    for run_folder in subfolders(layout.retrieval_runs):  # parts an earlier version kept per run
        for folder in (run_folder / "retrievals", run_folder / "pools"):
            purged |= purge_chapter_files(folder, keep)
    for table in (layout.pools, layout.retrievals):
        if table.is_file():
            table.unlink()
    kept = set(chapters)
    for folder in (layout.search_markers, layout.pools, layout.retrievals):
        purged |= purge_chapter_files(folder, kept) - keep  # no longer kept but still ingested: not taken down
    return purged


def _embedding_check(job: EmbedJob) -> dict[str, Any] | None:
    """Run in a check task: the chapter's embeddings marker (small fields) and whether it is up to date with the
    chapter's page-store file, its own files in place."""
    store = EmbeddingStore(Path(job.folder))
    state = store.state(job.chapter_id)
    if state is None:
        return None
    source = DataLayout.at(job.root).pagestore_chapter(job.chapter_id)
    current = not job.rebuild and source.exists() and state.get("pagestore") == _pagestore_stat(source)
    current = current and store.files_present(job.chapter_id)
    return {
        "version": state["version"],
        "n_ok": state.get("n_ok", 0),
        "n_error": state.get("n_error", 0),
        "current": current,
    }


def _search_record(result: dict[str, Any]) -> dict[str, Any]:
    """A search task's result as its marker holds it (what a check or the ledger gives back on a rerun)."""
    return {k: v for k, v in result.items() if k not in ("key", "status")}


def _failed_search(layout: DataLayout, chapter_id: str, pool_rows: list[dict[str, Any]]) -> str:
    """A failed chapter's parts: its error pools (one per stored frame) and no retrievals; marker first."""
    marker_path(layout.search_markers / chapter_id).unlink(missing_ok=True)
    part_path(layout.retrievals, chapter_id).unlink(missing_ok=True)
    return write_part(layout.pools, chapter_id, table_from_rows(pool_rows, POOLS), POOLS)


@runs_with_frozen_heap
def run_retrieval(
    data: str | os.PathLike,
    options: RetrievalOptions | None = None,
    *,
    local: bool = False,
    verify: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Build (or update) the retrieval cache of an ingested data folder; returns the run summary.

    Options come as a `RetrievalOptions` and/or as keyword overrides of its fields, e.g.
    ``run_retrieval(out, encoder="weightfree", width=512, height=800)``. Uses the Ray the caller started, else
    joins RAY_ADDRESS or starts a local one; `local=True` runs in this process without Ray.
    """
    started = time.perf_counter()
    layout = DataLayout.at(data)
    params = replace(options or RetrievalOptions(), **overrides)
    encoder, width, height, rebuild = params.encoder, params.width, params.height, params.rebuild
    info = resolve_encoder(encoder).with_patch_geometry(patch_geometry(width, height, params.fit_resample))
    store = EmbeddingStore(layout.embeddings(info.encoder_id))
    run_id = params.run_id(info.encoder_id)
    run_folder = layout.retrieval_run(run_id)
    chapters = kept_chapter_ids(layout)
    # a run that did not finish (no summary) may have left temporary files, and rewritten chapters its ledgers
    # still vouch for: then the folders are swept and every marker is read (a completed run needs neither)
    unfinished = verify or not layout.summary("retrieval").exists()  # `verify`: as after a killed run
    # the summary marks pools.parquet + retrievals.parquet as a matching pair: gone until both are rewritten
    layout.summary("retrieval").unlink(missing_ok=True)
    if not local:
        init_ray()
    if unfinished:
        for folder in (store.folder, run_folder, layout.search_markers, layout.pools, layout.retrievals):
            sweep_tmp(folder)
    purged = purge_other_chapters(layout, chapters)
    store.folder.mkdir(parents=True, exist_ok=True)
    _write_encoder_record(store.folder, info)
    atomic_write_json(
        run_folder / "run.json", {"run_id": run_id, "encoder_id": info.encoder_id, **params.search_settings()}
    )

    # stage 1: embeddings (chapters the ledger vouches for skip the check; check tasks read the others' markers
    # and page-store stats)
    stage1_started = time.perf_counter()
    embed_ledger_path = layout.ledger(f"embeddings-{info.encoder_id}")
    embed_ledger = {} if rebuild or unfinished else read_ledger(embed_ledger_path)
    ingested = ingested_versions(layout)
    embed_keys = {c: ingested[c] for c in chapters if c in ingested}
    embed_trusted = vouched(embed_ledger, embed_keys)
    checks: dict[str, dict[str, Any] | None] = {c: {**record, "current": True} for c, record in embed_trusted.items()}
    to_check = [  # a chapter the ledger vouches for needs no job
        EmbedJob(str(layout.root), c, str(store.folder), width, height, info, rebuild, params.fit_resample)
        for c in chapters
        if c not in checks
    ]
    found = map_in_tasks(_embedding_check, to_check, desc="embeddings check", local=local)
    embed_vouched = len(checks)
    checks.update(zip([job.chapter_id for job in to_check], found, strict=True))
    jobs = [job for job in to_check if not (checks[job.chapter_id] or {}).get("current")]
    up_to_date = [c for c in chapters if (checks[c] or {}).get("current")]
    states = {c: checks[c] for c in up_to_date}
    options = EncoderOptions(batch_size=params.batch_size, actors=params.encoder_actors, threads=params.encoder_threads)
    embed_faults = FaultCounts()
    if not jobs:
        embed_results, workers = [], []
    elif local:
        embed_results, workers = _embed_locally(jobs, info, options)
    else:
        embed_results, workers = _embed_on_ray(jobs, info, options, embed_faults)
    states.update({job.chapter_id: store.state(job.chapter_id) for job in jobs})  # the changed chapters only
    failed: dict[str, str] = {r["chapter_id"]: r["error"] for r in embed_results if r["action"] == "failed"}
    embed_summary = {
        "chapters_up_to_date": len(up_to_date),
        "chapters_vouched": embed_vouched,  # up to date per the ledger, without a check
        "chapters_embedded": sum(r["action"] == "embedded" for r in embed_results),
        "chapters_rewritten": sum(r["action"] == "rewritten" for r in embed_results),
        "chapters_unchanged": sum(r["action"] == "unchanged" for r in embed_results),
        "chapters_failed": len(failed),
        "pages_embedded": sum(r.get("pages_embedded", 0) for r in embed_results),
        "pages_reused": sum(r.get("pages_reused", 0) for r in embed_results)
        + sum(states[c].get("n_ok", 0) for c in up_to_date),
        "pages_failed": sum(r.get("pages_failed", 0) for r in embed_results)
        + sum(states[c].get("n_error", 0) for c in up_to_date),
        "encoder_images": sum(r.get("encoder_images", 0) for r in embed_results),
        "encoder_batches": sum(r.get("encoder_batches", 0) for r in embed_results),
        "encoder_workers": workers,
        "faults": embed_faults.as_dict(),
        "seconds": round(time.perf_counter() - stage1_started, 3),
    }

    # stage 2: pools and search
    versions = {c: state["version"] for c, state in states.items() if c not in failed and state is not None}
    search_ledger = {} if rebuild or unfinished else read_ledger(layout.ledger("retrieval"))
    search_keys = {c: chapter_key(run_id, version) for c, version in versions.items()}
    search_vouched = vouched(search_ledger, search_keys)
    units = [  # a chapter the ledger vouches for needs no job
        Unit(
            c,
            None
            if c in search_vouched
            else SearchJob(str(layout.root), str(store.folder), run_id, c, versions[c], params, params.faiss_threads),
        )
        for c in chapters
        if c in versions
    ]
    report = run_units(
        units,
        search_chapter,
        is_done=lambda unit: None if rebuild else search_done(layout, unit.payload),
        desc="retrieval search",
        num_cpus=params.faiss_threads,
        local=local,
        vouched=search_vouched,
    )
    failed.update({r["key"]: r["error"] for r in report.failed})
    search_summary = {
        "chapters_searched": len(report.results) - len(report.failed),
        "chapters_reused": len(report.skipped),
        "chapters_vouched": len(search_vouched),  # reused per the ledger, without a check
        "chapters_failed": len(report.failed),
        "faults": report.faults.as_dict(),
        "seconds": round(report.seconds, 3),
    }
    stage_faults = FaultCounts()
    for counts in (embed_faults, report.faults):
        stage_faults.add(counts)

    # the tables: every chapter's record (from its search task, its check or the ledger), failed chapters' error
    # parts
    searched = {r["key"]: _search_record(r) for r in report.results if r.get("status") != STATUS_ERROR}
    records = searched | report.skipped_records
    search_entries = {c: LedgerEntry(search_keys[c], records[c]) for c in [*searched, *report.skipped]}
    embed_entries = {  # the entries the ledger vouched for stay as they were (their stored text is reused)
        c: embed_ledger[c]
        if c in embed_trusted
        else LedgerEntry(embed_keys[c], {k: states[c].get(k, 0) for k in ("version", "n_ok", "n_error")})
        for c in versions
        if c in embed_keys
    }
    error_frames = _stored_pages(layout, set(failed)) if failed else {}
    error_pools = 0
    for chapter_id in sorted(failed):
        rows = [
            error_pool(f, f"chapter failed: {failed[chapter_id]}").row(chapter_id)
            for f in error_frames.get(chapter_id, [])
        ]
        records[chapter_id] = {"parts": {"pools": _failed_search(layout, chapter_id, rows)}, "pools_rows": len(rows)}
        error_pools += len(rows)
    histogram: Counter[str] = Counter()
    frames = {"frames": 0, "frames_ok": 0, "frames_short": 0, "frames_excluded": 0, "frames_error": 0}
    for chapter_id in chapters:
        record = records.get(chapter_id, {})
        histogram.update(record.get("distinct_ref_pages", {}))
        for key in frames:
            frames[key] += record.get(key, 0)
    frames["frames"] += error_pools
    frames["frames_error"] += error_pools
    tables = {
        name: tables_fingerprint({c: r["parts"][name] for c, r in records.items() if name in r.get("parts", {})})
        for name in ("pools", "retrievals")
    }
    pool_table_rows = sum(r.get("pools_rows", 0) for r in records.values())
    pool_refs = [r["pool_refs"] for r in records.values() if r.get("pool_refs")]
    retrieval_rows = sum(r.get("retrievals", 0) for r in records.values())
    summary = {
        "stage": "retrieval",
        "complete": not failed,  # False makes the whole-pipeline job run this stage again (failed chapters)
        "encoder": {"spec": info.spec, "encoder_id": info.encoder_id, "fingerprint": info.fingerprint},
        "run_id": run_id,
        "params": params.search_settings(),
        "chapters": len(chapters),
        "chapters_purged": len(purged),
        "embeddings": embed_summary,
        "search": search_summary,
        **frames,
        "pools_rows": pool_table_rows,
        "retrieval_rows": retrieval_rows,
        "distinct_ref_pages_per_frame": distinct_pages_summary(dict(histogram)),
        # reference pages in a usable frame's pool: --refs, fewer in short pools, never under --min-refs
        "pool_refs_per_frame": {"min": min(r[0] for r in pool_refs), "max": max(r[1] for r in pool_refs)}
        if pool_refs
        else {},
        "tables": tables,  # fingerprints from the parts' sha256 (the shard stage's plan builds on them)
        "failures": [{"chapter_id": c, "error": failed[c]} for c in sorted(failed)],
        "faults": stage_faults.as_dict(),
        "outputs": {
            "embeddings": str(store.folder.relative_to(layout.root)),
            "run": str(run_folder.relative_to(layout.root)),
            "pools": layout.pools.name,
            "retrievals": layout.retrievals.name,
        },
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_ledger(embed_ledger_path, embed_entries, embed_ledger)
    write_ledger(layout.ledger("retrieval"), search_entries, search_ledger)
    atomic_write_json(layout.summary("retrieval"), summary)
    return summary
