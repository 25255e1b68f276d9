"""Write the training shards, splits, benchmark and leakage report: `python -m jobs.shards --data OUT [options]`."""

from __future__ import annotations

import argparse
import json
import re
import sys

from jobs.common import (
    add_common_arguments,
    add_fault_arguments,
    add_ray_arguments,
    add_verify_argument,
    configure_fault_policy,
    line_extractor_file,
    start_ray,
)
from pipelines.core.cli import JobArgumentParser, parse_size, positive_int, run_job
from pipelines.core.geometry import CompositeLayout
from pipelines.runtime.preconditions import require_stage
from pipelines.shards.stage import ShardOptions, run_shards

PROG = "python -m jobs.shards"

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'1GB', '500MB', '2GiB', '123456' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"size {text!r} is not a byte count such as 1GB, 500MB or 2GiB")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return value


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    """The shard stage's own options (shared with jobs.pipeline); --size, --hires-scale, --renderer, --seed are
    added by the caller, since other stages use them too."""
    samples = parser.add_argument_group("samples")
    samples.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of the colour members")
    shards = parser.add_argument_group("shards")
    shards.add_argument("--shard-size", type=parse_bytes, default=10**9, help="target bytes per tar (default 1GB)")
    shards.add_argument(
        "--max-samples", type=positive_int, default=None, help="cap on samples per tar (default: only --shard-size)"
    )
    shards.add_argument(
        "--estimate-frames", type=positive_int, default=8, help="frames built to measure bytes per sample"
    )
    generations = parser.add_argument_group("generations (shards are append-only)")
    generations.add_argument(
        "--min-generation-samples",
        type=positive_int,
        default=None,
        help="new frames that make a new generation of shards; fewer wait for a later run (default: one shard's "
        "worth; the first generation is always written)",
    )
    generations.add_argument(
        "--flush", action="store_true", help="write the waiting new frames as a generation now, however few"
    )
    generations.add_argument(
        "--compact",
        action="store_true",
        help="merge every shard smaller than a full one into new shards of a new generation (the small shards' "
        "names go away; never done without this flag)",
    )
    generations.add_argument(
        "--rebuild",
        action="store_true",
        help="delete the shards and the benchmark and write them again as generation g0000 (needed after a "
        "change of sample format or of sample or shard settings)",
    )
    splits = parser.add_argument_group("splits and benchmark")
    splits.add_argument("--val-fraction", type=float, default=0.05, help="share of non-benchmark series in val")
    splits.add_argument("--bench-chapters", type=int, default=30, help="benchmark chapters (0: no benchmark)")
    splits.add_argument("--bench-refs", type=int, default=40, help="colour reference pages per benchmark chapter")
    splits.add_argument("--bench-bw", type=int, default=50, help="black-and-white pages per benchmark chapter")
    splits.add_argument(
        "--bench-size",
        type=parse_size,
        default=None,
        help="benchmark page size WxH (default: the GSRP size, --size x --hires-scale)",
    )
    splits.add_argument(
        "--bench-max-series-fraction", type=float, default=0.1, help="cap on the share of series held out"
    )
    splits.add_argument(
        "--bench-series", nargs="+", default=None, help="hold out exactly these series (default: a seeded choice)"
    )
    leakage = parser.add_argument_group("leakage check")
    leakage.add_argument("--leakage-threshold", type=float, default=0.95, help="cosine of a duplicate candidate")
    leakage.add_argument("--no-leakage-confirm", action="store_true", help="skip the edge-hash confirmation")
    leakage.add_argument("--ivf-min-train", type=int, default=100_000, help="training pages from which IVF is used")
    leakage.add_argument(
        "--keep-frames-referencing-duplicates",
        action="store_true",
        help="drop only the duplicate pages, not also the training frames whose references show them",
    )


def shard_options(args: argparse.Namespace) -> ShardOptions:
    return ShardOptions(
        size=args.size,
        hires_scale=args.hires_scale,
        fit_resample=args.fit_resample,
        shard_size=args.shard_size,
        max_samples=args.max_samples,
        estimate_frames=args.estimate_frames,
        jpeg_quality=args.jpeg_quality,
        val_fraction=args.val_fraction,
        bench_chapters=args.bench_chapters,
        bench_refs=args.bench_refs,
        bench_bw=args.bench_bw,
        bench_size=args.bench_size,
        bench_max_series_fraction=args.bench_max_series_fraction,
        bench_series=tuple(args.bench_series) if args.bench_series else None,
        seed=args.seed,
        renderer=args.renderer,
        line_extractor_weights=line_extractor_file(args.line_extractor_weights),
        leakage_threshold=args.leakage_threshold,
        leakage_confirm=not args.no_leakage_confirm,
        ivf_min_train=args.ivf_min_train,
        drop_frames_referencing_duplicates=not args.keep_frames_referencing_duplicates,
        min_generation_samples=args.min_generation_samples,
        flush=args.flush,
        compact=args.compact,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = JobArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--data", required=True, help="the data folder of the earlier stages (OUT)")
    add_common_arguments(parser)
    add_shard_arguments(parser)
    add_fault_arguments(parser)
    add_verify_argument(parser)
    add_ray_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    CompositeLayout(*args.size)  # a size the composite cannot use is refused before any work
    for stage in ("ingest", "retrieval", "screentone"):
        require_stage(args.data, stage, needed_by="shards")
    configure_fault_policy(args)
    start_ray(args)
    summary = run_shards(args.data, shard_options(args), local=args.local, rebuild=args.rebuild, verify=args.verify)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return summary


if __name__ == "__main__":
    sys.exit(run_job(main, prog=PROG))
