"""The training data streams of ICP and GSRP: shards in, tensors out, in an order fixed by the seed.

Shards are the WebDataset tars `jobs.shards` writes (see `pipelines.core.samples` for the members). They are read
with wids (`wids.IndexedTarSamples`: an mmap of the tar and an index of its members), so a sample is a seek,
and only the members a stream needs are decoded: ICP reads color.jpg, grey.png, tone.png, ring.jpg and json;
GSRP reads hr_color.jpg, hr_grey.png, hr_tone.png and json. With a line-art variant (``sketch``, ``shading``: sample
format 3) ICP reads that member in place of grey and tone, and GSRP hr_sketch.png (the plain line art, its guide
for both styles) in place of hr_grey and hr_tone.

The order is a pure function of the seed, so a run, its rerun and its resumption read the same samples:

- Epoch e orders all N samples: shards sorted by a hash of (seed, e, shard name), taken in groups of
  `shuffle_shards`, and the samples of each group sorted by a hash of (seed, e, shard name, index). Frames of a
  chapter sit together in a shard; a group mixes the chapters of its shards, and a worker keeps only the group's
  shards open (`shuffle_shards=0` mixes the whole dataset).
- The epochs are concatenated into one endless stream; global position p belongs to rank ``p % world_size``.
- A rank's stream is cut into blocks of `batch_size` positions; DataLoader worker w of W reads blocks
  ``b0 + w, b0 + w + W, ...``, which is the order in which a DataLoader with that batch size returns them. So a
  rank sees the same batches whatever its number of workers, ranks and workers never share a position, and a
  run resumed at `start_sample` (samples of its rank already consumed, a multiple of the batch size) continues
  exactly where the saved run stopped.
- The B&W frame's alpha is the project's one draw (`variant_alpha` of seed, epoch and key), and every random
  crop is a hash of (seed, epoch, key) too: a sample gets new ones each epoch and the same ones on any rerun.

A sample that fails to read or decode is logged, counted (``bad_skipped`` on the next good sample) and skipped;
its slot is filled by the next good sample of the same worker's stream, so batch boundaries, and with them
exact resumption, survive bad samples.

ICP samples: the canvases come from `pipelines.core.sample_inputs.composite_inputs` (the one composite of training,
validation and colorize), then the patch-wise crop: a window of the 2W x 2H canvas that always contains the
whole centre frame (side scale ~ U(crop_scale) of the frame's, aspect ~ log-U(crop_aspect) of the frame's,
position uniform among windows containing the frame), resized to the training size; the mask is cropped the
same way and taken to latent size by nearest neighbour (as BrushNet trains). Images are float tensors in [-1, 1].
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from pipelines.core.errors import PreconditionError
from pipelines.core.geometry import CompositeLayout
from pipelines.core.sample_inputs import (
    LINE_ART_MEMBERS,
    CompositeInputs,
    as_image,
    as_meta,
    blended_bw,
    composite_inputs,
    variant_alpha,
)
from pipelines.core.samples import (
    FIELD_COLOR,
    FIELD_GREY,
    FIELD_HR_COLOR,
    FIELD_HR_GREY,
    FIELD_HR_SKETCH,
    FIELD_HR_TONE,
    FIELD_META,
    FIELD_RING,
    FIELD_TONE,
    check_sample_format_version,
    require_line_art,
    require_sample_format,
)
from pipelines.core.storage import sha256_file

logger = logging.getLogger(__name__)

ICP_FIELDS: tuple[str, ...] = (FIELD_COLOR, FIELD_GREY, FIELD_TONE, FIELD_RING, FIELD_META)
GSRP_FIELDS: tuple[str, ...] = (FIELD_HR_COLOR, FIELD_HR_GREY, FIELD_HR_TONE, FIELD_META)


def icp_fields(variant: str | float) -> tuple[str, ...]:
    """The members an ICP stream of B&W `variant` reads: a line-art variant's member in place of grey and tone."""
    if variant in LINE_ART_MEMBERS:
        return (FIELD_COLOR, LINE_ART_MEMBERS[variant], FIELD_RING, FIELD_META)
    return ICP_FIELDS


def gsrp_fields(variant: str | float) -> tuple[str, ...]:
    """The members a GSRP stream reads: the plain line art at the GSRP size for both line-art variants."""
    return (FIELD_HR_COLOR, FIELD_HR_SKETCH, FIELD_META) if variant in LINE_ART_MEMBERS else GSRP_FIELDS


TRAIN_SPLIT = "train"
MAX_CONSECUTIVE_BAD = 64  # a stream with this many bad samples in a row is broken, not unlucky


# ---- shard resolution ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSource:
    """The shards of a split, their sample counts, and the manifest hash that names the dataset in exports."""

    urls: tuple[str, ...]
    lengths: tuple[int, ...]
    manifest: str | None  # the manifest or wids index the shards came from, if any
    sha256: str  # of the manifest file, else of the url list and lengths
    shard_bytes: tuple[int | None, ...] = ()  # per shard, as the manifest records them (empty: not recorded)
    shard_sha256: tuple[str | None, ...] = ()
    frame_sizes: tuple[tuple[int, int], ...] = ()  # (W, H) of the samples, as the manifest records them
    shard_groups: tuple[int, ...] = ()  # per shard, its index in frame_sizes when the source mixes sizes
    names: tuple[str, ...] = ()  # per shard, the name its order hashes (default: the file name)
    sample_format_version: int | None = None  # as the manifest records it (None: not recorded, e.g. bare URLs)

    @property
    def nsamples(self) -> int:
        return sum(self.lengths)

    @property
    def mixes_sizes(self) -> bool:
        return len(set(self.shard_groups)) > 1


def merge_sources(sources: Sequence[ShardSource], sizes: Sequence[tuple[int, int]]) -> ShardSource:
    """Several data roots as one source (`sizes`: each root's frame size): shards concatenated, each tagged with its
    size group, named ``<root number>/<file name>`` for the order (two roots hold shards of the same file names)."""
    groups = sorted(set(sizes), key=lambda size: (size[0] * size[1], size))
    shard_groups, names, shard_bytes, shard_sha256 = [], [], [], []
    for number, (source, size) in enumerate(zip(sources, sizes, strict=True)):
        count = len(source.urls)
        shard_groups += [groups.index(size)] * count
        names += [f"{number}/{name}" for name in shard_names(source)]
        shard_bytes += list(source.shard_bytes or (None,) * count)
        shard_sha256 += list(source.shard_sha256 or (None,) * count)
    digest = hashlib.sha256("\x1f".join(source.sha256 for source in sources).encode()).hexdigest()
    versions = [source.sample_format_version for source in sources]
    return ShardSource(
        urls=tuple(url for source in sources for url in source.urls),
        lengths=tuple(length for source in sources for length in source.lengths),
        manifest=" + ".join(str(source.manifest) for source in sources),
        sha256=digest,
        shard_bytes=tuple(shard_bytes) if any(b is not None for b in shard_bytes) else (),
        shard_sha256=tuple(shard_sha256) if any(d is not None for d in shard_sha256) else (),
        frame_sizes=tuple(groups),
        shard_groups=tuple(shard_groups),
        names=tuple(names),
        sample_format_version=None if None in versions else min(versions),
    )


def shard_names(source: ShardSource) -> list[str]:
    """The names the order hashes: file names, not paths, so moving the data folder keeps the order."""
    return list(source.names) or [os.path.basename(urlparse(u).path) or u for u in source.urls]


def _split_manifest_path(path: Path, split: str) -> Path:
    """A data root, a shards folder, a split folder or a JSON file -> the JSON that lists the split's shards."""
    if path.is_dir():
        for candidate in (
            path / "shards" / split / "manifest.json",
            path / split / "manifest.json",
            path / "manifest.json",
            path / "index.wids.json",
        ):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"{path}: no shards manifest (looked for shards/{split}/manifest.json, {split}/manifest.json, "
            "manifest.json, index.wids.json): pass a data root written by jobs.shards, a manifest or shard URLs"
        )
    return path


def _read_manifest_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON shards manifest: {exc}") from exc


def _from_manifest(path: Path, split: str) -> ShardSource:
    """The one reader of the manifest formats (jobs.shards' dataset and split manifests, a wids index): the shards
    with their sample counts and, where recorded, their bytes, sha256 and the samples' frame size."""
    spec = _read_manifest_json(path)
    if "splits" in spec:  # the dataset manifest (shards/manifest.json): follow the split's own manifest
        if split not in spec["splits"]:
            raise ValueError(f"{path}: dataset manifest has no split {split!r} (has {sorted(spec['splits'])})")
        return _from_manifest(path.parent / spec["splits"][split]["manifest"], split)
    versions: list[Any] = []
    if "shardlist" in spec:  # a wids index
        entries = [(s["url"], int(s["nsamples"]), None, None) for s in spec["shardlist"]]
        base = spec.get("base")
    elif "shards" in spec:  # a split manifest: the current generation's immutable snapshot names the shard list
        versions = [spec.get("sample_format_version", 1)]
        versions += [g.get("sample_format_version", 1) for g in spec.get("generations", [])]
        require_sample_format(versions, str(path), reading=True)
        snapshot = spec.get("generation_manifest")
        if snapshot and path.name != snapshot and (path.parent / snapshot).is_file():
            return _from_manifest(path.parent / snapshot, split)
        entries = [
            (s.get("url", s.get("name")), int(s["nsamples"]), s.get("bytes"), s.get("sha256")) for s in spec["shards"]
        ]
        base = None
    else:
        raise ValueError(f"{path}: JSON has neither 'splits', 'shardlist' nor 'shards': not a shards manifest")
    root = base or str(path.parent)
    kept = [entry for entry in entries if entry[1] > 0]
    if not kept:
        raise ValueError(f"{path}: the manifest lists no shard with samples")
    dataset = path.parent.parent / "manifest.json"  # a split's folder sits in shards/, beside the dataset manifest
    sample = _read_manifest_json(dataset).get("sample", {}) if dataset.is_file() else {}
    return ShardSource(
        urls=tuple(url if "://" in url or os.path.isabs(url) else os.path.join(root, url) for url, *_ in kept),
        lengths=tuple(nsamples for _, nsamples, *_ in kept),
        manifest=str(path),
        sha256=sha256_file(path),
        shard_bytes=tuple(nbytes for *_, nbytes, _ in kept) if any(e[2] is not None for e in kept) else (),
        shard_sha256=tuple(digest for *_, digest in kept) if any(e[3] is not None for e in kept) else (),
        frame_sizes=((int(sample["width"]), int(sample["height"])),) if "width" in sample else (),
        sample_format_version=int(versions[0]) if versions else None,
    )


def resumed_source(source: ShardSource, checkpoint: Path | None) -> ShardSource:
    """The shards a run reads: a resumed run keeps the generation manifest its checkpoint recorded, so a new
    generation appended since does not change its sample order; a fresh run (or shards given as URLs) reads
    `source`, the current set."""
    state_path = checkpoint / "train_state.json" if checkpoint is not None else None
    if state_path is None or not state_path.is_file():
        return source
    pinned = json.loads(state_path.read_text()).get("shard_manifest")
    if not pinned or not _is_generation_manifest(pinned) or pinned == source.manifest:
        return source
    if not Path(pinned).is_file():
        raise PreconditionError(
            f"the checkpoint {checkpoint} was trained on {pinned}, which no longer exists: start a new run"
        )
    kept = _from_manifest(Path(pinned), TRAIN_SPLIT)
    _refuse_rewritten(kept, source)
    return kept


def _refuse_rewritten(pinned: ShardSource, current: ShardSource) -> None:
    """A tar a later generation rewrote under its name may keep its size (tars pad to 10 KiB blocks); the two
    manifests' sha256s tell, without reading a shard."""
    now = dict(zip(current.urls, current.shard_sha256, strict=True)) if current.shard_sha256 else {}
    for url, digest in zip(pinned.urls, pinned.shard_sha256 or (None,) * len(pinned.urls), strict=True):
        if digest is not None and now.get(url) not in (None, digest):
            raise PreconditionError(
                f"shard {url}: a later generation rewrote it (frames taken down or removed by the leakage check; "
                f"its sha256 in {current.manifest} differs from the one {pinned.manifest} records): start a new run "
                "on the current manifest"
            )


def shard_length(url: str) -> int:
    """Samples in one shard: from its Parquet index beside a local tar, else counted by wids' tar index."""
    local = _local_path(url)
    if local is not None:
        parquet_index = Path(str(local).removesuffix(".tar") + ".index.parquet")
        if parquet_index.is_file():
            return pq.ParquetFile(parquet_index).metadata.num_rows
    shard = _open_shard(url, _cache_dir())
    try:
        return len(shard)
    finally:
        shard.close()


def resolve_shard_source(data: str | os.PathLike | Sequence[str], split: str = TRAIN_SPLIT) -> ShardSource:
    """`data` as a data root, a shards manifest (dataset or split) or wids index, or shard URLs.

    URLs may use brace patterns and ``::`` separators (webdataset's `expand_urls`); a list of them is accepted.
    Several data roots or manifests (they may hold frames of different sizes) are merged into one source.
    """
    from webdataset.shardlists import expand_urls

    if not isinstance(data, str | os.PathLike):
        items = [str(x) for x in data]
        if len(items) == 1:
            return resolve_shard_source(items[0], split)
        if any(Path(item).is_dir() or item.endswith(".json") for item in items):
            sources = [resolve_shard_source(item, split) for item in items]
            return merge_sources(
                sources, [source.frame_sizes[0] if source.frame_sizes else frame_size(source) for source in sources]
            )
        urls = [u for item in items for u in expand_urls(item)]
    else:
        text = os.fspath(data)
        path = Path(text)
        if path.is_dir() or (path.suffix == ".json" and path.is_file()):
            return _from_manifest(_split_manifest_path(path, split), split)
        if path.suffix == ".json":
            raise FileNotFoundError(f"{path}: shards manifest not found")
        urls = expand_urls(text)
    if not urls:
        raise ValueError(f"no shard URLs in {data!r}")
    missing = [u for u in urls if _local_path(u) is not None and not _local_path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"shard files not found: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    lengths = [shard_length(u) for u in urls]
    kept = [(u, n) for u, n in zip(urls, lengths, strict=True) if n > 0]
    if not kept:
        raise ValueError(f"the shards {urls[:3]} hold no samples")
    digest = hashlib.sha256(json.dumps(kept, separators=(",", ":")).encode()).hexdigest()
    return ShardSource(tuple(u for u, _ in kept), tuple(n for _, n in kept), None, digest)


def check_shards(source: ShardSource, *, verify_sha256: bool = False) -> None:
    """Refuse damaged shards before training: each local tar must have the bytes (and, with `verify_sha256`, the
    sha256) its manifest records. Shards without a manifest get a warning and the check their tar headers allow
    (every member's data inside the file, the end-of-archive blocks present). Raises PreconditionError naming the
    first bad tar."""
    recorded = bool(source.shard_bytes)
    if not recorded:
        logger.warning(
            "shards given without a manifest: their sizes and hashes cannot be checked, only their tar headers "
            "(pass the data root or its shards manifest to check them fully)"
        )
    for number, url in enumerate(source.urls):
        local = _local_path(url)
        if local is None:
            continue  # remote shards are checked by wids' download
        if not local.is_file():
            raise PreconditionError(
                f"shard {url}: no such file (listed in {source.manifest}); a later generation removed it (taken "
                "down or compacted) or it was never copied: start a new run on the current manifest"
                if _is_generation_manifest(source.manifest)
                else f"shard {url}: no such file (listed in {source.manifest})"
            )
        size = local.stat().st_size
        if recorded:
            expected = source.shard_bytes[number]
            if expected is not None and size != expected:
                state = "truncated" if size < expected else "longer than written"
                raise PreconditionError(
                    f"shard {url}: {state}: {size} bytes, its manifest {source.manifest} records {expected}; "
                    + (
                        "a later generation may have rewritten it (frames taken down or removed by the leakage "
                        "check): start a new run on the current manifest, or copy the shard again"
                        if _is_generation_manifest(source.manifest)
                        else "rewrite it with python -m jobs.shards --data OUT or copy it again"
                    )
                )
            digest = source.shard_sha256[number] if source.shard_sha256 else None
            if verify_sha256 and digest is not None and sha256_file(local) != digest:
                raise PreconditionError(
                    f"shard {url}: its sha256 differs from the one its manifest {source.manifest} records: the file "
                    "is damaged; rewrite it with python -m jobs.shards --data OUT or copy it again"
                )
        else:
            problem = tar_problem(local)
            if problem:
                raise PreconditionError(f"shard {url}: {problem}")


def _is_generation_manifest(manifest: str | None) -> bool:
    """A split's immutable per-generation manifest (``manifest.g0003.json``), which a resumed run keeps reading."""
    return manifest is not None and Path(manifest).name.startswith("manifest.g")


def tar_problem(path: Path) -> str | None:
    """What the tar headers say is wrong with a tar file (None when nothing): a truncated member, a missing end."""
    size = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tar:
            end = 0
            for member in tar:
                end = member.offset_data + member.size
                if end > size:
                    return f"truncated: member {member.name} ends at byte {end}, the file has {size} bytes"
    except tarfile.TarError as exc:
        state = "truncated" if "unexpected end" in str(exc) else "not a readable tar"
        return f"{state} ({exc})"
    if end + 2 * tarfile.BLOCKSIZE > size:
        return f"truncated: the file ends ({size} bytes) without the tar's end-of-archive blocks"
    return None


def first_samples(urls: Sequence[str], count: int) -> list[dict[str, Any]]:
    """The first `count` raw samples (member name -> bytes) of the shards in order: fixed validation samples."""
    samples: list[dict[str, Any]] = []
    for url in urls:
        shard = _open_shard(url, _cache_dir())
        try:
            for index in range(min(len(shard), count - len(samples))):
                raw = shard[index]
                samples.append({k: v.getvalue() if isinstance(v, io.BytesIO) else v for k, v in raw.items()})
        finally:
            shard.close()
        if len(samples) >= count:
            break
    return samples


def frame_size(source: ShardSource) -> tuple[int, int]:
    """The (W, H) frame size of a source's samples, read from its first sample's metadata."""
    size = _meta(first_samples(source.urls, 1)[0])["size"]
    return int(size[0]), int(size[1])


def resolve_train_shards(data: str | os.PathLike | Sequence[str]) -> list[str]:
    """The train split's shard URLs from a data root, a shards manifest, or shard URLs / brace patterns."""
    return list(resolve_shard_source(data, TRAIN_SPLIT).urls)


# ---- reading shards with wids ------------------------------------------------------------------------------------


def _local_path(url: str) -> Path | None:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(url)
    return None


def _cache_dir() -> str:
    return os.environ.get("WIDS_CACHE", "/tmp/_wids_cache")


def _open_shard(url: str, cache_dir: str) -> Any:
    """A wids `IndexedTarSamples` over a shard: local tars are mapped in place, remote ones downloaded to the
    cache first (wids' downloader, so s3://, gs://, http(s):// and pipe: work as in wids)."""
    from wids.wids import IndexedTarSamples
    from wids.wids_dl import download_and_open

    local = _local_path(url)
    if local is not None:
        return IndexedTarSamples(path=str(local))
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, quote(url, safe="+-"))
    with download_and_open(url, target) as stream:
        return IndexedTarSamples(path=target, stream=stream)


class ShardTruncated(Exception):
    """A sample lies past the end of what its shard holds: the tar was cut short (a partial copy or download)."""


class _OpenShards:
    """The shards a worker has open (an LRU of wids readers); only a group's shards are in use at a time."""

    def __init__(self, urls: Sequence[str], lengths: Sequence[int], capacity: int, cache_dir: str) -> None:
        self.urls, self.lengths, self.capacity, self.cache_dir = list(urls), list(lengths), max(1, capacity), cache_dir
        self._open: OrderedDict[int, Any] = OrderedDict()

    def sample(self, shard: int, index: int, fields: Sequence[str]) -> dict[str, Any]:
        """Sample `index` of a shard: only the members named in `fields` are read (``.<field>`` -> bytes).

        In a shard holding fewer samples than listed, the missing ones and the last one (its members may be cut)
        raise `ShardTruncated`, so the reason a user reads is the damage, not an IndexError."""
        if shard not in self._open:
            self._open[shard] = _open_shard(self.urls[shard], self.cache_dir)
            while len(self._open) > self.capacity:
                self._open.popitem(last=False)[1].close()
        self._open.move_to_end(shard)
        samples = self._open[shard]
        readable, listed = len(samples), self.lengths[shard]
        if readable < listed and index >= readable - 1:
            raise ShardTruncated(
                f"shard {self.urls[shard]} is truncated: {readable} of its {listed} samples are (partly) in the file"
            )
        reader = samples.reader  # wids' mmap reader: member (name, offset, size) by index
        out: dict[str, Any] = {}
        for member in samples.samples[index]:
            name, offset, _ = reader.by_index[member]
            key, _, field = name.partition(".")
            out["__key__"] = key
            if field in fields:
                out["." + field] = reader.get_at_offset(offset)[1]
        return out

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


# ---- the order ---------------------------------------------------------------------------------------------------


def _hash64(*parts: object) -> int:
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def unit_draw(seed: int, epoch: int, key: str, purpose: str) -> float:
    """A uniform draw in [0, 1) fixed by (seed, epoch, sample key, purpose): the crops' randomness."""
    digest = hashlib.sha256(f"{purpose}\x1f{seed}\x1f{epoch}\x1f{key}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)


def epoch_order(
    names: Sequence[str],
    lengths: Sequence[int],
    seed: int,
    epoch: int,
    shuffle_shards: int,
    *,
    size_groups: Sequence[int] = (),
    block: int = 1,
) -> np.ndarray:
    """The (shard, index) pairs of one epoch in reading order, an (N, 2) int64 array.

    Shards are ordered by a hash of (seed, epoch, name) and grouped by `shuffle_shards` (0: one group); each
    group's samples are ordered by a hash of (seed, epoch, name, index). Names, not paths: moving the data
    folder keeps the order.

    Shards of several frame sizes (`size_groups`, per shard) are ordered per size, each size's order is cut into
    blocks of `block` positions (one global batch: batch size x ranks) and the blocks of all sizes are interleaved
    by a hash of (seed, epoch, size, block): every batch of every rank holds one size. A size's last partial block
    waits for a later epoch (whose order differs), so an epoch holds `epoch_length` positions.
    """
    if len(set(size_groups)) > 1:
        return _blocks_by_size(names, lengths, seed, epoch, shuffle_shards, size_groups, block)
    shards = sorted(range(len(names)), key=lambda s: (_hash64(seed, epoch, "shard", names[s]), s))
    group = len(shards) if shuffle_shards <= 0 else shuffle_shards
    rows: list[tuple[int, int, int]] = []
    for start in range(0, len(shards), group):
        members = [
            (_hash64(seed, epoch, "sample", names[s], i), s, i)
            for s in shards[start : start + group]
            for i in range(lengths[s])
        ]
        members.sort()
        rows.extend(members)
    return np.asarray([(s, i) for _, s, i in rows], dtype=np.int64).reshape(-1, 2)


def _blocks_by_size(
    names: Sequence[str],
    lengths: Sequence[int],
    seed: int,
    epoch: int,
    shuffle_shards: int,
    size_groups: Sequence[int],
    block: int,
) -> np.ndarray:
    blocks: list[tuple[int, np.ndarray]] = []
    for group in sorted(set(size_groups)):
        members = [s for s in range(len(names)) if size_groups[s] == group]
        local = epoch_order([names[s] for s in members], [lengths[s] for s in members], seed, epoch, shuffle_shards)
        local[:, 0] = np.asarray(members, dtype=np.int64)[local[:, 0]]
        for start in range(0, len(local) - block + 1, block):
            blocks.append((_hash64(seed, epoch, "block", group, start // block), local[start : start + block]))
    blocks.sort(key=lambda item: item[0])
    return np.concatenate([rows for _, rows in blocks]) if blocks else np.zeros((0, 2), dtype=np.int64)


def epoch_length(lengths: Sequence[int], size_groups: Sequence[int], block: int) -> int:
    """Positions per epoch: every sample, or with several frame sizes the whole blocks of each size."""
    if len(set(size_groups)) <= 1:
        return sum(lengths)
    per_size: dict[int, int] = {}
    for length, group in zip(lengths, size_groups, strict=True):
        per_size[group] = per_size.get(group, 0) + length
    return sum(count - count % block for count in per_size.values())


def worker_positions(
    *, rank: int, world_size: int, worker: int, num_workers: int, batch_size: int, start_sample: int
) -> Iterator[int]:
    """Global stream positions one DataLoader worker reads, in order (endless).

    Rank r owns positions p = q * world_size + r (q: its own stream). Its stream is cut into blocks of
    `batch_size`; blocks b0 + worker, b0 + worker + num_workers, ... go to this worker (b0 = start_sample /
    batch_size), the order in which a DataLoader with that batch size hands them to the training loop.
    """
    if start_sample % batch_size:
        raise ValueError(f"start_sample {start_sample} must be a multiple of the batch size {batch_size}")
    block = start_sample // batch_size + worker
    while True:
        for q in range(block * batch_size, (block + 1) * batch_size):
            yield q * world_size + rank
        block += num_workers


# ---- the stream --------------------------------------------------------------------------------------------------


class ShardStream(IterableDataset):
    """An endless, seeded, resumable stream of transformed samples over shards (see the module docstring)."""

    def __init__(
        self,
        source: ShardSource,
        transform: Callable[[Mapping[str, Any], int], dict[str, Any]],
        fields: Sequence[str],
        *,
        seed: int,
        rank: int,
        world_size: int,
        batch_size: int = 1,
        shuffle_shards: int = 16,
        start_sample: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if start_sample < 0 or start_sample % batch_size:
            raise ValueError(f"start_sample {start_sample} must be a non-negative multiple of batch size {batch_size}")
        self.source, self.transform, self.fields = source, transform, tuple(fields)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batch_size, self.shuffle_shards, self.start_sample = batch_size, shuffle_shards, start_sample
        self.cache_dir = cache_dir or _cache_dir()
        self.names = shard_names(source)
        self.block = batch_size * world_size  # one global batch: the unit of one frame size
        self.epoch_length = epoch_length(source.lengths, source.shard_groups, self.block)
        if source.mixes_sizes:
            _check_sizes_fill_a_batch(source, self.block)

    def _order(self, epoch: int, cache: OrderedDict[int, np.ndarray]) -> np.ndarray:
        if epoch not in cache:
            cache[epoch] = epoch_order(
                self.names,
                self.source.lengths,
                self.seed,
                epoch,
                self.shuffle_shards,
                size_groups=self.source.shard_groups,
                block=self.block,
            )
            while len(cache) > 2:
                cache.popitem(last=False)
        return cache[epoch]

    def positions(self, worker: int = 0, num_workers: int = 1) -> Iterator[int]:
        return worker_positions(
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            batch_size=self.batch_size,
            start_sample=self.start_sample,
        )

    def locate(self, position: int, cache: OrderedDict[int, np.ndarray]) -> tuple[int, int, int]:
        """Global position -> (epoch, shard, index in shard)."""
        epoch, offset = divmod(position, self.epoch_length)
        shard, index = self._order(epoch, cache)[offset]
        return epoch, int(shard), int(index)

    def size_group(self, position: int, cache: OrderedDict[int, np.ndarray]) -> int:
        """The frame-size group of a position's sample (0 when the source holds one size)."""
        if not self.source.mixes_sizes:
            return 0
        return self.source.shard_groups[self.locate(position, cache)[1]]

    def _load(self, position: int, shards: _OpenShards, cache: OrderedDict[int, np.ndarray]) -> dict[str, Any]:
        epoch, shard, index = self.locate(position, cache)
        raw = shards.sample(shard, index, self.fields)
        out = self.transform(raw, epoch)
        out.update(position=position, epoch=epoch)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = _WorkerReader(self, self.positions(worker, num_workers))
        try:
            while True:
                yield reader.next_sample()
        finally:
            reader.close()

    def report_bad(self, position: int, cache: OrderedDict[int, np.ndarray], exc: Exception) -> str:
        """Log a skipped sample; returns its reason in one line (the trainers name it when they stop)."""
        epoch, shard, index = self.locate(position, cache)
        cause = str(exc) if isinstance(exc, ShardTruncated) else f"{type(exc).__name__}: {exc}"
        reason = f"{self.source.urls[shard]} sample {index}: {cause}"
        logger.warning("bad sample skipped: %s (stream position %d, epoch %d)", reason, position, epoch)
        return reason


def _check_sizes_fill_a_batch(source: ShardSource, block: int) -> None:
    for group, size in enumerate(source.frame_sizes):
        count = sum(n for n, g in zip(source.lengths, source.shard_groups, strict=True) if g == group)
        if count < block:
            raise ValueError(
                f"the {size[0]}x{size[1]} frames ({count} samples) do not fill one global batch of {block} "
                "(batch size x processes): batches hold one frame size; add samples of that size or drop its data root"
            )


class _WorkerReader:
    """One worker's pass over its positions: every position yields exactly one sample, a bad one the next good
    sample of the stream (read ahead once and kept for its own slot), so batches never shift."""

    def __init__(self, stream: ShardStream, positions: Iterator[int]) -> None:
        self.stream, self.positions = stream, positions
        group = stream.shuffle_shards if stream.shuffle_shards > 0 else len(stream.names)
        self.shards = _OpenShards(
            stream.source.urls, stream.source.lengths, min(len(stream.names), group + 1), stream.cache_dir
        )
        self.orders: OrderedDict[int, np.ndarray] = OrderedDict()
        self.ahead: list[int] = []  # positions drawn from `positions` while looking for a substitute
        self.loaded: dict[int, dict[str, Any] | None] = {}  # their outcome: the sample, or None when bad
        self.bad = 0  # bad samples found since the last yielded sample
        self.bad_reason = ""  # the last one's reason

    def _outcome(self, position: int) -> dict[str, Any] | None:
        if position in self.loaded:
            return self.loaded[position]
        try:
            sample = self.stream._load(position, self.shards, self.orders)
        except Exception as exc:  # noqa: BLE001 - one bad sample never stops training (the trainers' budget may)
            self.bad_reason = self.stream.report_bad(position, self.orders, exc)
            self.bad += 1
            return None
        return sample

    def next_sample(self) -> dict[str, Any]:
        position = self.ahead.pop(0) if self.ahead else next(self.positions)
        sample = self._outcome(position)
        self.loaded.pop(position, None)
        if sample is None:  # the substitute takes the slot: its position and epoch are the slot's
            sample = self._substitute(position)
            sample.update(position=position, epoch=position // self.stream.epoch_length)
        sample["bad_skipped"], self.bad = self.bad, 0
        sample["bad_reason"], self.bad_reason = self.bad_reason, ""
        return sample

    def _substitute(self, position: int) -> dict[str, Any]:
        """The next good sample of the same frame size (a batch holds one size); others keep their own slots."""
        size = self.stream.size_group(position, self.orders)
        bad = step = 0
        while bad < MAX_CONSECUTIVE_BAD:
            if step >= len(self.ahead):
                self.ahead.append(next(self.positions))
            candidate = self.ahead[step]
            step += 1
            if self.stream.size_group(candidate, self.orders) != size:
                continue
            outcome = self._outcome(candidate)
            self.loaded[candidate] = outcome
            if outcome is not None:
                return dict(outcome)
            bad += 1
        raise RuntimeError(
            f"{MAX_CONSECUTIVE_BAD} bad samples in a row after stream position {position}: the shards are broken"
        )

    def close(self) -> None:
        self.shards.close()


# ---- decoding and the per-sample transforms --------------------------------------------------------------------


def _member(raw: Mapping[str, Any], name: str) -> bytes:
    value = raw.get("." + name, raw.get(name))
    if value is None:
        raise KeyError(f"sample {raw.get('__key__')!r} has no member {name!r}")
    data = value.getvalue() if isinstance(value, io.BytesIO) else value.read() if hasattr(value, "read") else value
    return bytes(data)


def _image(raw: Mapping[str, Any], name: str, mode: str) -> Image.Image:
    return as_image(_member(raw, name), name, mode)


def _meta(raw: Mapping[str, Any], variant: str | float | None = None) -> dict[str, Any]:
    meta = as_meta(_member(raw, FIELD_META))
    where = f"sample {raw.get('__key__')!r}"
    check_sample_format_version(meta.get("sample_format_version"), where)
    if variant in LINE_ART_MEMBERS:
        require_line_art(meta.get("sample_format_version"), where, str(variant))
    return meta


def _bw_frame(raw: Mapping[str, Any], variant: str | float, alpha: float, hires: bool) -> Image.Image:
    """The B&W frame (RGB) of a sample: its line-art member, or grey and tone blended at `alpha`."""
    if variant in LINE_ART_MEMBERS:
        return _image(raw, FIELD_HR_SKETCH if hires else LINE_ART_MEMBERS[variant], "RGB")
    grey, tone = (FIELD_HR_GREY, FIELD_HR_TONE) if hires else (FIELD_GREY, FIELD_TONE)
    return blended_bw(_image(raw, grey, "L"), _image(raw, tone, "L"), alpha)


def _expect_size(image: Image.Image, size: Sequence[int], key: str, name: str) -> None:
    if image.size != tuple(size):
        raise ValueError(f"sample {key!r}: {name} is {image.size}, its metadata says {tuple(size)}")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a (3, h, w) float32 tensor in [-1, 1]."""
    return _unit_range(torch.from_numpy(np.array(image)).permute(2, 0, 1))


def _unit_range(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.to(torch.float32).mul_(1 / 127.5).sub_(1.0)


def crop_resize(image: Image.Image, box: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """Crop `box` of an RGB image and resize it to `size` (w, h): a (3, h, w) float32 tensor in [-1, 1].

    Antialiased bicubic on uint8 channels-last pixels (torch's vectorised path, the filter PIL uses, about 5x
    faster than PIL here: this resize is the largest cost of a sample).
    """
    left, top, right, bottom = box
    pixels = torch.from_numpy(np.array(image.crop(box))).permute(2, 0, 1)
    if (right - left, bottom - top) != tuple(size):
        pixels = F.interpolate(pixels[None], size=(size[1], size[0]), mode="bicubic", antialias=True)[0]
    return _unit_range(pixels)


def _sample_alpha(config: ICPDataConfig | GSRPDataConfig, key: str, seed: int, epoch: int) -> float:
    return variant_alpha(config.variant, key, seed=seed, epoch=epoch, alpha_range=tuple(config.alpha_range))


@dataclass(frozen=True)
class ICPDataConfig:
    """How ICP samples are made. `resolution` (W, H) defaults to the shards' frame size."""

    resolution: tuple[int, int] | None = None  # training (width, height) cap; None: each frame's own W x H
    variant: str | float = "screenstyle"  # B&W frame: the alpha draw, grey, tone, a tone weight, sketch or shading
    alpha_range: tuple[float, float] = (0.0, 1.0)
    crop_scale: tuple[float, float] = (1.25, 2.0)  # window side / frame side, uniform (clamped to [1, 2])
    crop_aspect: tuple[float, float] = (1.0, 1.0)  # window aspect / frame aspect, log-uniform
    latent_factor: int = 8  # the VAE's downsampling: the mask is returned at latent size
    batch_size: int = 1  # the DataLoader's batch size (workers serve whole batches)
    shuffle_shards: int = 16  # shards mixed together per group (0: the whole dataset)
    cache_dir: str | None = None  # where remote shards are downloaded (default $WIDS_CACHE or /tmp/_wids_cache)

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        if not 1.0 <= low <= high <= 2.0:
            raise ValueError(f"crop_scale must satisfy 1 <= low <= high <= 2, got {self.crop_scale}")
        if not 0 < self.crop_aspect[0] <= self.crop_aspect[1]:
            raise ValueError(f"crop_aspect must satisfy 0 < low <= high, got {self.crop_aspect}")
        if self.resolution is not None:
            width, height = self.resolution
            if width <= 0 or height <= 0 or width % self.latent_factor or height % self.latent_factor:
                raise ValueError(
                    f"resolution {width}x{height} must be positive multiples of the latent factor {self.latent_factor}"
                )
        variant_alpha(self.variant, "check", alpha_range=tuple(self.alpha_range))


@dataclass(frozen=True)
class GSRPDataConfig:
    """How GSRP samples are made: random crops of the high-resolution pair (the whole frame when smaller)."""

    crop_size: tuple[int, int] = (512, 512)  # (width, height), multiples of 8
    variant: str | float = "screenstyle"
    alpha_range: tuple[float, float] = (0.0, 1.0)
    batch_size: int = 1
    shuffle_shards: int = 16
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        width, height = self.crop_size
        if width <= 0 or height <= 0 or width % 8 or height % 8:
            raise ValueError(f"crop_size {width}x{height} must be positive multiples of 8 (the VAE's factor)")
        variant_alpha(self.variant, "check", alpha_range=tuple(self.alpha_range))


def training_size(frame: tuple[int, int], cap: tuple[int, int] | None, factor: int) -> tuple[int, int]:
    """The size a frame's crops train at: its own, each side capped by `--resolution` (None: no cap), in multiples
    of the VAE's factor. One data root: the resolution itself; several sizes: the larger ones capped, the smaller
    ones at their own size, so the crops (fractions of the frame) scale with the frame."""
    width, height = frame if cap is None else (min(frame[0], cap[0]), min(frame[1], cap[1]))
    return width - width % factor, height - height % factor


def crop_window(
    layout: CompositeLayout, config: ICPDataConfig, seed: int, epoch: int, key: str
) -> tuple[int, int, int, int]:
    """The patch-wise crop: a box of the 2W x 2H canvas that contains the whole centre frame.

    Side scale s ~ U(crop_scale) and aspect ratio a ~ log-U(crop_aspect) relative to the frame's give the size
    (clamped to [W, 2W] x [H, 2H]); the position is uniform among the boxes of that size containing the frame.
    """
    width, height = layout.width, layout.height
    scale = config.crop_scale[0] + (config.crop_scale[1] - config.crop_scale[0]) * unit_draw(seed, epoch, key, "scale")
    log_low, log_high = math.log(config.crop_aspect[0]), math.log(config.crop_aspect[1])
    aspect = math.exp(log_low + (log_high - log_low) * unit_draw(seed, epoch, key, "aspect"))
    box_w = min(2 * width, max(width, round(width * scale * math.sqrt(aspect))))
    box_h = min(2 * height, max(height, round(height * scale / math.sqrt(aspect))))
    frame_left, frame_top, frame_right, frame_bottom = layout.centre_box
    left_low, left_high = max(0, frame_right - box_w), min(frame_left, 2 * width - box_w)
    top_low, top_high = max(0, frame_bottom - box_h), min(frame_top, 2 * height - box_h)
    left = left_low + min(left_high - left_low, int(unit_draw(seed, epoch, key, "left") * (left_high - left_low + 1)))
    top = top_low + min(top_high - top_low, int(unit_draw(seed, epoch, key, "top") * (top_high - top_low + 1)))
    return left, top, left + box_w, top + box_h


@dataclass
class ICPCanvases:
    """The uncropped canvases of one sample: `composite_inputs` plus C_color (the target)."""

    key: str
    alpha: float
    composite: CompositeInputs
    c_color: Image.Image
    layout: CompositeLayout


def icp_canvases(raw: Mapping[str, Any], config: ICPDataConfig, *, seed: int, epoch: int) -> ICPCanvases:
    """Decode ICP's members of a raw shard sample and build its canvases with the one composite function."""
    meta = _meta(raw, config.variant)
    key = str(raw.get("__key__") or meta["key"])
    size = meta["size"]
    color = _image(raw, FIELD_COLOR, "RGB")
    ring = _image(raw, FIELD_RING, "RGB")
    alpha = _sample_alpha(config, key, seed, epoch)
    bw = _bw_frame(raw, config.variant, alpha, hires=False)
    for image, name in ((color, FIELD_COLOR), (bw, "the B&W frame")):
        _expect_size(image, size, key, name)
    _expect_size(ring, (2 * size[0], 2 * size[1]), key, FIELD_RING)
    layout = CompositeLayout(*size)
    composite = composite_inputs(layout, ring, bw)
    return ICPCanvases(key=key, alpha=alpha, composite=composite, c_color=layout.compose(ring, color), layout=layout)


def icp_sample(raw: Mapping[str, Any], epoch: int, *, config: ICPDataConfig, seed: int) -> dict[str, Any]:
    """One ICP training sample: cropped canvases as (3, h, w) tensors in [-1, 1] and the mask at latent size."""
    canvases = icp_canvases(raw, config, seed=seed, epoch=epoch)
    key = canvases.key
    layout = canvases.layout
    width, height = training_size((layout.width, layout.height), config.resolution, config.latent_factor)
    box = crop_window(layout, config, seed, epoch, key)

    left, top, right, bottom = box
    mask = torch.from_numpy(canvases.composite.mask[top:bottom, left:right].copy())[None, None]
    latent_size = (height // config.latent_factor, width // config.latent_factor)
    return {
        "key": key,
        "alpha": canvases.alpha,
        "c_color": crop_resize(canvases.c_color, box, (width, height)),
        "refs_only": crop_resize(canvases.composite.refs_only, box, (width, height)),
        "frame_only": crop_resize(canvases.composite.frame_only, box, (width, height)),
        "mask": F.interpolate(mask, size=latent_size, mode="nearest")[0],
        "crop": torch.tensor(box, dtype=torch.int64),
    }


def gsrp_window(
    size: tuple[int, int], crop: tuple[int, int], seed: int, epoch: int, key: str
) -> tuple[int, int, int, int]:
    """A crop box of `crop` (w, h) inside a frame of `size`, uniform in position; the whole side when smaller."""
    box_w, box_h = min(crop[0], size[0]), min(crop[1], size[1])
    left = min(size[0] - box_w, int(unit_draw(seed, epoch, key, "gsrp-left") * (size[0] - box_w + 1)))
    top = min(size[1] - box_h, int(unit_draw(seed, epoch, key, "gsrp-top") * (size[1] - box_h + 1)))
    return left, top, left + box_w, top + box_h


def gsrp_sample(raw: Mapping[str, Any], epoch: int, *, config: GSRPDataConfig, seed: int) -> dict[str, Any]:
    """One GSRP sample: the same random window of the high-resolution B&W frame (screenstyle blend at the
    sample's alpha draw; the plain line art for the line-art variants) and of the high-resolution colour frame, as
    (3, h, w) tensors in [-1, 1]."""
    meta = _meta(raw, config.variant)
    key = str(raw.get("__key__") or meta["key"])
    size = tuple(meta["hires_size"])
    hr_color = _image(raw, FIELD_HR_COLOR, "RGB")
    alpha = _sample_alpha(config, key, seed, epoch)
    hr_bw = _bw_frame(raw, config.variant, alpha, hires=True)
    for image, name in ((hr_color, FIELD_HR_COLOR), (hr_bw, "the high-resolution B&W frame")):
        _expect_size(image, size, key, name)
    box = gsrp_window(size, config.crop_size, seed, epoch, key)
    return {
        "key": key,
        "alpha": alpha,
        "hr_bw": to_tensor(hr_bw.crop(box)),
        "hr_color": to_tensor(hr_color.crop(box)),
        "crop": torch.tensor(box, dtype=torch.int64),
    }


@dataclass
class _Transform:
    """A picklable per-sample transform (DataLoader workers may be spawned)."""

    function: Callable[..., dict[str, Any]]
    config: Any
    seed: int

    def __call__(self, raw: Mapping[str, Any], epoch: int) -> dict[str, Any]:
        return self.function(raw, epoch, config=self.config, seed=self.seed)


def _source(urls: ShardSource | str | os.PathLike | Sequence[str]) -> ShardSource:
    return urls if isinstance(urls, ShardSource) else resolve_shard_source(urls)


def _rank_stream(
    urls: ShardSource | str | os.PathLike | Sequence[str],
    function: Callable[..., dict[str, Any]],
    fields: Sequence[str],
    config: ICPDataConfig | GSRPDataConfig,
    *,
    seed: int,
    rank: int,
    world_size: int,
    start_sample: int,
) -> ShardStream:
    """One rank's ShardStream of `function`'s samples: ICP and GSRP differ only in the transform and the members
    read, so batching, shuffling, resume and caching are set from the config in one place. A line-art variant on
    a dataset whose manifest records an older sample format is refused here, in one line."""
    source = _source(urls)
    check_variant(source, config.variant)
    return ShardStream(
        source,
        _Transform(function, config, seed),
        fields,
        seed=seed,
        rank=rank,
        world_size=world_size,
        batch_size=config.batch_size,
        shuffle_shards=config.shuffle_shards,
        start_sample=start_sample,
        cache_dir=config.cache_dir,
    )


def build_icp_dataset(
    urls: ShardSource | str | os.PathLike | Sequence[str],
    config: ICPDataConfig,
    *,
    seed: int,
    rank: int,
    world_size: int,
    start_sample: int = 0,
) -> ShardStream:
    """The ICP stream of one rank: dicts with key, alpha, c_color, refs_only, frame_only (3, H, W), mask
    (1, H/f, W/f), crop box, position, epoch and bad_skipped. Use a DataLoader with ``config.batch_size``."""
    return _rank_stream(
        urls,
        icp_sample,
        icp_fields(config.variant),
        config,
        seed=seed,
        rank=rank,
        world_size=world_size,
        start_sample=start_sample,
    )


def build_gsrp_dataset(
    urls: ShardSource | str | os.PathLike | Sequence[str],
    config: GSRPDataConfig,
    *,
    seed: int,
    rank: int,
    world_size: int,
    start_sample: int = 0,
) -> ShardStream:
    """The GSRP stream of one rank: dicts with hr_bw and hr_color (3, h, w) in [-1, 1], key, alpha, crop box,
    position, epoch and bad_skipped. Use a DataLoader with ``config.batch_size``."""
    return _rank_stream(
        urls,
        gsrp_sample,
        gsrp_fields(config.variant),
        config,
        seed=seed,
        rank=rank,
        world_size=world_size,
        start_sample=start_sample,
    )


def check_variant(source: ShardSource, variant: str | float) -> None:
    """Refuse a line-art variant, in one line, on shards whose manifest records a format without line art (bare
    shard URLs record none: their samples are checked one by one as they are read)."""
    if variant in LINE_ART_MEMBERS and source.sample_format_version is not None:
        require_line_art(source.sample_format_version, str(source.manifest), str(variant))


def bw_variant_arg(text: str) -> str | float:
    """A --bw_variant value: a blend weight as a float, else a variant name (checked by the data config)."""
    try:
        return float(text)
    except ValueError:
        return text
