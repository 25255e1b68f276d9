"""Shard-writing MB/s against one sequential file of the same bytes, sample assembly per core, and the bytes a
sample costs, in one run.

Builds a data folder with the real upstream stages (generated "small" corpus at 1.5x scale, ingestion, weight-free
retrieval, halftone screentone at the training size) and assembles every frame's sample once in memory, timed in
CPU seconds of this one process (the per-core figure, which a busy shared machine distorts less; wall clock is
printed too). Then it times (a) `pipelines.shards.writer.write_tar` + the Parquet index, shard by shard, as the job
writes them (temporary name, fsync, rename, folder fsync), and (b) the baseline: the same member bytes written
sequentially as ONE file per shard, fsynced (file and folder), the least any durable writer must do. Both run
interleaved on the same disk and start after an `os.sync()`; the tar writer also hashes (sha256) everything it
writes. It also prints bytes per member and per sample, and what the alternative encodings would cost
(screentone as JPEG, colour as PNG), the figures behind the encoding choice.

Run: ``.venv/bin/python bench/bench_shards.py [--size 512x800] [--scale 1.5] [--repeat 5] [--copies 5] [--work DIR]``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.core.layout import DataLayout
from pipelines.core.samples import FIELDS, FrameRecord, SampleConfig, sample_nbytes
from pipelines.core.schemas import PAGES, SHARD_INDEX, table_from_rows
from pipelines.core.storage import fsync_dir, read_json, read_table, write_parquet
from pipelines.ingest.stage import run_ingest
from pipelines.retrieval.stage import run_retrieval
from pipelines.sample_corpus.generate import generate_corpus
from pipelines.screentone.stage import ScreentoneOptions, run_screentone
from pipelines.shards.writer import iter_frame_samples, write_tar

MB = 1e6


def build_data(work: Path, size: tuple[int, int], scale: float) -> Path:
    corpus, out = work / "corpus", work / "out"
    if not (out / "screentone.summary.json").exists():
        generate_corpus(corpus, preset="small", scale=scale, overwrite=True)
        run_ingest(corpus, out, local=True, verbose=False)
        run_retrieval(out, encoder="weightfree", width=size[0], height=size[1], local=True)
        run_screentone(str(out), ScreentoneOptions(width=size[0], height=size[1]), local=True)
    return out


def frames_of(layout: DataLayout) -> list[FrameRecord]:
    pages = read_table(layout.pages, PAGES).to_pylist()
    return sorted(
        (
            FrameRecord(p["page_id"], p["series"], p["chapter_id"], p["chapter"], p["page_index"])
            for p in pages
            if p["stored"]
        ),
        key=lambda f: (f.chapter_id, f.frame_id),
    )


def write_shards(folder: Path, shards: list[list[dict]]) -> int:
    total = 0
    for number, samples in enumerate(shards):
        tar = folder / f"bench-{number:06d}.tar"
        result = write_tar(tar, samples)
        rows = [{**e, "frame_id": e["key"], "series": "", "chapter_id": "", "shard": tar.name} for e in result.entries]
        write_parquet(table_from_rows(rows, SHARD_INDEX), tar.with_suffix(".index.parquet"), SHARD_INDEX)
        total += result.nbytes
    return total


def write_sequential(folder: Path, shards: list[list[dict]]) -> int:
    """The baseline: each shard's member bytes as one file written front to back, fsynced, then its folder."""
    total = 0
    for number, samples in enumerate(shards):
        with open(folder / f"bench-{number:06d}.bin", "wb", buffering=1 << 20) as fh:
            for sample in samples:
                for field in FIELDS:
                    fh.write(sample[field])
                    total += len(sample[field])
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(folder)
    return total


def timed_alternately(work: Path, shards: list[list[dict]], repeat: int) -> dict[str, tuple[float, int]]:
    """Median seconds and bytes of each writer, runs interleaved so both see the same disk and cache state."""
    writers = {"shards": write_shards, "sequential": write_sequential}
    times: dict[str, list[float]] = {name: [] for name in writers}
    nbytes: dict[str, int] = {}
    for _ in range(repeat):
        for name, writer in writers.items():
            folder = work / name
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            os.sync()  # flush the previous run's dirty pages outside the timing: both writers start equal
            started = time.perf_counter()
            nbytes[name] = writer(folder, shards)
            times[name].append(time.perf_counter() - started)
    for name in writers:
        shutil.rmtree(work / name)
    return {name: (statistics.median(times[name]), nbytes[name]) for name in writers}


def encoding_alternatives(samples: list[dict]) -> dict[str, float]:
    """Mean bytes of tone as JPEG q95 (and the error it makes) and of colour as lossless PNG."""
    tone_jpeg, tone_error, tone_max, color_png = [], [], [], []
    for sample in samples:
        tone = Image.open(io.BytesIO(sample["tone.png"]))
        buf = io.BytesIO()
        tone.save(buf, format="JPEG", quality=95)
        tone_jpeg.append(len(buf.getvalue()))
        back = np.asarray(Image.open(io.BytesIO(buf.getvalue())), np.int16)
        difference = np.abs(back - np.asarray(tone, np.int16))
        tone_error.append(float(difference.mean()))
        tone_max.append(float(difference.max()))
        buf = io.BytesIO()
        Image.open(io.BytesIO(sample["color.jpg"])).save(buf, format="PNG", compress_level=6)
        color_png.append(len(buf.getvalue()))
    return {
        "tone_as_jpeg_q95": statistics.mean(tone_jpeg),
        "tone_jpeg_error": statistics.mean(tone_error),
        "tone_jpeg_max_error": max(tone_max),
        "color_as_png": statistics.mean(color_png),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512x800", help="training size WxH")
    parser.add_argument("--scale", type=float, default=1.5, help="page scale of the generated corpus")
    parser.add_argument("--samples-per-shard", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--copies", type=int, default=5, help="write the samples this many times per repetition")
    parser.add_argument("--work", type=Path, default=None, help="keep the generated data here (reused if present)")
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-shards-"))
    out = build_data(work, size, args.scale)
    layout = DataLayout.at(out)
    renderer_id = read_json(layout.summary("screentone"))["renderer_id"]
    config = SampleConfig(width=size[0], height=size[1], renderer_id=renderer_id)

    started, cpu_started = time.perf_counter(), time.process_time()
    built = [s for _, s, _ in iter_frame_samples(layout, frames_of(layout), config) if s is not None]
    build_seconds, build_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    if not built:
        raise SystemExit("no sample could be built: check the upstream stages' outputs")
    written = [dict(s, __key__=f"{s['__key__']}x{copy}") for copy in range(args.copies) for s in built]
    shards = [written[i : i + args.samples_per_shard] for i in range(0, len(written), args.samples_per_shard)]

    results = timed_alternately(work, shards, args.repeat)
    (shard_seconds, shard_bytes), (plain_seconds, plain_bytes) = results["shards"], results["sequential"]
    shard_rate, plain_rate = shard_bytes / MB / shard_seconds, plain_bytes / MB / plain_seconds

    print(
        f"samples: {len(built)} at {size[0]}x{size[1]} (GSRP {config.hires_size[0]}x{config.hires_size[1]}), "
        f"written {args.copies}x as {len(shards)} shards of {args.samples_per_shard}"
    )
    print(
        f"sample assembly (one process: decode, fit, ring, encode): {len(built) / build_cpu:.2f} samples per "
        f"CPU-second, i.e. per core; {len(built) / build_seconds:.2f} samples/s wall clock ({len(built)} samples)"
    )
    print("bytes per member (mean):")
    for field in FIELDS:
        print(f"  {field:<13} {statistics.mean(len(s[field]) for s in built) / 1e3:9.1f} kB")
    per_sample = statistics.mean(sample_nbytes(s) for s in built)
    print(f"  {'sample':<13} {per_sample / 1e3:9.1f} kB  ({shard_bytes / len(written) / 1e3:.1f} kB in the tar)")
    alternatives = encoding_alternatives(built)
    print(
        f"  tone as JPEG q95 instead of PNG: {alternatives['tone_as_jpeg_q95'] / 1e3:.1f} kB (near-bitonal dots "
        f"compress far better losslessly), and lossy: mean abs error {alternatives['tone_jpeg_error']:.2f}, "
        f"max {alternatives['tone_jpeg_max_error']:.0f} grey levels"
    )
    print(f"  colour as PNG instead of JPEG q95: {alternatives['color_as_png'] / 1e3:.1f} kB")
    print(
        f"shards (tar + index, fsynced): {shard_rate:8.1f} MB/s  ({shard_bytes / MB:.1f} MB in {shard_seconds:.3f} s)"
    )
    print(
        f"one sequential file, fsynced:  {plain_rate:8.1f} MB/s  ({plain_bytes / MB:.1f} MB in {plain_seconds:.3f} s)"
    )
    print(f"ratio shards / sequential file: {shard_rate / plain_rate:.2f}")
    blob = b"".join(s[field] for s in built for field in FIELDS)
    started = time.perf_counter()
    hashlib.sha256(blob).hexdigest()
    print(f"(sha256 alone, which the manifest needs: {len(blob) / MB / (time.perf_counter() - started):.0f} MB/s)")
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
